"""The egress and interface-group wiring of the composition root, in process, without netlink.

Daemon gets a fake netlink (tests.test_egress_service.FakeAdapter, SynchronousRunner, no
watcher), task.Clock as its reactor, and a stub in place of the upstream client; queries go
straight into Resolver.handle.  What the kernel does with the plan is tested in
test_netlink_netns.py and end to end in test_egress_e2e.py.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from dnslib import AAAA, QTYPE, RR, A, DNSRecord
from twisted.internet import defer, task
from twisted.logger import capturedLogs

from blockd import cli, wire
from blockd.config import load_config
from blockd.daemon import Daemon, StartupError, real_netlink
from blockd.egress import EgressSettings
from blockd.netlink_services import SynchronousRunner
from blockd.policy import PolicyError, build_policy
from tests.test_egress_service import FakeAdapter

net = ipaddress.ip_network
START = 1_700_000_000.0
GOV = "10.120.0.5"  # groups.gov by its literal network
GOV_BY_INTERFACE = "10.121.0.5"  # groups.gov once g0 carries 10.121.0.0/24
OTHER = "10.130.0.5"  # no group
MONITORED = "10.140.0.5"  # groups.watch (monitor)

CONFIG = """\
[server]
listen = ["127.0.0.1:5399"]

[upstream]
servers = ["127.0.0.1:5398"]

[metrics]
listen = "127.0.0.1:9599"

[lists.bad]
path = "bad.txt"

[groups.gov]
networks = ["10.120.0.0/24"]
interfaces = ["g0"]
lists = ["bad"]
allow = ["ok.listed.example"]

[groups.watch]
networks = ["10.140.0.0/24"]
lists = ["bad"]
action = "monitor"

[egress]
enabled = true
prefixes = ["prefixes.txt"]
learn_min_ttl = 60
{egress_extra}
"""


def write_config(directory: Path, egress_extra: str = "", prefixes: str = "198.51.100.0/24\n") -> Path:
    (directory / "bad.txt").write_text("listed.example\n")
    (directory / "prefixes.txt").write_text(prefixes)
    path = directory / "blockd.toml"
    path.write_text(CONFIG.format(egress_extra=egress_extra))
    return path


class StubUpstreams:
    """Answers every name from `records` (A and AAAA), else with 192.0.2.99; records what it was asked."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.ttl = 30
        self.asked: list[tuple[str, str]] = []

    def resolve(self, message: bytes, question: bytes) -> defer.Deferred[bytes]:
        request = DNSRecord.parse(message)
        name = str(request.q.qname).rstrip(".")
        qtype = QTYPE[request.q.qtype]
        self.asked.append((name, qtype))
        reply = request.reply()
        for address in self.records.get(name, ["192.0.2.99"]):
            if qtype == "A" and ":" not in address:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=self.ttl))
            elif qtype == "AAAA" and ":" in address:
                reply.add_answer(RR(request.q.qname, QTYPE.AAAA, rdata=AAAA(address), ttl=self.ttl))
        return defer.succeed(reply.pack())


class Harness:
    def __init__(self, directory: Path, egress_extra: str = "", adapter: FakeAdapter | None = None):
        self.path = write_config(directory, egress_extra)
        self.clock = task.Clock()
        self.clock.advance(START)
        self.adapter = adapter or FakeAdapter()
        self.adapter.links.setdefault("g0", ())
        config = load_config(self.path)
        self.daemon = Daemon(
            self.clock,
            config,
            build_policy(config),
            config_path=self.path,
            netlink=lambda reactor, settings: (self.adapter, SynchronousRunner(), None),
        )
        self.upstream = StubUpstreams()
        self.daemon.upstreams.resolve = self.upstream.resolve  # type: ignore[method-assign]
        assert self.daemon.netlink is not None
        self.daemon.netlink.startService()
        self.daemon.attach_egress()

    def ask(self, name: str, client: str, qtype: str = "A") -> DNSRecord:
        answer = self.daemon.resolver.handle(bytes(DNSRecord.question(name, qtype).pack()), client, "udp")
        if isinstance(answer, defer.Deferred):
            answer = answer.result
        return DNSRecord.parse(answer)

    def routes(self) -> set[str]:
        return self.adapter.route_destinations()

    def rules(self) -> set[str]:
        return {str(rule.source) for rule in self.adapter.state.rules}

    def sample(self, name: str, **labels: str) -> float | None:
        return self.daemon.metrics.registry.get_sample_value(name, labels)

    def reload(self, config_text: str | None = None) -> None:
        if config_text is not None:
            self.path.write_text(config_text)
        config = load_config(self.path)
        self.daemon._apply(config, build_policy(config, self.daemon.policy.current))


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


# -- the policy: which answers egress learns from ------------------------------------------------


def test_blocks_for_any_blocking_group(tmp_path: Path):
    policy = build_policy(load_config(write_config(tmp_path)))
    assert policy.blocks_for_any_blocking_group(["cdn.example", "www.listed.example"])  # a CNAME chain
    assert not policy.blocks_for_any_blocking_group(["unlisted.example"])
    assert not policy.blocks_for_any_blocking_group([])
    # Excepted for gov and only monitored elsewhere: no blocking group blocks it.
    assert not policy.blocks_for_any_blocking_group(["ok.listed.example"])


