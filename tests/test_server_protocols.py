"""blockd.server: the UDP and TCP listeners, with in-memory transports and a task.Clock.

The resolver is a hand-written fake whose answer depends on the query bytes:
  b"defer..."  a Deferred the test fires        b"drop..."  None (no answer)
  b"boom..."   raises                            anything else: b"A:" + query, at once
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransportWithDisconnection

from blockd.server import DNSDatagramProtocol, DNSStreamFactory, DNSStreamProtocol

IDLE = 10.0
PEER = "192.0.2.7"


class FakeMetrics:
    def __init__(self) -> None:
        self.drops: list[str] = []

    def count_drop(self, reason: str) -> None:
        self.drops.append(reason)


class FakeResolver:
    def __init__(self) -> None:
        self.metrics = FakeMetrics()
        self.calls: list[tuple[bytes, str, str]] = []
        self.deferreds: dict[bytes, defer.Deferred[bytes | None]] = {}

    def handle(
        self, data: bytes, client: str, transport: str, port: int = 0
    ) -> bytes | defer.Deferred[bytes | None] | None:
        self.calls.append((data, client, transport))
        if data.startswith(b"boom"):
            raise ValueError("resolver bug")
        if data.startswith(b"drop"):
            return None
        if data.startswith(b"defer"):
            deferred: defer.Deferred[bytes | None] = defer.Deferred()
            self.deferreds[data] = deferred
            return deferred
        return answer_for(data)


def answer_for(query: bytes) -> bytes:
    return b"A:" + query


def frame(message: bytes) -> bytes:
    return struct.pack("!H", len(message)) + message


def frames(data: bytes) -> list[bytes]:
    """Split a TCP byte stream into its length-prefixed messages; it must end on a boundary."""
    out = []
    while data:
        assert len(data) >= 2
        (length,) = struct.unpack_from("!H", data)
        assert len(data) >= 2 + length, "a partial frame was written"
        out.append(data[2 : 2 + length])
        data = data[2 + length :]
    return out


# --- TCP ---------------------------------------------------------------------------------------


class Connection:
    def __init__(self, factory: DNSStreamFactory, peer: str = PEER) -> None:
        self.protocol = factory.buildProtocol(IPv4Address("TCP", peer, 40000))
        assert isinstance(self.protocol, DNSStreamProtocol)
        self.transport = StringTransportWithDisconnection(peerAddress=IPv4Address("TCP", peer, 40000))
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def answers(self) -> list[bytes]:
        return frames(self.transport.value())

    @property
    def open(self) -> bool:
        return self.transport.connected


@pytest.fixture
def resolver() -> FakeResolver:
    return FakeResolver()


@pytest.fixture
def clock() -> task.Clock:
    return task.Clock()


@pytest.fixture
def factory(resolver: FakeResolver, clock: task.Clock) -> DNSStreamFactory:
    return DNSStreamFactory(resolver, idle_timeout=IDLE, max_connections=3, clock=clock)  # type: ignore[arg-type]


@pytest.fixture
def conn(factory: DNSStreamFactory) -> Connection:
    return Connection(factory)


def test_a_frame_fed_byte_by_byte_is_answered_once_complete(conn: Connection, resolver: FakeResolver) -> None:
    data = frame(b"query-one") + frame(b"query-two")
    for index in range(len(data)):
        conn.send(data[index : index + 1])
        if index == len(frame(b"query-one")) - 2:
            assert conn.transport.value() == b"", "answered before the frame was complete"
    assert conn.answers() == [b"A:query-one", b"A:query-two"]
    assert resolver.calls == [(b"query-one", PEER, "tcp"), (b"query-two", PEER, "tcp")]


def test_several_frames_in_one_chunk_are_each_answered(conn: Connection) -> None:
    queries = [b"q%d" % n * (n + 1) for n in range(5)]
    conn.send(b"".join(frame(q) for q in queries))
    assert conn.answers() == [answer_for(q) for q in queries]


@pytest.mark.parametrize("seed", range(5))
def test_arbitrary_chunk_boundaries(conn: Connection, seed: int) -> None:
    rng = random.Random(seed)
    queries = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(20)]
    queries = [b"q" + q for q in queries]  # never one of the fake's special prefixes
    stream = b"".join(frame(q) for q in queries)
    at = 0
    while at < len(stream):
        step = rng.randrange(1, 64)
        conn.send(stream[at : at + step])
        at += step
    assert conn.answers() == [answer_for(q) for q in queries]


def test_a_large_frame_keeps_its_length_prefix(conn: Connection) -> None:
    query = b"x" * 60000
    conn.send(frame(query))
    written = conn.transport.value()
    assert struct.unpack_from("!H", written)[0] == len(answer_for(query))
    assert conn.answers() == [answer_for(query)]


def test_deferred_answers_are_written_when_they_fire_in_any_order(conn: Connection, resolver: FakeResolver) -> None:
    conn.send(frame(b"defer-1") + frame(b"defer-2") + frame(b"now"))
    assert conn.answers() == [b"A:now"]
    resolver.deferreds[b"defer-2"].callback(b"second")
    resolver.deferreds[b"defer-1"].callback(b"first")
    assert conn.answers() == [b"A:now", b"second", b"first"]
    assert conn.protocol.pending == 0
    assert conn.open


def test_no_answer_and_failed_answers_write_nothing_and_keep_the_connection(
    conn: Connection, resolver: FakeResolver
) -> None:
    conn.send(frame(b"drop-me") + frame(b"defer-none") + frame(b"defer-fail"))
    resolver.deferreds[b"defer-none"].callback(None)
    resolver.deferreds[b"defer-fail"].errback(RuntimeError("upstream client bug"))
    assert conn.transport.value() == b""
    assert conn.protocol.pending == 0
    conn.send(frame(b"after"))
    assert conn.answers() == [b"A:after"]
    assert conn.open


def test_a_handler_exception_does_not_kill_the_connection(conn: Connection) -> None:
    conn.send(frame(b"boom") + frame(b"next"))
    assert conn.answers() == [b"A:next"]
    conn.send(frame(b"boom again"))
    conn.send(frame(b"later"))
    assert conn.answers() == [b"A:next", b"A:later"]
    assert conn.open


def test_an_answer_after_the_client_left_is_not_written(conn: Connection, resolver: FakeResolver) -> None:
    conn.send(frame(b"defer-slow"))
    conn.transport.loseConnection()
    resolver.deferreds[b"defer-slow"].callback(b"too late")
    assert conn.transport.value() == b""


def test_idle_connection_closes_after_the_timeout(conn: Connection, clock: task.Clock, factory) -> None:
    assert factory.connections == 1
    clock.advance(IDLE - 0.001)
    assert conn.open
    clock.advance(0.001)
    assert not conn.open
    assert factory.connections == 0
    assert clock.getDelayedCalls() == []


def test_each_query_restarts_the_idle_timer(conn: Connection, clock: task.Clock) -> None:
    clock.advance(IDLE - 1)
    conn.send(frame(b"keepalive"))
    clock.advance(IDLE - 1)
    assert conn.open
    clock.advance(1)
    assert not conn.open


def test_a_query_answered_before_the_timeout_restarts_the_idle_timer(
    conn: Connection, clock: task.Clock, resolver: FakeResolver
) -> None:
    conn.send(frame(b"defer-q"))
    clock.advance(5)
    resolver.deferreds[b"defer-q"].callback(b"answer")
    clock.advance(IDLE - 0.001)
    assert conn.open
    clock.advance(0.001)
    assert not conn.open
    assert conn.answers() == [b"answer"]


def test_the_idle_timeout_never_closes_a_connection_with_a_pending_query(
    conn: Connection, clock: task.Clock, resolver: FakeResolver
) -> None:
    conn.send(frame(b"defer-q"))
    clock.advance(IDLE)
    assert conn.open, "closed while a query was still being answered"
    clock.advance(IDLE * 3)
    assert conn.open
    resolver.deferreds[b"defer-q"].callback(b"answer")
    assert conn.answers() == [b"answer"]


def test_after_a_pending_query_completes_the_connection_closes_after_the_idle_timeout(
    conn: Connection, clock: task.Clock, resolver: FakeResolver, factory: DNSStreamFactory
) -> None:
    # Regression: TimeoutMixin forgets its timer before calling timeoutConnection, so re-arming
    # there with resetTimeout() was a no-op and such a connection stayed open forever.
    conn.send(frame(b"defer-q"))
    clock.advance(IDLE)  # the idle timer fires while the query is pending
    clock.advance(2)
    resolver.deferreds[b"defer-q"].callback(b"answer")
    clock.advance(IDLE - 0.001)
    assert conn.open
    clock.advance(0.001)
    assert not conn.open
    assert factory.connections == 0


def test_connections_beyond_max_connections_are_aborted(factory: DNSStreamFactory, clock: task.Clock) -> None:
    kept = [Connection(factory) for _ in range(factory.max_connections)]
    extra = Connection(factory)
    assert extra.transport.disconnected, "the connection over the limit was not aborted"
    assert all(c.open and not c.transport.disconnected for c in kept)
    assert factory.connections == factory.max_connections
    assert len(clock.getDelayedCalls()) == factory.max_connections  # no idle timer for the aborted one

    kept[0].transport.loseConnection()
    again = Connection(factory)
    assert again.open and not again.transport.disconnected
    assert factory.connections == factory.max_connections


def test_many_pending_queries_pause_reading_until_answers_go_out(conn: Connection, resolver: FakeResolver) -> None:
    conn.protocol.max_pending = 2
    conn.send(frame(b"defer-1"))
    assert conn.transport.producerState == "producing"
    conn.send(frame(b"defer-2"))
    assert conn.transport.producerState == "paused"
    resolver.deferreds[b"defer-1"].callback(b"one")
    assert conn.transport.producerState == "producing"
    assert conn.answers() == [b"one"]


# --- UDP ---------------------------------------------------------------------------------------


class FakeDatagramTransport:
    def __init__(self) -> None:
        self.written: list[tuple[bytes, Any]] = []
        self.error: OSError | None = None

    def write(self, data: bytes, addr: Any) -> None:
        if self.error is not None:
            raise self.error
        self.written.append((data, addr))


ADDR = ("192.0.2.9", 5353)


@pytest.fixture
def udp(resolver: FakeResolver) -> tuple[DNSDatagramProtocol, FakeDatagramTransport]:
    protocol = DNSDatagramProtocol(resolver)  # type: ignore[arg-type]
    transport = FakeDatagramTransport()
    protocol.makeConnection(transport)  # startProtocol must cope with a transport without a socket
    return protocol, transport


def test_udp_bytes_are_answered_to_the_sender(udp, resolver: FakeResolver) -> None:
    protocol, transport = udp
    protocol.datagramReceived(b"query", ADDR)
    assert transport.written == [(b"A:query", ADDR)]
    assert resolver.calls == [(b"query", "192.0.2.9", "udp")]


def test_udp_client_is_the_host_of_an_ipv6_address(udp, resolver: FakeResolver) -> None:
    protocol, transport = udp
    addr = ("2001:db8::5", 5353, 0, 0)
    protocol.datagramReceived(b"query", addr)
    assert resolver.calls[0][1] == "2001:db8::5"
    assert transport.written == [(b"A:query", addr)]


def test_udp_none_is_dropped(udp) -> None:
    protocol, transport = udp
    protocol.datagramReceived(b"drop", ADDR)
    assert transport.written == []


def test_udp_deferred_is_answered_when_it_fires(udp, resolver: FakeResolver) -> None:
    protocol, transport = udp
    protocol.datagramReceived(b"defer-a", ADDR)
    protocol.datagramReceived(b"defer-b", ("192.0.2.10", 53))
    protocol.datagramReceived(b"defer-none", ADDR)
    assert transport.written == []
    resolver.deferreds[b"defer-b"].callback(b"answer b")
    resolver.deferreds[b"defer-a"].callback(b"answer a")
    resolver.deferreds[b"defer-none"].callback(None)
    assert transport.written == [(b"answer b", ("192.0.2.10", 53)), (b"answer a", ADDR)]


def test_udp_exceptions_in_handle_do_not_propagate(udp) -> None:
    protocol, transport = udp
    protocol.datagramReceived(b"boom", ADDR)
    protocol.datagramReceived(b"next", ADDR)
    assert transport.written == [(b"A:next", ADDR)]


def test_udp_a_failed_deferred_is_consumed(udp, resolver: FakeResolver) -> None:
    protocol, transport = udp
    protocol.datagramReceived(b"defer-fail", ADDR)
    deferred = resolver.deferreds[b"defer-fail"]
    deferred.errback(RuntimeError("upstream client bug"))
    assert transport.written == []
    results: list[object] = []
    deferred.addBoth(results.append)
    assert results == [None], "the failure was left unhandled in the Deferred"


@pytest.mark.parametrize("query", [b"now", b"defer-x"])
def test_udp_send_errors_are_counted_not_raised(udp, resolver: FakeResolver, query: bytes) -> None:
    protocol, transport = udp
    transport.error = OSError(105, "No buffer space available")
    protocol.datagramReceived(query, ADDR)
    if query in resolver.deferreds:
        resolver.deferreds[query].callback(b"late answer")
    assert transport.written == []
    assert resolver.metrics.drops == ["send_error"]
