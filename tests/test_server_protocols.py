"""blockd.server: the UDP and TCP listeners, with in-memory transports and a task.Clock.

The resolver is a hand-written fake whose answer depends on the query bytes:
  b"defer..."  a Deferred the test fires        b"drop..."  None (no answer)
  b"boom..."   raises                            anything else: b"A:" + query, at once
A raised or failed query gets the fake's `failed` answer, b"FAILED:" + query (the real one is
SERVFAIL: tests/test_query_errors.py).
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransportWithDisconnection

from blockd.limits import ClientLimits, Kind, KindLimits, LimitSettings
from blockd.server import DNSDatagramProtocol, DNSStreamFactory, DNSStreamProtocol, StreamSettings

IDLE = 10.0
MESSAGE_TIMEOUT = 3.0
PEER = "192.0.2.7"


class FakeMetrics:
    def __init__(self) -> None:
        self.drops: list[str] = []
        self.limited: list[str] = []

    def count_drop(self, reason: str) -> None:
        self.drops.append(reason)

    def count_limited(self, reason: str) -> None:
        self.limited.append(reason)


class FakeResolver:
    def __init__(self) -> None:
        self.metrics = FakeMetrics()
        self.calls: list[tuple[bytes, str, str]] = []
        self.deferreds: dict[bytes, defer.Deferred[bytes | None]] = {}
        self.failures: list[tuple[bytes, str]] = []
        self.clock: task.Clock | None = None  # the limits' clock (the test's)

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

    def failed(self, data: bytes, client: str, exc: BaseException) -> bytes | None:
        self.failures.append((data, type(exc).__name__))
        return b"FAILED:" + data

    def client_kind(self, client: str) -> Kind:
        return Kind.CLIENT


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
    settings = StreamSettings(idle_timeout=IDLE, max_connections=3, message_timeout=MESSAGE_TIMEOUT)
    return DNSStreamFactory(resolver, settings, clock=clock)  # type: ignore[arg-type]


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


def test_no_answer_writes_nothing_and_a_failed_answer_is_answered_as_failed(
    conn: Connection, resolver: FakeResolver
) -> None:
    conn.send(frame(b"drop-me") + frame(b"defer-none") + frame(b"defer-fail"))
    resolver.deferreds[b"defer-none"].callback(None)
    resolver.deferreds[b"defer-fail"].errback(RuntimeError("upstream client bug"))
    assert conn.answers() == [b"FAILED:defer-fail"]
    assert resolver.failures == [(b"defer-fail", "RuntimeError")]
    assert conn.protocol.pending == 0
    conn.send(frame(b"after"))
    assert conn.answers() == [b"FAILED:defer-fail", b"A:after"]
    assert conn.open


def test_a_handler_exception_is_answered_and_does_not_kill_the_connection(conn: Connection) -> None:
    conn.send(frame(b"boom") + frame(b"next"))
    assert conn.answers() == [b"FAILED:boom", b"A:next"]
    conn.send(frame(b"boom again"))
    conn.send(frame(b"later"))
    assert conn.answers() == [b"FAILED:boom", b"A:next", b"FAILED:boom again", b"A:later"]
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


def test_at_the_cap_the_longest_idle_connection_makes_room(
    factory: DNSStreamFactory, clock: task.Clock, resolver: FakeResolver
) -> None:
    first, second, third = (Connection(factory) for _ in range(3))
    first.send(frame(b"defer-busy"))  # not idle: a query is being answered
    clock.advance(1)
    third.send(frame(b"q"))  # active more recently than second
    newcomer = Connection(factory)
    assert newcomer.open and not newcomer.transport.disconnected
    assert second.transport.disconnected, "the longest-idle connection was not the one closed"
    assert first.open and third.open
    assert resolver.metrics.limited == ["tcp_evicted"]


def test_at_the_cap_with_every_connection_busy_a_new_one_is_refused(
    factory: DNSStreamFactory, resolver: FakeResolver
) -> None:
    busy = [Connection(factory) for _ in range(3)]
    for n, connection in enumerate(busy):
        connection.send(frame(b"defer-%d" % n))
    extra = Connection(factory)
    assert extra.transport.disconnected
    assert all(c.open and not c.transport.disconnected for c in busy)
    assert factory.connections == 3
    assert resolver.metrics.limited == ["tcp_full"]


def test_a_client_over_its_own_connection_cap_is_refused_while_others_connect(
    resolver: FakeResolver, clock: task.Clock
) -> None:
    limits = ClientLimits(LimitSettings(client=KindLimits(qps=0, burst=1, upstream_in_flight=0, tcp_connections=2)))
    factory = DNSStreamFactory(resolver, StreamSettings(max_connections=100), limits, clock=clock)  # type: ignore[arg-type]
    mine = [Connection(factory) for _ in range(3)]
    assert [c.transport.disconnected for c in mine] == [False, False, True]
    other = Connection(factory, peer="192.0.2.99")
    assert not other.transport.disconnected
    assert resolver.metrics.limited == ["tcp_connections"]
    mine[0].transport.loseConnection()
    assert not Connection(factory).transport.disconnected, "a closed connection's slot was not given back"


def test_many_pending_queries_pause_reading_until_answers_go_out(
    conn: Connection, resolver: FakeResolver, factory: DNSStreamFactory
) -> None:
    factory.settings = StreamSettings(max_pending=2)
    conn.send(frame(b"defer-1"))
    assert conn.transport.producerState == "producing"
    conn.send(frame(b"defer-2"))
    assert conn.transport.producerState == "paused"
    resolver.deferreds[b"defer-1"].callback(b"one")
    assert conn.transport.producerState == "producing"
    assert conn.answers() == [b"one"]


def test_pipelined_queries_beyond_the_bound_wait_unread(
    conn: Connection, resolver: FakeResolver, factory: DNSStreamFactory
) -> None:
    factory.settings = StreamSettings(max_pending=4)
    conn.send(b"".join(frame(b"defer-%d" % n) for n in range(10)))
    assert len(resolver.calls) == 4, "more queries taken on than the pipelining bound"
    assert conn.transport.producerState == "paused"
    resolver.deferreds[b"defer-0"].callback(b"zero")
    assert len(resolver.calls) == 5
    for n in range(1, 10):
        resolver.deferreds[b"defer-%d" % n].callback(b"a%d" % n)
    assert len(conn.answers()) == 10
    assert conn.transport.producerState == "producing"


def test_one_connection_answers_a_batch_per_reactor_turn(
    conn: Connection, resolver: FakeResolver, factory: DNSStreamFactory, clock: task.Clock
) -> None:
    factory.settings = StreamSettings(batch=8)
    conn.send(b"".join(frame(b"q%d" % n) for n in range(20)))
    assert len(conn.answers()) == 8, "more than one batch answered in one reactor turn"
    assert conn.transport.producerState == "paused"
    clock.advance(0)  # later turns (task.Clock runs the re-scheduled batches in one advance)
    assert len(conn.answers()) == 20
    assert conn.transport.producerState == "producing"


def test_the_idle_timer_counts_from_the_last_complete_message_not_the_last_byte(
    conn: Connection, clock: task.Clock, resolver: FakeResolver
) -> None:
    partial = frame(b"slow-query")
    for byte in range(2):  # one byte a second, never a whole message
        conn.send(partial[byte : byte + 1])
        clock.advance(1)
    assert conn.open
    conn.send(partial[2:3])
    clock.advance(MESSAGE_TIMEOUT - 2)
    assert conn.transport.disconnected, "a message trickled in for longer than its deadline"
    assert resolver.metrics.limited == ["tcp_message_timeout"]
    assert resolver.calls == []


def test_a_message_completed_within_its_deadline_is_answered(conn: Connection, clock: task.Clock) -> None:
    whole = frame(b"slow-but-ok")
    conn.send(whole[:3])
    clock.advance(MESSAGE_TIMEOUT - 0.5)
    conn.send(whole[3:])
    clock.advance(1)
    assert conn.open
    assert conn.answers() == [b"A:slow-but-ok"]


def test_a_zero_length_frame_ends_the_connection(conn: Connection, resolver: FakeResolver) -> None:
    conn.send(frame(b"first") + frame(b"") + frame(b"after"))
    assert conn.answers() == [b"A:first"]
    assert conn.transport.disconnected
    assert resolver.metrics.limited == ["tcp_empty_frame"]


def test_a_client_that_does_not_read_is_not_read_and_then_closed(
    conn: Connection, resolver: FakeResolver, factory: DNSStreamFactory
) -> None:
    factory.settings = StreamSettings(write_buffer=1000)
    conn.send(frame(b"defer-a") + frame(b"defer-b"))
    conn.protocol.pauseProducing()  # what the transport does when its write buffer is full
    assert conn.transport.producerState == "paused"
    conn.send(frame(b"q-while-stalled"))  # already in flight from the kernel: kept, not answered
    assert len(resolver.calls) == 2
    resolver.deferreds[b"defer-a"].callback(b"x" * 600)
    assert conn.open
    resolver.deferreds[b"defer-b"].callback(b"y" * 600)
    assert conn.transport.disconnected, "answers piled up for a client that does not read"
    assert resolver.metrics.limited == ["tcp_write_buffer"]


def test_a_stalled_client_that_reads_again_is_answered(conn: Connection, resolver: FakeResolver) -> None:
    conn.protocol.pauseProducing()
    conn.send(frame(b"waiting"))
    assert conn.answers() == []
    conn.protocol.resumeProducing()
    assert conn.answers() == [b"A:waiting"]
    assert conn.transport.producerState == "producing"


def test_a_client_over_its_rate_is_read_later_not_dropped(resolver: FakeResolver, clock: task.Clock) -> None:
    limits = ClientLimits(LimitSettings(client=KindLimits(qps=10, burst=3, upstream_in_flight=0, tcp_connections=0)))
    resolver.clock = clock
    factory = DNSStreamFactory(resolver, StreamSettings(), limits, clock=clock)  # type: ignore[arg-type]
    conn = Connection(factory)
    conn.send(b"".join(frame(b"q%d" % n) for n in range(6)))
    assert len(conn.answers()) == 3
    assert conn.transport.producerState == "paused"
    assert "tcp_throttled" in resolver.metrics.limited
    clock.advance(0.1)
    assert len(conn.answers()) == 4
    clock.advance(0.2)
    assert conn.answers() == [b"A:q%d" % n for n in range(6)]
    assert conn.transport.producerState == "producing"


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


def test_udp_exceptions_in_handle_are_answered_and_do_not_propagate(udp, resolver: FakeResolver) -> None:
    protocol, transport = udp
    protocol.datagramReceived(b"boom", ADDR)
    protocol.datagramReceived(b"next", ADDR)
    assert transport.written == [(b"FAILED:boom", ADDR), (b"A:next", ADDR)]
    assert resolver.failures == [(b"boom", "ValueError")]


def test_udp_a_failed_deferred_is_answered_and_consumed(udp, resolver: FakeResolver) -> None:
    protocol, transport = udp
    protocol.datagramReceived(b"defer-fail", ADDR)
    deferred = resolver.deferreds[b"defer-fail"]
    deferred.errback(RuntimeError("upstream client bug"))
    assert transport.written == [(b"FAILED:defer-fail", ADDR)]
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
