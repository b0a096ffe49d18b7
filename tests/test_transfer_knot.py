"""blockd.transfer.ZoneTransfer: against an in-memory fake primary, then against a real Knot DNS.

The first half runs ZoneTransfer on a MemoryReactorClock with StringTransport connections: the
fake primary reads the query blockd wrote, signs its answers with dnspython under that query's
MAC, and the clock runs the timeouts.  No socket, no sleep.

The second half starts Debian's knotd on 127.0.0.1 with its own config, zone file, TSIG key,
rundir and storage in a temp dir, and checks what blockd gets from it: AXFR with TSIG, a wrong
key refused with the reason, and IXFR of an edit (Knot computes the difference itself from the
reloaded zone file: zonefile-load difference, journal-content changes).  Each knotd is stopped
by its PID when its test ends, passed or failed.  Skipped with the reason when knotd is missing.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.rdatatype
import pytest
from twisted.internet import defer
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from blockd.config import Endpoint
from blockd.framing import FrameReader, frame
from blockd.transfer import SecondaryZone, TransferError, ZoneTransfer
from blockd.tsig_key import TsigKey, load_key_file, to_dnspython
from blockd.xfr import FullZone, Incremental, Refused, TsigError, UpToDate, XfrError, XfrResult
from tests.daemon import free_port
from tests.knot import KNOT_SERVER, Knot, needs_knot
from tests.test_xfr import AXFR, KEY, NOW, RPZ_KEYS, ZONE, response, sign_chain, soa, split

PRIMARY = Endpoint("192.0.2.53", 53)

# --- ZoneTransfer in memory --------------------------------------------------------------------


@dataclass
class Connection:
    reactor: MemoryReactorClock
    transfer: ZoneTransfer
    deferred: defer.Deferred[XfrResult]
    transport: StringTransport
    protocol: Any

    def query(self) -> dns.message.Message:
        (wire,) = FrameReader().feed(self.transport.value())
        keyring = to_dnspython(self.transfer.key) if self.transfer.key else None
        return dns.message.from_wire(wire, keyring=keyring)

    def send(self, wires: list[bytes], chunk: int = 0) -> None:
        stream = b"".join(frame(wire) for wire in wires)
        step = chunk or len(stream) or 1
        for at in range(0, len(stream), step):
            self.protocol.dataReceived(stream[at : at + step])

    def outcome(self) -> object:
        results: list[object] = []
        self.deferred.addBoth(results.append)
        assert results, "the transfer has not finished"
        result = results[0]
        return result.value if isinstance(result, Failure) else result


def connect(serial: int | None = None, key: TsigKey | None = None, **options: Any) -> Connection:
    reactor = MemoryReactorClock()
    reactor.advance(NOW)
    transfer = ZoneTransfer(reactor, ZONE, PRIMARY, serial, key, query_id=QID, **options)
    deferred = transfer.start()
    host, port, factory, timeout, _bind = reactor.tcpClients[0]
    assert (host, port) == (PRIMARY.host, PRIMARY.port)
    assert timeout == transfer.connect_timeout
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return Connection(reactor, transfer, deferred, transport, protocol)


QID = 4242


def test_axfr_over_a_connection() -> None:
    conn = connect()
    query = conn.query()
    assert query.id == QID and query.question[0].rdtype == dns.rdatatype.AXFR
    conn.send(split(AXFR, [2, 2]))
    result = conn.outcome()
    assert isinstance(result, FullZone) and [r[0] for r in result.records] == RPZ_KEYS
    assert conn.transport.disconnecting  # closed once complete
    assert conn.transfer.messages == 3 and conn.transfer.bytes > 0
    assert not conn.reactor.getDelayedCalls()  # deadline and idle timer gone


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_any_chunking_of_the_stream(chunk: int) -> None:
    conn = connect()
    conn.send(split(AXFR, [3]), chunk=chunk)
    assert isinstance(conn.outcome(), FullZone)


def test_signed_ixfr_over_a_connection() -> None:
    conn = connect(serial=2, key=KEY)
    query = conn.query()
    assert query.had_tsig and query.question[0].rdtype == dns.rdatatype.IXFR
    assert query.authority[0][0].serial == 2
    records = [soa(3), soa(2), RPZ_RECORD, soa(3), soa(3)]
    conn.send(sign_chain(split(records, [2], qtype="IXFR"), KEY, query.mac))
    result = conn.outcome()
    assert isinstance(result, Incremental) and (result.old_serial, result.new_serial) == (2, 3)


RPZ_RECORD = (f"tiktok.com.{ZONE}.", 300, "CNAME", ".")


def test_a_bad_signature_fails_the_transfer() -> None:
    conn = connect(key=KEY)
    conn.send(sign_chain([response(AXFR)], KEY, b"\x00" * 32))
    error = conn.outcome()
    assert isinstance(error, TsigError) and "BADSIG" in error.reason
    assert conn.transport.disconnecting


def test_a_refusal() -> None:
    conn = connect()
    conn.send([response([], rcode=5)])
    error = conn.outcome()
    assert isinstance(error, Refused) and error.rcode == 5


def test_idle_timeout() -> None:
    conn = connect(idle_timeout=30.0)
    conn.send([response(AXFR[:2])])
    conn.reactor.advance(29)
    conn.send([response(AXFR[2:3], question=False)])
    conn.reactor.advance(29)
    assert not conn.deferred.called
    conn.reactor.advance(1)
    error = conn.outcome()
    assert isinstance(error, TransferError) and error.result == "timeout"
    assert error.reason == "timeout: idle for 30 s"


def test_deadline_for_the_whole_transfer() -> None:
    conn = connect(idle_timeout=30.0, deadline=100.0)
    conn.send([response(AXFR[:1])])
    for record in AXFR[1:4]:
        conn.reactor.advance(25)
        conn.send([response([record], question=False)])
    conn.reactor.advance(25)
    error = conn.outcome()
    assert isinstance(error, TransferError) and error.reason == "timeout: not done in 100 s"


def test_byte_cap() -> None:
    conn = connect(max_bytes=100)
    conn.send([response(AXFR[:3])])
    error = conn.outcome()
    assert isinstance(error, TransferError) and error.result == "too_big"
    assert "larger than 100 bytes" in error.reason


def test_connection_closed_before_the_end() -> None:
    conn = connect()
    conn.send([response(AXFR[:3])])
    conn.protocol.connectionLost(Failure(ConnectionError("reset")))
    error = conn.outcome()
    assert isinstance(error, XfrError) and "closed before the transfer was complete" in error.reason


def test_a_malformed_message() -> None:
    conn = connect()
    conn.send([response(AXFR)[:-3]])
    error = conn.outcome()
    assert isinstance(error, XfrError) and error.reason == "record data runs past the end of the message"


def test_cannot_connect() -> None:
    reactor = MemoryReactorClock()
    deferred = ZoneTransfer(reactor, ZONE, PRIMARY, None, None).start()
    factory = reactor.tcpClients[0][2]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError("Connection refused")))
    failures: list[Failure] = []
    deferred.addErrback(failures.append)
    assert isinstance(failures[0].value, TransferError) and failures[0].value.result == "unreachable"
    assert not reactor.getDelayedCalls()


def test_cancel_closes_the_connection() -> None:
    conn = connect()
    conn.deferred.cancel()
    assert isinstance(conn.outcome(), defer.CancelledError)
    assert conn.transport.disconnecting and not conn.reactor.getDelayedCalls()


# --- against Knot ------------------------------------------------------------------------------

KNOT_ZONE = "rpz.knot.test"
SECRET = base64.b64encode(b"blockd-knot-test-secret-32-bytes").decode()

ZONE_FILE = """\
$TTL 300
@ SOA ns.rpz.knot.test. hostmaster.rpz.knot.test. {serial} 3600 600 86400 60
@ NS ns
ns A 127.0.0.1
tiktok.com CNAME .
*.tiktok.com CNAME .
bytedance.com CNAME *.
douyin.com CNAME rpz-drop.
{extra}"""

KNOT_CONF = (
    KNOT_SERVER
    + """\
