"""RPZ out ([publish]), end to end: the real blockd serving its policy as RPZ zones.

dnspython is the independent client for AXFR, IXFR, SOA and TSIG; Unbound and BIND from Debian
are the secondaries a site already runs (tests/rpz_secondaries.py): each transfers blockd's zone,
answers the listed names per the policy and forwards the rest, and after a reload with a changed
list NOTIFY + IXFR bring the change to both.  A second blockd transferring the first one's zone
is the fleet topology.  Every server is started by the test with its own config in a temp dir
and stopped by PID; every upstream is a FakeUpstream on loopback.
"""

from __future__ import annotations

import base64
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.serial
import dns.tsig
import dns.tsigkeyring
import dns.xfr
import dns.zone
import pytest
from dnslib import RR

from tests.daemon import GOV, OTHER, Daemon, free_port, rcode_name, wait_until
from tests.fakeupstream import FakeUpstream
from tests.rpz_secondaries import BindRpzSecondary, UnboundRpzSecondary, needs_named, needs_unbound

ZONE = "tiktok.rpz.test"
SECRET = base64.b64encode(b"blockd-publish-test-secret-32by!").decode()
OTHER_SECRET = base64.b64encode(b"a-different-secret-of-32-bytes!!").decode()

BLOCKD_CONF = """\
[server]
listen = ["127.0.0.1:{port}"]
state_dir = "state"
[upstream]
servers = ["{upstream}"]
timeout = 1.0
[metrics]
listen = "127.0.0.1:{metrics_port}"
[log]
queries = "none"
[lists.tiktok]
path = "tiktok.txt"
[lists.hosts]
path = "hosts.txt"
match = "exact"
action = "nxdomain"
[groups.government]
networks = ["127.0.0.2/32"]
lists = ["tiktok", "hosts"]
allow = ["careers.tiktok.com"]
action = "sinkhole"
ttl = 120
[publish]
listen = "127.0.0.1:{publish_port}"
allow = ["127.0.0.1/32"]
notify = [{notify}]
{tsig}
[publish.zones."{zone}."]
group = "government"
[publish.zones."nx.rpz.test."]
lists = ["tiktok"]
"""

TIKTOK = "tiktok.com\nbytedance.com\ntiktokv.com\n"
KEY_FILE = 'key "publish-key" {{\n    algorithm hmac-sha256;\n    secret "{secret}";\n}};\n'


@dataclass
class Site:
    blockd: Daemon
    directory: Path
    publish_port: int
    upstream: FakeUpstream

    def metric(self, name: str, **labels: str) -> float | None:
        assert self.blockd is not None
        return self.blockd.metric(name, **labels)

    def soa_serial(self, zone: str = ZONE, source: str = "127.0.0.1") -> int:
        reply = dns.query.udp(dns.message.make_query(zone + ".", "SOA"), "127.0.0.1", port=self.publish_port,
                              source=source, timeout=3)  # fmt: skip
        assert rcode_name(reply) == "NOERROR", reply
        return int(reply.answer[0][0].serial)

    def axfr(self, zone: str = ZONE, keyring: dict | None = None) -> dns.zone.Zone:
        transferred = dns.zone.Zone(zone + ".")
        query, _ = dns.xfr.make_query(transferred, serial=None, keyring=keyring)
        dns.query.inbound_xfr("127.0.0.1", transferred, query=query, port=self.publish_port, timeout=10)
        return transferred

    def reload_and_wait(self, old_serial: int, zone: str = ZONE) -> int:
        self.blockd.signal(signal.SIGHUP)
        wait_until(lambda: self.soa_serial(zone) != old_serial, 10, "a new serial", self.blockd.log)
        return self.soa_serial(zone)



def records_of(zone: dns.zone.Zone, owner: str) -> set[str]:
    node = zone.get_node(owner)
    if node is None:
        return set()
    return {f"{dns.rdatatype.to_text(rdataset.rdtype)} {rdata.to_text()}" for rdataset in node for rdata in rdataset}


