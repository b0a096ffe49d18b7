"""Egress blocking end to end: the real daemon inside a gateway network namespace.

    gov    10.120.0.2/24 fd00:120::2/64   -- g0 --+
    other  10.130.0.2/24 fd00:130::2/64   -- g2 --+- gateway: blockd on :53, fake upstream on 127.0.0.1:5300
    inet   192.0.2.2/24 2001:db8:1::2/64  -- g1 --+
    inet listens on TCP 8080 at 198.51.100.10 and 2001:db8:51::10 (in the test prefix file),
    203.0.113.10/20/30 and 2001:db8:203::10 (not listed)

blockd runs as `ip netns exec GW python -m blockd run`; its government group is defined only by
`interfaces = ["g0"]`, so both the classifier and the egress rules come from g0's subnets.  The
fake upstream (tests/fakeupstream.py as a script) runs in the same namespace and answers listed
names with addresses in "inet".  Everything happens in namespaces these tests create and delete
(tests/netns.py), connected only by veth pairs; the host's own rules and routes are compared
before and after.  The tests run whenever the process is root and skip with the reason otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.message
import dns.query
import pytest

from tests.daemon import REPO, Daemon
from tests.netns import (
    BLOCKED,
    blockd_rules,
    connect,
    host_tables,
    ip,
    ip_batch,
    needs_netns,
    netns_socket,
    table_routes,
)

pytestmark = [needs_netns, pytest.mark.timeout(120)]

UPSTREAM_PORT = 5300
METRICS_PORT = 9553
LEARN_MIN_TTL = 2  # seconds: learned routes of these tests expire quickly
EXPECTED_RULES = [
    "11200: from 10.120.0.0/24 lookup 1120 proto 120",
    "11200: from fd00:120::/64 lookup 1120 proto 120",
]
STATIC_V4 = ["prohibit 198.51.100.0/24 proto 120"]
STATIC_V6 = ["prohibit 2001:db8:51::/48 dev lo proto 120 metric 1024 pref medium"]
RECORDS = {
    "other.listed.example": [["A", "203.0.113.20", 1]],
    "gov.listed.example": [["A", "203.0.113.30", 1]],
    "unlisted.example": [["A", "203.0.113.10", 300]],
}

CONFIG = """\
[server]
listen = ["0.0.0.0:53"]
pidfile = "{tmp}/blockd.pid"

[upstream]
servers = ["127.0.0.1:{upstream_port}"]
timeout = 1.0

[metrics]
listen = "127.0.0.1:{metrics_port}"

[log]
queries = "blocked"
path = "{tmp}/queries.jsonl"

[lists.test]
path = "{tmp}/listed.txt"

[groups.gov]
interfaces = ["g0"]
lists = ["test"]
action = "sinkhole"

[egress]
enabled = true
prefixes = ["{tmp}/prefixes.txt"]
learn_min_ttl = {learn_min_ttl}
reconcile_interval = 30
"""


@pytest.fixture(autouse=True)
def host_untouched() -> Iterator[None]:
    before = host_tables()
    yield
    assert host_tables() == before, "the host's own rules or routes changed"


def write_config(tmp: Path) -> Path:
    """blockd.toml and the files it names: a list, a prefix file, the fake upstream's records."""
    (tmp / "listed.txt").write_text("listed.example\n")
    (tmp / "prefixes.txt").write_text("# test prefix file\n198.51.100.0/24\n2001:db8:51::/48\n")
    (tmp / "records.json").write_text(json.dumps(RECORDS))
    config = tmp / "blockd.toml"
    config.write_text(
        CONFIG.format(tmp=tmp, upstream_port=UPSTREAM_PORT, metrics_port=METRICS_PORT, learn_min_ttl=LEARN_MIN_TTL)
    )
    return config