key:
  - id: rpz-key
    algorithm: hmac-sha256
    secret: {secret}
acl:
  - id: transfer
    address: 127.0.0.1
    key: rpz-key
    action: transfer
zone:
  - domain: {zone}.
    storage: "{dir}"
    file: "{zone}.zone"
    acl: transfer
    # Reloading the edited zone file computes the difference and journals it, so IXFR works.
    zonefile-load: difference
    journal-content: changes
    zonefile-sync: -1
    semantic-checks: off
"""
)


@dataclass
class SignedKnot(Knot):
    key: TsigKey | None = None  # the key blockd signs with, read from a BIND key file


@pytest.fixture
def knot(tmp_path: Path) -> Iterator[SignedKnot]:
    (tmp_path / "run").mkdir()
    (tmp_path / "storage").mkdir()
    port = free_port()
    conf = tmp_path / "knot.conf"
    conf.write_text(KNOT_CONF.format(dir=tmp_path, port=port, secret=SECRET, zone=KNOT_ZONE))
    # blockd reads the same key from a BIND key file, as an operator would configure it.
    (tmp_path / "rpz.key").write_text(f'key "rpz-key" {{\n    algorithm hmac-sha256;\n    secret "{SECRET}";\n}};\n')
    server = SignedKnot(tmp_path, port, conf, KNOT_ZONE, ZONE_FILE, key=load_key_file(tmp_path / "rpz.key"))
    server.write_zone(1)
    server.start()
    try:
        server.wait_for_serial(1)
        yield server
    finally:
        server.stop()


def transfer_from(knot: Knot, serial: int | None, key: TsigKey | None) -> object:
    """One ZoneTransfer from the real knotd, on a reactor of its own; the result or the error."""
    reactor = SelectReactor()
    outcome: list[object] = []
    deferred = ZoneTransfer(reactor, KNOT_ZONE, Endpoint("127.0.0.1", knot.port), serial, key, deadline=20).start()

    def done(result: object) -> None:
        outcome.append(result.value if isinstance(result, Failure) else result)
        reactor.callLater(0, reactor.stop)

    deferred.addBoth(done)
    reactor.callLater(30, reactor.stop)
    reactor.run(installSignalHandlers=False)
    assert outcome, "the transfer never finished"
    return outcome[0]


BASE = {
    (KNOT_ZONE, dns.rdatatype.NS, b"\x02ns\x03rpz\x04knot\x04test\x00"),
    (f"ns.{KNOT_ZONE}", dns.rdatatype.A, b"\x7f\x00\x00\x01"),
    (f"tiktok.com.{KNOT_ZONE}", dns.rdatatype.CNAME, b"\x00"),
    (f"*.tiktok.com.{KNOT_ZONE}", dns.rdatatype.CNAME, b"\x00"),
    (f"bytedance.com.{KNOT_ZONE}", dns.rdatatype.CNAME, b"\x01*\x00"),
    (f"douyin.com.{KNOT_ZONE}", dns.rdatatype.CNAME, b"\x08rpz-drop\x00"),
}


def triples(records: list[tuple[str, int, int, int, bytes]]) -> set[tuple[str, int, bytes]]:
    return {(owner, rtype, rdata) for owner, rtype, _rclass, _ttl, rdata in records}


@needs_knot
def test_knot_axfr_with_tsig(knot: Knot) -> None:
    result = transfer_from(knot, None, knot.key)
    assert isinstance(result, FullZone), result
    assert result.serial == 1
    assert triples(result.records) == BASE
    assert all(rclass == 1 and ttl == 300 for _o, _t, rclass, ttl, _r in result.records)


@needs_knot
@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (
            TsigKey("rpz-key", "hmac-sha256", b"not the secret knot has"),
            "primary rejected our TSIG: bad signature (BADSIG)",
        ),
        (TsigKey("unknown-key", "hmac-sha256", b"x" * 32), "primary rejected our TSIG: unknown key (BADKEY)"),
    ],
)
def test_knot_refuses_a_wrong_key(knot: Knot, key: TsigKey, reason: str) -> None:
    error = transfer_from(knot, None, key)
    assert isinstance(error, TsigError), error
    assert error.reason == reason


@needs_knot
def test_knot_refuses_an_unsigned_transfer(knot: Knot) -> None:
    error = transfer_from(knot, None, None)
    assert isinstance(error, Refused), error
    assert error.reason == "primary answered NOTAUTH"


@needs_knot
def test_knot_ixfr_of_an_edit(knot: Knot) -> None:
    text = ZONE_FILE.format(serial=2, extra="tiktokv.com CNAME .\n").replace("bytedance.com CNAME *.", "")
    (knot.dir / f"{KNOT_ZONE}.zone").write_text(text)
    assert "OK" in knot.knotc("zone-reload", f"{KNOT_ZONE}.")
    knot.wait_for_serial(2)
    result = transfer_from(knot, 1, knot.key)
    assert isinstance(result, Incremental), result
    assert (result.old_serial, result.new_serial) == (1, 2)
    ((deleted, added),) = result.steps
    assert triples(deleted) == {(f"bytedance.com.{KNOT_ZONE}", dns.rdatatype.CNAME, b"\x01*\x00")}
    assert triples(added) == {(f"tiktokv.com.{KNOT_ZONE}", dns.rdatatype.CNAME, b"\x00")}
    # Up to date at the new serial; from a serial Knot has no history for, the whole zone.
    assert transfer_from(knot, 2, knot.key) == UpToDate(2, result.soa)
    full = transfer_from(knot, 0, knot.key)
    assert isinstance(full, FullZone) and full.serial == 2


@needs_knot
def test_knot_secondary_zone_follows_a_reload(knot: Knot) -> None:
    """SecondaryZone on a real reactor: AXFR at start, then after an edit and NOTIFY, an IXFR."""
    reactor = SelectReactor()
    results: list[tuple[XfrResult, Endpoint]] = []
    failures: list[str] = []
    primaries = [Endpoint("127.0.0.1", free_port()), Endpoint("127.0.0.1", knot.port)]  # the first is down

    def on_result(result: XfrResult, primary: Endpoint) -> None:
        results.append((result, primary))
        if len(results) == 1:
            (knot.dir / f"{KNOT_ZONE}.zone").write_text(ZONE_FILE.format(serial=5, extra="tiktokcdn.com CNAME .\n"))
            knot.knotc("zone-reload", f"{KNOT_ZONE}.")
            knot.wait_for_serial(5)
            reactor.callLater(0, zone.notify, "127.0.0.1")
        else:
            reactor.callLater(0, reactor.stop)

    zone = SecondaryZone(
        reactor,
        KNOT_ZONE,
        primaries,
        knot.key,
        on_result,
        lambda reason, p: failures.append(reason),
        jitter=lambda: 0.0,
    )
    zone.startService()
    reactor.callLater(30, reactor.stop)
    reactor.run(installSignalHandlers=False)
    zone.stopService()
    assert [type(result) for result, _ in results] == [FullZone, Incremental], (results, failures, knot.log())
    assert all(primary == primaries[1] for _, primary in results)
    assert failures and failures[0].startswith("cannot connect")
    assert zone.serial == 5
    assert zone.transfers[("axfr", "full")] == 1 and zone.transfers[("ixfr", "incremental")] == 1