def test_egress_prefixes_load_with_the_policy_only_when_enabled(tmp_path: Path):
    config = load_config(write_config(tmp_path, prefixes="198.51.100.0/24\n2001:db8:51::/48\n"))
    assert build_policy(config).egress_prefixes == (net("198.51.100.0/24"), net("2001:db8:51::/48"))
    (tmp_path / "prefixes.txt").write_text("198.51.100.0/24\n# fine\n198.51.100.1/24\nnot-a-prefix\n")
    with pytest.raises(PolicyError) as raised:
        build_policy(config)
    assert [e.split(": ")[0] for e in raised.value.errors] == [f"{tmp_path / 'prefixes.txt'}:{n}" for n in (3, 4)]
    off = load_config(write_config(tmp_path, egress_extra="", prefixes="garbage\n"))
    off = type(off)(**{**off.__dict__, "egress": EgressSettings(enabled=False, prefixes=off.egress.prefixes)})
    assert build_policy(off).egress_prefixes == ()  # a file egress does not use is not read


def test_check_prints_prefix_file_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = write_config(tmp_path, prefixes="198.51.100.0/24\n203.0.113.0/33\n")
    assert cli.main(["check", "--config", str(path)]) == 1
    assert f"{tmp_path / 'prefixes.txt'}:2: " in capsys.readouterr().err
    (tmp_path / "prefixes.txt").write_text("198.51.100.0/24\n203.0.113.0/24\n")
    assert cli.main(["check", "--config", str(path)]) == 0
    assert "egress: 2 prefixes from" in capsys.readouterr().out


def test_lookup_message_is_a_recursive_query():
    message, question = wire.lookup_message("www.listed.example", 28, 0x1234)
    record = DNSRecord.parse(message)
    assert (record.header.id, record.header.rd, str(record.q.qname), record.q.qtype) == (
        0x1234, 1, "www.listed.example.", 28,
    )  # fmt: skip
    assert message.endswith(question)
    with pytest.raises(ValueError):
        wire.lookup_message("a\\046b.listed.example", 1, 1)


# -- the daemon's wiring ---------------------------------------------------------------------


def test_start_reconciles_rules_and_static_prefixes(harness: Harness):
    assert harness.rules() == {"10.120.0.0/24"}
    assert harness.routes() == {"198.51.100.0/24"}
    assert harness.sample("blockd_egress_reconciles_total", result="success") >= 1
    assert harness.sample("blockd_egress_reconciles_total", result="failure") == 0
    assert harness.sample("blockd_egress_routes", source="static") == 1
    assert harness.sample("blockd_egress_rules") == 1
    assert harness.sample("blockd_egress_last_reconcile_success_timestamp_seconds") == START
    assert harness.sample("blockd_egress_changes_total", operation="add_route") == 1
    for name in ("learned_addresses", "learned_total", "never_skipped_total", "learned_evicted_total"):
        assert harness.sample(f"blockd_egress_{name}") == 0
    for result in ("started", "deduplicated", "rate_limited", "failed"):
        assert harness.sample("blockd_egress_followup_lookups_total", result=result) == 0
    assert harness.sample("blockd_group_interface_networks", group="gov") == 0


def test_the_first_reconcile_waits_for_the_interface_subnets(tmp_path: Path):
    # What the previous run left: the rule for g0's subnet must not be removed and re-added.
    previous = Harness(tmp_path, adapter=FakeAdapter())
    previous.adapter.links["g0"] = (net("10.121.0.0/24"),)
    previous.daemon.interfaces.request_refresh()
    assert previous.rules() == {"10.120.0.0/24", "10.121.0.0/24"}
    adapter = FakeAdapter()
    adapter.state = previous.adapter.state
    adapter.links["g0"] = (net("10.121.0.0/24"),)
    restarted = Harness(tmp_path, adapter=adapter)
    assert restarted.rules() == {"10.120.0.0/24", "10.121.0.0/24"}
    for operation in ("add_rule", "del_rule", "add_route", "del_route"):
        assert restarted.sample("blockd_egress_changes_total", operation=operation) == 0


@pytest.mark.parametrize("client", [OTHER, MONITORED])
def test_answers_for_listed_names_are_learned_from_other_clients(harness: Harness, client: str):
    harness.upstream.records["www.listed.example"] = ["203.0.113.10", "2001:db8:203::10"]
    assert [str(rr.rdata) for rr in harness.ask("www.listed.example", client).rr] == ["203.0.113.10"]
    harness.ask("www.listed.example", client, "AAAA")
    assert harness.routes() == {"198.51.100.0/24", "203.0.113.10/32", "2001:db8:203::10/128"}
    assert harness.sample("blockd_egress_learned_total") == 2
    assert harness.daemon.learned.expiry_of("203.0.113.10") == START + 60  # learn_min_ttl beats TTL 30