class Gateway:
    def __init__(self, names: dict[str, str], tmp: Path):
        self.gw, self.gov, self.other, self.inet = names["gateway"], names["gov"], names["other"], names["inet"]
        self.tmp = tmp
        self.daemon = Daemon(write_config(tmp), 53, METRICS_PORT, netns=self.gw)
        self.upstream: subprocess.Popen[str] | None = None

    def start_upstream(self) -> None:
        command = [
            "-m",
            "tests.fakeupstream",
            "--port",
            str(UPSTREAM_PORT),
            "--records",
            str(self.tmp / "records.json"),
        ]
        self.upstream = subprocess.Popen(
            ["ip", "netns", "exec", self.gw, sys.executable, *command],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        assert self.upstream.stdout is not None
        ready, _, _ = select.select([self.upstream.stdout], [], [], 20)
        assert ready and self.upstream.stdout.readline().startswith("ready"), "fake upstream did not start"

    def stop(self) -> None:
        self.daemon.stop()
        if self.upstream is not None:
            self.upstream.terminate()
            try:
                self.upstream.wait(10)
            except subprocess.TimeoutExpired:
                self.upstream.kill()
                self.upstream.wait()

    def resolve(self, namespace: str, name: str, source: str | None = None) -> list[str]:
        """A records of name, asked through blockd from inside a client namespace."""
        sock = netns_socket(namespace, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if source is not None:
                sock.bind((source, 0))
            server = "10.120.0.1" if namespace == self.gov else "10.130.0.1"
            answer = dns.query.udp(dns.message.make_query(name, "A"), server, port=53, timeout=3, sock=sock)
        finally:
            sock.close()
        return [item.to_text() for rrset in answer.answer for item in rrset]

    def metrics(self) -> str:
        sock = netns_socket(self.gw, socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(5)
            sock.connect(("127.0.0.1", METRICS_PORT))
            sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        finally:
            sock.close()
        return b"".join(chunks).decode()

    def sample(self, series: str) -> float | None:
        match = re.search(rf"^{re.escape(series)} (\S+)$", self.metrics(), re.M)
        return float(match.group(1)) if match else None

    def wait_for_reconcile(self, timeout: float = 10.0) -> None:
        wait_until(lambda: (self.sample('blockd_egress_reconciles_total{result="success"}') or 0) >= 1, timeout)

    def all_routes(self) -> list[str]:
        return table_routes(self.gw) + table_routes(self.gw, "-6")


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.02) -> float:
    """Seconds until condition() held; fails after timeout."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - started


def blocked(namespace: str, address: str) -> bool:
    code, _ = connect(namespace, address, timeout=2.0)
    assert code == 0 or code in BLOCKED, f"{address}: {errno.errorcode.get(code, code)}"
    return code != 0


@pytest.fixture
def gateway(topology: dict[str, str], tmp_path: Path) -> Iterator[Gateway]:
    gateway = Gateway(topology, tmp_path)
    ip_batch(gateway.inet, "addr add 203.0.113.20/32 dev lo\naddr add 203.0.113.30/32 dev lo\n")
    try:
        gateway.start_upstream()
        gateway.daemon.start()
        gateway.wait_for_reconcile()
        yield gateway
    finally:
        gateway.stop()


def test_listed_prefixes_are_unreachable_for_the_government_client_only(gateway: Gateway):
    assert blockd_rules(gateway.gw) == EXPECTED_RULES  # from g0's subnets: the group has no literal networks
    assert table_routes(gateway.gw) == STATIC_V4
    assert table_routes(gateway.gw, "-6") == STATIC_V6
    for target in ("198.51.100.10", "2001:db8:51::10"):
        assert blocked(gateway.gov, target), f"gov -> {target} must be blocked"
    for target in ("203.0.113.10", "2001:db8:203::10"):
        assert not blocked(gateway.gov, target), f"gov -> {target} must not be blocked"
    for target in ("198.51.100.10", "2001:db8:51::10", "203.0.113.10", "2001:db8:203::10"):
        assert not blocked(gateway.other, target), f"other -> {target} must not be blocked"
    # The interface-defined group classifies its clients for DNS too.
    assert gateway.resolve(gateway.gov, "www.listed.example") == ["0.0.0.0"]
    assert gateway.resolve(gateway.other, "unlisted.example") == ["203.0.113.10"]


def routed_after_lookup(gateway: Gateway, client: str, name: str, answer: str, address: str) -> float:
    """Seconds from client's lookup of name (answered `answer`) until gov can no longer reach address."""
    assert not blocked(gateway.gov, address)
    assert gateway.resolve(client, name) == [answer]
    seconds = wait_until(lambda: blocked(gateway.gov, address), timeout=1.0)
    assert f"prohibit {address} proto 120" in table_routes(gateway.gw)
    return seconds


def test_an_answer_to_another_client_is_routed_within_a_second_and_expires(gateway: Gateway):
    seconds = routed_after_lookup(gateway, gateway.other, "other.listed.example", "203.0.113.20", "203.0.113.20")
    print(f"learned route effective after {seconds:.3f} s")
    assert not blocked(gateway.other, "203.0.113.20")
    # TTL 1 s, learn_min_ttl 2 s, expiries batched by 1 s: gone after about 3 s.
    seconds = wait_until(lambda: not blocked(gateway.gov, "203.0.113.20"), timeout=LEARN_MIN_TTL + 6, interval=0.2)
    print(f"learned route gone {seconds:.1f} s later")
    assert table_routes(gateway.gw) == STATIC_V4
    assert gateway.sample("blockd_egress_learned_expired_total") == 1


def test_a_sinkholed_lookup_is_resolved_in_the_background_and_routed(gateway: Gateway):
    seconds = routed_after_lookup(gateway, gateway.gov, "gov.listed.example", "0.0.0.0", "203.0.113.30")
    print(f"background-learned route effective after {seconds:.3f} s")
    assert gateway.sample('blockd_egress_followup_lookups_total{result="started"}') == 1


def test_a_rule_deleted_by_hand_is_restored(gateway: Gateway):
    ip(gateway.gw, "rule", "del", "from", "10.120.0.0/24", "lookup", "1120", "pref", "11200")
    seconds = wait_until(lambda: blockd_rules(gateway.gw) == EXPECTED_RULES, timeout=5.0)
    print(f"deleted rule restored after {seconds:.3f} s")
    assert blocked(gateway.gov, "198.51.100.10")
    assert gateway.sample('blockd_egress_changes_total{operation="add_rule"}') == 3  # 2 at start, 1 repair


def test_a_restart_leaves_no_duplicates(gateway: Gateway):
    rules, routes = blockd_rules(gateway.gw), gateway.all_routes()
    assert rules == EXPECTED_RULES and routes == STATIC_V4 + STATIC_V6
    gateway.daemon.stop()
    # on_exit = "keep": the government network stays blocked while blockd is down.
    assert blockd_rules(gateway.gw) == rules and gateway.all_routes() == routes
    assert blocked(gateway.gov, "198.51.100.10")
    gateway.daemon.start()
    gateway.wait_for_reconcile()
    assert blockd_rules(gateway.gw) == rules
    assert gateway.all_routes() == routes
    every_rule = ip(gateway.gw, "rule", "show").splitlines()
    assert len(every_rule) == len(set(every_rule)) == 4  # local, blockd's IPv4 rule, main, default
    assert gateway.sample('blockd_egress_changes_total{operation="add_rule"}') == 0
    assert gateway.sample('blockd_egress_changes_total{operation="add_route"}') == 0


def test_a_new_address_on_the_interface_joins_its_subnet_to_the_group(gateway: Gateway):
    # A client on 10.122.0.0/24, reachable through g0 by a plain route: not in the group yet.
    ip(gateway.gov, "addr", "add", "10.122.0.2/24", "dev", "c0")
    ip(gateway.gw, "route", "add", "10.122.0.0/24", "dev", "g0")
    assert gateway.resolve(gateway.gov, "late.listed.example", source="10.122.0.2") == ["192.0.2.1"]
    ip(gateway.gw, "addr", "add", "10.122.0.1/24", "dev", "g0")
    started = time.monotonic()
    wait_until(
        lambda: gateway.resolve(gateway.gov, "late.listed.example", source="10.122.0.2") == ["0.0.0.0"], timeout=2.0
    )
    print(f"new subnet classified after {time.monotonic() - started:.3f} s, without a reload")
    wait_until(lambda: "11200: from 10.122.0.0/24 lookup 1120 proto 120" in blockd_rules(gateway.gw), timeout=2.0)
    assert gateway.sample('blockd_group_interface_networks{group="gov"}') == 3
    assert gateway.sample('blockd_reloads_total{result="success"}') == 0


def test_egress_metrics_are_exported(gateway: Gateway):
    text = gateway.metrics()
    for series, value in (
        ('blockd_egress_reconciles_total{result="failure"}', 0),
        ('blockd_egress_routes{source="static"}', 2),
        ('blockd_egress_routes{source="learned"}', 0),
        ("blockd_egress_rules", 2),
        ("blockd_egress_learned_addresses", 0),
        ('blockd_egress_followup_lookups_total{result="rate_limited"}', 0),
        ('blockd_group_interface_networks{group="gov"}', 2),
    ):
        assert f"\n{series} {float(value)}\n" in text, series
    for name in (
        'blockd_egress_reconciles_total{result="success"}',
        "blockd_egress_last_reconcile_success_timestamp_seconds",
        "blockd_egress_reconcile_duration_seconds_count",
        "blockd_egress_learned_total",
        "blockd_egress_never_skipped_total",
    ):
        assert f"\n{name} " in text, name


def test_without_cap_net_admin_egress_refuses_to_start(make_ns: Callable[[], str], tmp_path: Path):
    namespace = make_ns()  # should the check ever pass, blockd changes only this namespace
    started = time.monotonic()
    without_cap = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"]
    run = [sys.executable, "-m", "blockd", "run", "--config", str(write_config(tmp_path))]
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, *without_cap, *run],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 1
    assert "CAP_NET_ADMIN" in result.stderr and "refusing to start" in result.stderr, result.stderr
    assert time.monotonic() - started < 20
    assert ip(namespace, "rule", "show").count("lookup 1120") == 0


def test_prefix_files_reload_on_sighup_and_a_bad_one_is_refused(gateway: Gateway):
    def reload() -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "blockd", "reload", "--pidfile", str(gateway.tmp / "blockd.pid")]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)

    prefixes = gateway.tmp / "prefixes.txt"
    prefixes.write_text(prefixes.read_text() + "203.0.113.0/25\n203.0.113.300/32\n")
    refused = reload()
    assert refused.returncode == 1 and f"{prefixes}:5: " in refused.stderr, refused.stderr
    assert table_routes(gateway.gw) == STATIC_V4 and not blocked(gateway.gov, "203.0.113.10")
    prefixes.write_text(prefixes.read_text().replace("203.0.113.300/32\n", ""))
    assert reload().returncode == 0
    wait_until(lambda: blocked(gateway.gov, "203.0.113.10"), timeout=2.0)
    assert table_routes(gateway.gw) == ["prohibit 198.51.100.0/24 proto 120", "prohibit 203.0.113.0/25 proto 120"]
    assert blockd_rules(gateway.gw) == EXPECTED_RULES  # the interface subnets survived the reload
    assert gateway.resolve(gateway.gov, "www.listed.example") == ["0.0.0.0"]