def content(zone: dns.zone.Zone) -> dict[str, set[str]]:
    """Every owner's records but the SOA (whose serial differs between versions)."""
    return {str(name): {r for r in records_of(zone, str(name)) if not r.startswith("SOA")} for name in zone.nodes}


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Callable[..., Site]]:
    upstream = FakeUpstream()
    started: list[Daemon] = []

    def make(
        notify: tuple[int, ...] = (), tsig: bool = False, hosts: str = "ads.example\n", publish_port: int | None = None
    ) -> Site:
        (tmp_path / "tiktok.txt").write_text(TIKTOK)
        (tmp_path / "hosts.txt").write_text(hosts)
        (tmp_path / "publish.key").write_text(KEY_FILE.format(secret=SECRET))
        port, metrics_port = free_port(), free_port()
        publish_port = publish_port or free_port()
        config = tmp_path / "blockd.toml"
        config.write_text(
            BLOCKD_CONF.format(
                port=port, upstream=upstream.address, metrics_port=metrics_port, publish_port=publish_port,
                notify=", ".join(f'"127.0.0.1:{p}"' for p in notify), zone=ZONE,
                tsig='tsig = "publish.key"' if tsig else "",
            )
        )  # fmt: skip
        blockd = Daemon(config, port, metrics_port).start()
        started.append(blockd)
        made = Site(blockd, tmp_path, publish_port, upstream)
        wait_until(lambda: made.metric("blockd_publish_serial", zone=ZONE) is not None, 10, "first render", blockd.log)
        return made

    yield make
    for blockd in started:
        blockd.stop()
    upstream.close()


def test_the_published_zone_is_the_groups_policy(site: Callable[..., Site]) -> None:
    s = site()
    zone = s.axfr()
    assert records_of(zone, "tiktok.com") == {"A 0.0.0.0", "AAAA ::"}
    assert records_of(zone, "*.tiktok.com") == {"A 0.0.0.0", "AAAA ::"}
    assert records_of(zone, "careers.tiktok.com") == {"CNAME rpz-passthru."}  # the group's allow entry
    assert records_of(zone, "*.careers.tiktok.com") == {"CNAME rpz-passthru."}
    assert records_of(zone, "ads.example") == {"CNAME ."}  # an exact list: no wildcard below it
    assert records_of(zone, "*.ads.example") == set()
    # The built-in escape hatches to encrypted DNS are the group's policy too.
    assert records_of(zone, "use-application-dns.net") == {"CNAME ."}
    assert records_of(zone, "resolver.arpa") == {"CNAME *."}
    assert records_of(zone, "@") >= {"NS localhost."}
    assert zone.find_rdataset("@", "SOA")[0].minimum == 120  # the group's ttl
    assert zone.find_rdataset("tiktok.com", "A").ttl == 120
    # The zone says what blockd itself answers the group's clients.
    assert s.blockd.query("www.tiktok.com", source=GOV).answer[0][0].address == "0.0.0.0"
    assert rcode_name(s.blockd.query("careers.tiktok.com", source=GOV)) == "NOERROR"
    assert s.blockd.query("careers.tiktok.com", source=GOV).answer[0][0].address != "0.0.0.0"
    # A zone of lists with the default action: the RPZ pair "name CNAME ." + "*.name CNAME .".
    nx = s.axfr("nx.rpz.test")
    assert records_of(nx, "bytedance.com") == {"CNAME ."} and records_of(nx, "*.bytedance.com") == {"CNAME ."}
    assert s.metric("blockd_publish_records", zone="nx.rpz.test") == 6


def test_reloads_move_the_serial_only_on_change_and_ixfr_carries_the_change(site: Callable[..., Site]) -> None:
    s = site()
    first = s.soa_serial()
    before = s.axfr()
    # A reload that changes nothing keeps the serial.
    s.blockd.signal(signal.SIGHUP)
    wait_until(lambda: (s.metric("blockd_reloads_total", result="success") or 0) >= 1, 10, "reload", s.blockd.log)
    time.sleep(0.3)  # the rendering follows the swap; give it time to (wrongly) move the serial
    assert s.soa_serial() == first
    (s.directory / "tiktok.txt").write_text(TIKTOK.replace("bytedance.com\n", "") + "newapp.example\n")
    second = s.reload_and_wait(first)
    assert dns.serial.Serial(second) > first
    # IXFR from the first version (dnspython applies it to its copy) gives the zone AXFR gives.
    dns.query.inbound_xfr(
        "127.0.0.1", before, port=s.publish_port, timeout=10, query=dns.xfr.make_query(before, serial=first)[0]
    )
    after = s.axfr()
    assert content(before) == content(after)
    assert records_of(after, "newapp.example") == {"A 0.0.0.0", "AAAA ::"}
    assert records_of(after, "*.bytedance.com") == set()
    assert (s.metric("blockd_publish_requests_total", type="ixfr", result="ok") or 0) >= 1
    # Over UDP an IXFR from an older serial gets the current SOA alone: "come back over TCP".
    query = dns.xfr.make_query(dns.zone.Zone(ZONE + "."), serial=first)[0]
    reply = dns.query.udp(query, "127.0.0.1", port=s.publish_port, timeout=3)
    assert [rr.rdtype for rr in reply.answer] == [dns.rdatatype.SOA] and reply.answer[0][0].serial == second
    # A serial the journal never had: the whole zone.
    stale = dns.zone.Zone(ZONE + ".")
    dns.query.inbound_xfr(
        "127.0.0.1", stale, port=s.publish_port, timeout=10, query=dns.xfr.make_query(stale, serial=12345)[0]
    )
    assert content(stale) == content(after)