def test_unlisted_and_excepted_names_are_not_learned(harness: Harness):
    harness.ask("unlisted.example", OTHER)
    harness.ask("ok.listed.example", OTHER)
    harness.ask("ok.listed.example", GOV)  # gov's exception: forwarded, still not learned
    assert harness.routes() == {"198.51.100.0/24"}
    assert len(harness.daemon.learned) == 0


def test_a_sinkholed_question_is_looked_up_in_the_background(harness: Harness):
    harness.upstream.records["www.listed.example"] = ["203.0.113.10", "2001:db8:203::10"]
    assert [str(rr.rdata) for rr in harness.ask("www.listed.example", GOV).rr] == ["0.0.0.0"]
    assert sorted(harness.upstream.asked) == [("www.listed.example", "A"), ("www.listed.example", "AAAA")]
    assert harness.routes() == {"198.51.100.0/24", "203.0.113.10/32", "2001:db8:203::10/128"}
    harness.ask("www.listed.example", GOV)  # again: deduplicated, the device still gets the sinkhole
    assert len(harness.upstream.asked) == 2
    assert harness.sample("blockd_egress_followup_lookups_total", result="started") == 1
    assert harness.sample("blockd_egress_followup_lookups_total", result="deduplicated") == 1
    # Not from the cache: the background answer never reaches a client.
    assert [str(rr.rdata) for rr in harness.ask("www.listed.example", GOV).rr] == ["0.0.0.0"]


def test_learned_routes_expire(harness: Harness):
    harness.upstream.records["www.listed.example"] = ["203.0.113.10"]
    harness.ask("www.listed.example", OTHER)
    assert "203.0.113.10/32" in harness.routes()
    harness.clock.advance(61 + 1)
    assert harness.routes() == {"198.51.100.0/24"}
    assert harness.sample("blockd_egress_learned_expired_total") == 1


def test_interface_subnets_join_the_group_and_survive_a_reload(harness: Harness):
    assert harness.ask("listed.example", GOV_BY_INTERFACE).rr[0].rdata != A("0.0.0.0")
    harness.adapter.links["g0"] = (net("10.121.0.0/24"),)
    harness.daemon.interfaces.request_refresh()
    assert str(harness.ask("listed.example", GOV_BY_INTERFACE).rr[0].rdata) == "0.0.0.0"
    assert harness.rules() == {"10.120.0.0/24", "10.121.0.0/24"}  # reconciled at once
    assert harness.sample("blockd_group_interface_networks", group="gov") == 1
    harness.reload()
    assert str(harness.ask("listed.example", GOV_BY_INTERFACE).rr[0].rdata) == "0.0.0.0"
    assert harness.rules() == {"10.120.0.0/24", "10.121.0.0/24"}


def test_a_reload_rereads_the_prefix_files_and_reconciles(harness: Harness, tmp_path: Path):
    (tmp_path / "prefixes.txt").write_text("198.51.100.0/24\n192.0.2.128/25\n")
    harness.reload()
    assert harness.routes() == {"198.51.100.0/24", "192.0.2.128/25"}


def test_restart_only_egress_settings_are_named_and_kept(harness: Harness):
    text = harness.path.read_text().replace("learn_min_ttl = 60", "learn_min_ttl = 60\ntable = 1121\nlearn_max = 5")
    with capturedLogs() as events:
        harness.reload(text)
    warned = {e["key"] for e in events if "takes effect only after a restart" in e["log_format"]}
    assert warned == {"egress.table", "egress.learn_max"}
    assert {rule.table for rule in harness.adapter.state.rules} == {1120}
    text = text.replace("enabled = true", "enabled = false")
    with capturedLogs() as events:
        harness.reload(text)
    assert "egress.enabled" in {e.get("key") for e in events}
    assert harness.routes() == {"198.51.100.0/24"}  # still routing the last prefixes until a restart


def test_missing_cap_net_admin_is_a_startup_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    netlink = pytest.importorskip("blockd.netlink")
    status = tmp_path / "status"
    status.write_text("Name:\tblockd\nCapEff:\t0000000000000400\n")  # CAP_NET_BIND_SERVICE only
    real_check = netlink.check_capability
    monkeypatch.setattr(netlink, "check_capability", lambda: real_check(status))
    with pytest.raises(StartupError, match="CAP_NET_ADMIN"):
        real_netlink(None, EgressSettings(enabled=True))
    adapter, _runner, _watcher = real_netlink(None, EgressSettings(enabled=False))  # interface groups only
    adapter.close()


def test_without_egress_or_interface_groups_nothing_netlink_is_built(tmp_path: Path):
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace('interfaces = ["g0"]', "").replace("enabled = true", "enabled = false"))
    config = load_config(path)

    def no_netlink(reactor: Any, settings: EgressSettings) -> Any:
        raise AssertionError("netlink built for a config that does not need it")

    daemon = Daemon(task.Clock(), config, build_policy(config), netlink=no_netlink)
    assert daemon.netlink is daemon.egress is daemon.interfaces is None
    assert daemon.metrics.registry.get_sample_value("blockd_egress_rules") is None