def test_the_serial_survives_a_restart_and_moves_when_the_lists_changed_meanwhile(
    site: Callable[..., Site], tmp_path: Path
) -> None:
    s = site()
    first = s.soa_serial()
    s.blockd.stop()
    again = site()
    assert again.soa_serial() == first  # same content: secondaries have nothing to transfer
    again.blockd.stop()
    changed = site(hosts="ads.example\ntracker.example\n")
    assert dns.serial.Serial(changed.soa_serial()) > first


def test_access_by_address_and_by_tsig(site: Callable[..., Site]) -> None:
    s = site(tsig=True)
    # Not in [publish] allow: refused, whatever it asks.
    reply = dns.query.udp(dns.message.make_query(ZONE + ".", "SOA"), "127.0.0.1", port=s.publish_port,
                          source=OTHER, timeout=3)  # fmt: skip
    assert rcode_name(reply) == "REFUSED"
    # The SOA is answered unsigned (resolvers poll it so), a transfer only when signed with the key.
    assert s.soa_serial() > 0
    with pytest.raises(dns.xfr.TransferError) as refused:
        s.axfr()
    assert "REFUSED" in str(refused.value)
    keyring = dns.tsigkeyring.from_text({"publish-key": ("hmac-sha256", SECRET)})
    zone = s.axfr(keyring=keyring)  # dnspython verifies every message's MAC in the chain
    assert records_of(zone, "tiktok.com") == {"A 0.0.0.0", "AAAA ::"}
    wrong = dns.tsigkeyring.from_text({"publish-key": ("hmac-sha256", OTHER_SECRET)})
    with pytest.raises(dns.tsig.PeerBadSignature):
        s.axfr(keyring=wrong)
    unknown = dns.tsigkeyring.from_text({"someone-else": ("hmac-sha256", SECRET)})
    with pytest.raises(dns.tsig.PeerBadKey):
        s.axfr(keyring=unknown)
    assert s.metric("blockd_publish_requests_total", type="axfr", result="notauth") == 2
    assert "AXFR of tiktok.rpz.test from 127.0.0.1: refused" in s.blockd.log()


def test_connections_from_outside_allow_are_closed_and_a_stalled_reader_holds_up_no_one(
    site: Callable[..., Site],
) -> None:
    s = site(hosts="".join(f"host{n}.example\n" for n in range(5000)))
    with socket.create_connection(("127.0.0.1", s.publish_port), source_address=(OTHER, 0), timeout=3) as outside:
        assert outside.recv(100) == b""  # closed at once: nothing is read from outside allow
    # A secondary that asks for the zone and never reads keeps one connection busy, not the others.
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", s.publish_port))
    query = dns.message.make_query(ZONE + ".", "AXFR").to_wire()
    stalled.sendall(len(query).to_bytes(2, "big") + query)
    try:
        for _ in range(3):
            assert records_of(s.axfr(), "host4999.example") == {"CNAME ."}
    finally:
        stalled.close()


def test_a_big_zone_spans_many_signed_messages(site: Callable[..., Site]) -> None:
    s = site(tsig=True, hosts="".join(f"host{n}.example\n" for n in range(5000)))
    keyring = dns.tsigkeyring.from_text({"publish-key": ("hmac-sha256", SECRET)})
    zone = s.axfr(keyring=keyring)
    assert records_of(zone, "host4999.example") == {"CNAME ."}
    sent = s.metric("blockd_publish_sent_bytes_total", type="axfr") or 0
    assert sent > 5 * 16_000  # several messages, each signed and verified


@needs_unbound
@needs_named
def test_unbound_and_bind_enforce_the_published_zone_and_follow_a_reload(
    site: Callable[..., Site], tmp_path: Path
) -> None:
    upstream = FakeUpstream()
    try:
        upstream.records["forwarded.example"] = [RR.fromZone("forwarded.example. 60 A 198.51.100.7")[0]]
        upstream.records["newapp.example"] = [RR.fromZone("newapp.example. 60 A 198.51.100.8")[0]]
        publish_port = free_port()
        unbound = UnboundRpzSecondary(tmp_path / "unbound", ZONE, publish_port, upstream.port)
        bind = BindRpzSecondary(tmp_path / "bind", ZONE, publish_port, upstream.port)
        s = site(publish_port=publish_port, notify=(unbound.port, bind.port))
        first = s.soa_serial()
        with unbound, bind:
            for secondary in (unbound, bind):
                secondary.wait_serial(first, timeout=20)
                assert answer(secondary.query("www.tiktok.com")) == "NOERROR 0.0.0.0", secondary.log()
                assert answer(secondary.query("tiktok.com", "AAAA")) == "NOERROR ::"
                assert answer(secondary.query("ads.example")) == "NXDOMAIN"
                assert answer(secondary.query("careers.tiktok.com")) == "NOERROR 192.0.2.1"  # passthru: forwarded
                assert answer(secondary.query("forwarded.example")) == "NOERROR 198.51.100.7"
                assert answer(secondary.query("newapp.example")) == "NOERROR 198.51.100.8"
            (s.directory / "tiktok.txt").write_text(TIKTOK + "newapp.example\n")
            ixfr_before = s.metric("blockd_publish_requests_total", type="ixfr", result="ok") or 0
            reloaded = time.monotonic()
            s.blockd.signal(signal.SIGHUP)
            # Reload, render, NOTIFY, IXFR: both secondaries have the change within 2 s of the SIGHUP.
            for secondary in (unbound, bind):
                wait_until(
                    lambda sec=secondary: answer(sec.query("newapp.example")) == "NOERROR 0.0.0.0",  # type: ignore[misc]
                    2.0 - (time.monotonic() - reloaded), f"{secondary.name} blocking newapp.example", secondary.log,
                )  # fmt: skip
                print(f"{secondary.name}: change applied {time.monotonic() - reloaded:.3f} s after the SIGHUP")
            assert (s.metric("blockd_publish_requests_total", type="ixfr", result="ok") or 0) >= ixfr_before + 2
            assert (s.metric("blockd_publish_notify_total", result="acknowledged") or 0) >= 2
    finally:
        upstream.close()


@needs_named
def test_a_secondary_without_the_key_is_refused(site: Callable[..., Site], tmp_path: Path) -> None:
    publish_port = free_port()
    key_file = tmp_path / "bind-publish.key"
    key_file.write_text(KEY_FILE.format(secret=SECRET))
    upstream = FakeUpstream()
    try:
        with_key = BindRpzSecondary(tmp_path / "with", ZONE, publish_port, upstream.port, key_file=key_file)
        without = BindRpzSecondary(tmp_path / "without", ZONE, publish_port, upstream.port)
        s = site(publish_port=publish_port, notify=(with_key.port, without.port), tsig=True)
        with with_key, without:
            with_key.wait_serial(s.soa_serial(), timeout=20)
            assert answer(with_key.query("www.tiktok.com")) == "NOERROR 0.0.0.0"
            wait_until(
                lambda: (s.metric("blockd_publish_requests_total", type="ixfr", result="refused") or 0)
                + (s.metric("blockd_publish_requests_total", type="axfr", result="refused") or 0) >= 1,
                20, "the unsigned transfer refused", without.log,
            )  # fmt: skip
            assert without.serial() is None
            assert "REFUSED" in without.log(10**6)
            # Without the zone BIND forwards: the policy is not enforced there, and blockd said why.
            assert answer(without.query("www.tiktok.com")) == "NOERROR 192.0.2.1"
            assert "refused" in s.blockd.log()
    finally:
        upstream.close()


def test_a_blockd_fleet_transfers_the_policy_from_one_blockd(site: Callable[..., Site], tmp_path: Path) -> None:
    s = site()
    edge_dir = tmp_path / "edge"
    edge_dir.mkdir()
    port, metrics_port = free_port(), free_port()
    (edge_dir / "blockd.toml").write_text(
        f"""\
[server]
listen = ["127.0.0.1:{port}"]
state_dir = "state"
[upstream]
servers = ["{s.upstream.address}"]
[metrics]
listen = "127.0.0.1:{metrics_port}"
[lists.central]
zone = "{ZONE}."
primaries = ["127.0.0.1:{s.publish_port}"]
[groups.government]
networks = ["127.0.0.2/32"]
lists = ["central"]
"""
    )
    edge = Daemon(edge_dir / "blockd.toml", port, metrics_port).start()
    try:
        wait_until(lambda: answer(edge.query("www.tiktok.com", source=GOV)) == "NOERROR 0.0.0.0", 10,
                   "the edge blocking", edge.log)  # fmt: skip
        assert answer(edge.query("ads.example", source=GOV)) == "NXDOMAIN"
        assert rcode_name(edge.query("careers.tiktok.com", source=GOV)) == "NOERROR"
        assert answer(edge.query("careers.tiktok.com", source=GOV)) == "NOERROR 192.0.2.1"
    finally:
        edge.stop()


def answer(message: dns.message.Message) -> str:
    addresses = sorted(r.to_text() for rrset in message.answer for r in rrset if rrset.rdtype in (1, 28))
    return " ".join([rcode_name(message), *addresses])
