"""blockd.upstream: answer matching, and Upstreams on a MemoryReactorClock.

The "upstreams" are plain UDP sockets the test binds on 127.0.0.1 and answers by hand, so no
packet leaves loopback.  The reactor is fake: time moves only with advance(), and an answer is
read by calling the registered reader's doRead(), as a real reactor would when the socket
becomes readable (or its connectionLost(), as the epoll reactor does for an ICMP error).
Covered: one deadline per query whatever the number of upstreams, failover after the rto or at
once on ICMP refused / SERVFAIL / REFUSED, the late answer of an earlier attempt still winning,
health (down, skipped, probed, back), the strategies, the socket pool (bounded, IDs unique per
socket, rotation by count and age), the tap and the record callback.
"""

from __future__ import annotations

import itertools
import random
import select
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from dnslib import QTYPE, RR, A, DNSRecord
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from blockd.config import Endpoint
from blockd.upstream import UpstreamError, Upstreams, answer_matches
from blockd.wire import FLAG_QR, FLAG_TC

TIMEOUT = 2.0


def wire_question(name: bytes = b"\x07example\x03com\x00", qtype: int = 1, qclass: int = 1) -> bytes:
    return name + struct.pack("!HH", qtype, qclass)


def header(qid: int = 0x1234, flags: int = FLAG_QR | 0x0180, qdcount: int = 1) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qdcount, 0, 0, 0)


# --- answer_matches ----------------------------------------------------------------------------


def test_answer_matches_its_own_question() -> None:
    question = wire_question()
    assert answer_matches(header() + question, 0x1234, question)


def test_answer_with_records_after_the_question_matches() -> None:
    question = wire_question()
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + bytes([192, 0, 2, 1])
    answer = struct.pack("!HHHHHH", 0x1234, FLAG_QR, 1, 1, 0, 0) + question + record
    assert answer_matches(answer, 0x1234, question)


def test_the_name_is_compared_case_insensitively() -> None:
    question = wire_question(b"\x07ExAmPlE\x03cOm\x00")
    answer = header() + wire_question(b"\x07eXaMpLe\x03COM\x00")
    assert answer_matches(answer, 0x1234, question)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (header(qid=0x1235) + wire_question(), "wrong ID"),
        (header(flags=0x0180) + wire_question(), "QR not set"),
        (header(qdcount=0) + wire_question(), "no question"),
        (header(qdcount=2) + wire_question() + wire_question(), "two questions"),
        (header() + wire_question(b"\x07example\x03org\x00"), "other name"),
        (header() + wire_question(b"\x08example1\x03com\x00"), "other name, same prefix"),
        (header() + wire_question(qtype=28), "other type"),
        (header() + wire_question(qclass=3), "other class"),
        (b"", "empty"),
        (b"\x12\x34\x81", "shorter than a header"),
        (header(), "header only"),
        (header() + wire_question()[:-1], "question cut short"),
    ],
)
def test_answers_that_do_not_match(answer: bytes, reason: str) -> None:
    assert not answer_matches(answer, 0x1234, wire_question()), reason


@pytest.mark.parametrize(("asked", "answered"), [(65, 97), (67, 99), (90, 122)])
def test_type_is_compared_exactly_even_when_its_bytes_look_like_letters(asked: int, answered: int) -> None:
    answer = header() + wire_question(qtype=answered)
    assert not answer_matches(answer, 0x1234, wire_question(qtype=asked))


def test_class_is_compared_exactly_even_when_its_bytes_look_like_letters() -> None:
    answer = header() + wire_question(qclass=0x0061)
    assert not answer_matches(answer, 0x1234, wire_question(qclass=0x0041))


# --- Upstreams on a fake reactor ---------------------------------------------------------------

FIRST_RTO = 0.376  # upstream_health's first rto (Unbound's)


class FakeUpstreamSocket:
    """A UDP socket on loopback that receives blockd's queries and answers only when told."""

    def __init__(self, port: int = 0) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", port))
        self.socket.settimeout(2.0)  # the query is already queued on loopback; this only bounds a bug
        self.endpoint = Endpoint("127.0.0.1", self.socket.getsockname()[1])

    @property
    def name(self) -> str:
        return str(self.endpoint)

    def receive(self) -> tuple[DNSRecord, bytes, Any]:
        data, source = self.socket.recvfrom(65535)
        return DNSRecord.parse(data), data, source

    def has_query(self) -> bool:
        return bool(select.select([self.socket], [], [], 0)[0])

    def answer(self, query: DNSRecord, source: Any, qid: int | None = None, tc: bool = False, rcode: int = 0) -> bytes:
        reply = query.reply()
        if rcode:
            reply.header.rcode = rcode
        else:
            reply.add_answer(RR(str(query.q.qname), QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
        if qid is not None:
            reply.header.id = qid
        if tc:
            reply.header.tc = 1
        data = reply.pack()
        self.socket.sendto(data, source)
        return data

    def close(self) -> None:
        self.socket.close()


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float | None]] = []

    def __call__(self, upstream: str, result: str, seconds: float | None) -> None:
        self.calls.append((upstream, result, seconds))

    def results(self) -> list[tuple[str, str]]:
        return [(upstream, result) for upstream, result, _ in self.calls]


def outcome(deferred: defer.Deferred[Any]) -> list[Any]:
    results: list[Any] = []
    deferred.addBoth(results.append)
    return results


def failure_of(deferred: defer.Deferred[Any]) -> Failure:
    results = outcome(deferred)
    assert len(results) == 1, "the Deferred has not fired"
    assert isinstance(results[0], Failure), f"expected a failure, got {results[0]!r}"
    return results[0]


def success_of(deferred: defer.Deferred[Any]) -> Any:
    results = outcome(deferred)
    assert len(results) == 1, "the Deferred has not fired"
    assert not isinstance(results[0], Failure), results[0]
    return results[0]


def reader_for(reactor: MemoryReactorClock, upstream: FakeUpstreamSocket) -> Any:
    """blockd's one socket connected to this upstream."""
    readers = [r for r in reactor.readers if r.socket.getpeername()[1] == upstream.endpoint.port]
    assert len(readers) == 1, f"{len(readers)} sockets to {upstream.name}"
    return readers[0]


def read_when_ready(reactor: MemoryReactorClock, upstream: FakeUpstreamSocket) -> None:
    reader = reader_for(reactor, upstream)
    assert select.select([reader], [], [], 2.0)[0], "the reply never reached blockd's socket"
    reader.doRead()


@pytest.fixture
def upstream_sockets() -> Iterator[list[FakeUpstreamSocket]]:
    sockets = [FakeUpstreamSocket(), FakeUpstreamSocket()]
    yield sockets
    for s in sockets:
        s.close()


@pytest.fixture
def reactor() -> Iterator[MemoryReactorClock]:
    fake = MemoryReactorClock()
    yield fake
    for reader in list(fake.readers):  # a failing test must not leak blockd's sockets
        reader.socket.close()


@pytest.fixture
def record() -> Recorder:
    return Recorder()


def make_upstreams(
    reactor: MemoryReactorClock, sockets: list[FakeUpstreamSocket], record: Recorder, **kwargs: Any
) -> Upstreams:
    kwargs.setdefault("pool_size", 1)  # one socket per upstream, so a test knows which one to read
    return Upstreams(reactor, [s.endpoint for s in sockets], TIMEOUT, record=record, **kwargs)


def query_bytes(name: str = "example.com", qid: int = 0xBEEF) -> tuple[bytes, bytes]:
    record = DNSRecord.question(name, "A")
    record.header.id = qid
    message = record.pack()
    return message, message[12:]


def assert_quiet(reactor: MemoryReactorClock, upstreams: Upstreams) -> None:
    """Nothing left behind: no query counted, no timer (deadline, rto or probe) pending."""
    assert upstreams.in_flight == 0
    assert reactor.getDelayedCalls() == [], "a timer was not cancelled"


def test_an_answer_completes_the_query(reactor, upstream_sockets, record) -> None:
    first = upstream_sockets[0]
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    message, question = query_bytes()
    deferred = upstreams.resolve(message, question)
    assert not deferred.called
    assert upstreams.in_flight == 1

    query, sent, source = first.receive()
    assert sent[2:] == message[2:], "only the ID may differ from the client's query"
    assert source[0] == "127.0.0.1"
    reply = first.answer(query, source)
    read_when_ready(reactor, first)

    assert success_of(deferred) == reply
    assert record.results() == [(first.name, "success")]
    seconds = record.calls[0][2]
    assert isinstance(seconds, float) and seconds >= 0
    assert_quiet(reactor, upstreams)
    assert len(reactor.readers) == 1, "the socket stays in the pool for the next queries"
    assert not upstream_sockets[1].has_query()


def test_queries_share_a_bounded_pool_of_sockets_with_ids_unique_per_socket(reactor, upstream_sockets, record) -> None:
    first = upstream_sockets[0]
    upstreams = make_upstreams(reactor, upstream_sockets[:1], record, pool_size=4)
    deferreds = [upstreams.resolve(*query_bytes(f"n{i}.example")) for i in range(200)]  # all in flight at once
    by_source: dict[Any, list[int]] = {}
    for _ in deferreds:
        query, _, source = first.receive()
        by_source.setdefault(source, []).append(query.header.id)
    assert len(reactor.readers) == 4 and upstreams.open_sockets() == 4
    assert len(by_source) == 4, "one source port per pooled socket"
    for ids in by_source.values():
        assert len(set(ids)) == len(ids), "an ID is never used twice on one socket at once"
    assert len({i for ids in by_source.values() for i in ids}) > 100  # random, not a counter from 0
    reactor.advance(TIMEOUT)
    for deferred in deferreds:
        failure_of(deferred).trap(UpstreamError)
    assert upstreams.in_flight == 0


def test_sockets_are_retired_after_n_queries_so_source_ports_keep_changing(reactor, upstream_sockets, record) -> None:
    first = upstream_sockets[0]
    upstreams = make_upstreams(reactor, upstream_sockets[:1], record, socket_queries=3)
    sources = []
    for i in range(7):
        deferred = upstreams.resolve(*query_bytes(f"n{i}.example"))
        query, _, source = first.receive()
        sources.append(source)
        first.answer(query, source)
        read_when_ready(reactor, first)  # one socket at a time: the retired one closed at once
        success_of(deferred)
    assert sources[0] == sources[2] != sources[3] == sources[5] != sources[6]


def test_retiring_sockets_are_bounded_too(reactor, upstream_sockets, record) -> None:
    first = upstream_sockets[0]
    upstreams = make_upstreams(reactor, upstream_sockets[:1], record, pool_size=2, socket_queries=2)
    pending = [upstreams.resolve(*query_bytes(f"n{i}.example")) for i in range(100)]  # none answered
    sources = {first.receive()[2] for _ in pending}
    # Retired sockets stay open while their queries are out, at most pool_size of them.
    assert upstreams.open_sockets() == len(reactor.readers) == 4
    assert len(sources) == 4
    reactor.advance(TIMEOUT)
    for deferred in pending:
        failure_of(deferred).trap(UpstreamError)
    assert upstreams.open_sockets() == len(reactor.readers) == 2


def test_sockets_are_retired_after_their_lifetime(reactor, upstream_sockets, record) -> None:
    first = upstream_sockets[0]
    upstreams = make_upstreams(reactor, upstream_sockets[:1], record, pool_size=1, socket_lifetime=30)
    sources = []
    for i in range(3):
        deferred = upstreams.resolve(*query_bytes(f"n{i}.example"))
        query, _, source = first.receive()
        sources.append(source)
        first.answer(query, source)
        read_when_ready(reactor, first)
        success_of(deferred)
        reactor.advance(20)
    assert sources[0] == sources[1] != sources[2]
    assert len(reactor.readers) == 1, "the retired socket, idle, is closed at once"


def test_no_answer_within_the_rto_asks_the_next_server_and_the_first_answer_still_counts(
    reactor, upstream_sockets, record
) -> None:
    first, second = upstream_sockets
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    message, question = query_bytes()
    deferred = upstreams.resolve(message, question)
    query, _, source = first.receive()

    reactor.advance(FIRST_RTO - 0.001)
    assert not second.has_query()
    reactor.advance(0.001)
    second.receive()  # asked now, at the first's rto, not at the timeout
    assert not deferred.called and record.calls == []

    reactor.advance(0.1)
    reply = first.answer(query, source)  # late, but before the second: it wins
    read_when_ready(reactor, first)
    assert success_of(deferred) == reply
    assert record.calls == [(first.name, "success", pytest.approx(FIRST_RTO + 0.1))]
    assert upstreams.in_flight == 0

    reactor.advance(TIMEOUT)  # the second never answers: its attempt ends at the deadline
    assert record.results() == [(first.name, "success"), (second.name, "timeout")]
    assert_quiet(reactor, upstreams)


def test_every_server_silent_is_an_upstream_error_at_the_timeout_not_timeout_times_servers(
    reactor, upstream_sockets, record
) -> None:
    first, second = upstream_sockets
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    deferred = upstreams.resolve(*query_bytes())
    reactor.advance(TIMEOUT - 0.001)
    assert not deferred.called
    assert first.has_query() and second.has_query()
    reactor.advance(0.001)
    failure_of(deferred).trap(UpstreamError)
    assert sorted(record.results()) == sorted([(first.name, "timeout"), (second.name, "timeout")])
    assert upstreams.in_flight == 0


def test_each_upstream_gets_its_share_of_a_short_timeout(reactor, upstream_sockets, record) -> None:
    first, second = upstream_sockets
    upstreams = Upstreams(reactor, [first.endpoint, second.endpoint], 0.3, record=record, pool_size=1)
    deferred = upstreams.resolve(*query_bytes())
    first.receive()
    reactor.advance(0.149)
    assert not second.has_query()
    reactor.advance(0.001)  # 0.3 s for two: the second is asked at 0.15 s, not never
    second.receive()
    reactor.advance(0.15)
    failure_of(deferred).trap(UpstreamError)


def test_three_silent_upstreams_are_asked_one_rto_apart_within_one_deadline(reactor, record) -> None:
    servers = [FakeUpstreamSocket() for _ in range(3)]
    try:
        upstreams = make_upstreams(reactor, servers, record)
        deferred = upstreams.resolve(*query_bytes())
        asked = []
        for _ in range(int(TIMEOUT / 0.002)):  # bounded: the deadline in 2 ms steps
            for index, server in enumerate(servers):
                if server.has_query():
                    server.receive()
                    asked.append((index, round(reactor.seconds(), 3)))
            if deferred.called:
                break
            reactor.advance(0.002)
        assert asked == [(0, 0.0), (1, FIRST_RTO), (2, 2 * FIRST_RTO)]
        failure_of(deferred).trap(UpstreamError)
        assert reactor.seconds() == pytest.approx(TIMEOUT)
    finally:
        for server in servers:
            server.close()


def test_a_reply_with_the_wrong_id_is_ignored_and_counted(reactor, upstream_sockets, record) -> None:
    first = upstream_sockets[0]
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    deferred = upstreams.resolve(*query_bytes())
    query, _, source = first.receive()

    first.answer(query, source, qid=query.header.id ^ 0x5A5A)
    read_when_ready(reactor, first)
    assert not deferred.called
    assert record.calls == [(first.name, "mismatch", None)]
    assert upstreams.in_flight == 1

    reply = first.answer(query, source)
    read_when_ready(reactor, first)
    assert success_of(deferred) == reply
    assert record.results() == [(first.name, "mismatch"), (first.name, "success")]
    assert upstreams.in_flight == 0


def test_a_forged_reply_and_the_real_one_in_one_read(reactor, upstream_sockets, record) -> None:
    first = upstream_sockets[0]
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    deferred = upstreams.resolve(*query_bytes())
    query, _, source = first.receive()
    forged = query.reply()
    forged.header.id = query.header.id ^ 1
    first.socket.sendto(forged.pack(), source)
    reply = first.answer(query, source)
    read_when_ready(reactor, first)  # one doRead drains every queued datagram, skipping the forgery
    if not deferred.called:  # only if the real one was not yet queued at the first read
        read_when_ready(reactor, first)
    assert success_of(deferred) == reply
    assert record.results() == [(first.name, "mismatch"), (first.name, "success")]


def test_a_reply_for_another_question_is_a_mismatch(reactor, upstream_sockets, record) -> None:
    first = upstream_sockets[0]
    upstreams = make_upstreams(reactor, upstream_sockets[:1], record)
    deferred = upstreams.resolve(*query_bytes("example.com"))
    query, _, source = first.receive()
    other = DNSRecord.question("example.org", "A")
    other.header.id = query.header.id
    first.answer(other, source)
    read_when_ready(reactor, first)
    assert not deferred.called
    assert record.results() == [(first.name, "mismatch")]
    reactor.advance(TIMEOUT)
    failure_of(deferred).trap(UpstreamError)
    assert upstreams.in_flight == 0


def test_a_late_answer_after_the_deadline_is_not_a_mismatch(reactor, upstream_sockets, record) -> None:
    first = upstream_sockets[0]
    upstreams = make_upstreams(reactor, upstream_sockets[:1], record)
    deferred = upstreams.resolve(*query_bytes())
    query, _, source = first.receive()
    reactor.advance(TIMEOUT)
    failure_of(deferred).trap(UpstreamError)
    first.answer(query, source)
    read_when_ready(reactor, first)
    assert record.results() == [(first.name, "timeout")]


@pytest.mark.parametrize("path", ["doRead", "connectionLost"])
def test_a_refused_port_fails_over_at_once(reactor, upstream_sockets, record, path) -> None:
    first, second = upstream_sockets
    first.close()  # nothing listens there now: the kernel answers with ICMP port unreachable
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    deferred = upstreams.resolve(*query_bytes())
    reader = reader_for(reactor, first)
    assert select.select([reader], [], [], 2.0)[0], "the ICMP error never reached blockd's socket"
    # With epoll the error comes as EPOLLERR without EPOLLIN: the reactor removes the reader and
    # calls connectionLost, not doRead (what made it look like a timeout before).
    if path == "connectionLost":
        reactor.removeReader(reader)
        reader.connectionLost(None)
    else:
        reader.doRead()
    assert record.calls == [(first.name, "refused", None)]
    assert reactor.seconds() == 0, "no waiting at all"
    query, _, source = second.receive()
    reply = second.answer(query, source)
    read_when_ready(reactor, second)
    assert success_of(deferred) == reply
    assert upstreams.up() == {first.name: False, second.name: True}, "refused takes it down at once"


def test_servfail_and_refused_answers_fail_over_at_once(reactor, upstream_sockets, record) -> None:
    first, second = upstream_sockets
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    deferred = upstreams.resolve(*query_bytes())
    query, _, source = first.receive()
    first.answer(query, source, rcode=2)
    read_when_ready(reactor, first)
    assert not deferred.called
    query, _, source = second.receive()
    reply = second.answer(query, source)
    read_when_ready(reactor, second)
    assert success_of(deferred) == reply
    assert record.results() == [(first.name, "servfail"), (second.name, "success")]
    assert_quiet(reactor, upstreams)

    deferred = upstreams.resolve(*query_bytes("other.example"))
    query, _, source = first.receive()
    first.answer(query, source, rcode=5)
    read_when_ready(reactor, first)
    second.receive()
    assert record.results()[-1] == (first.name, "refused_rcode")
    reactor.advance(TIMEOUT)  # the second never answers: the REFUSED answer is all there is
    assert struct.unpack_from("!H", success_of(deferred), 2)[0] & 0x0F == 5


def test_when_every_server_answers_servfail_the_last_answer_is_returned(reactor, upstream_sockets, record) -> None:
    first, second = upstream_sockets
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    deferred = upstreams.resolve(*query_bytes())
    for upstream in (first, second):
        query, _, source = upstream.receive()
        last = upstream.answer(query, source, rcode=2)
        read_when_ready(reactor, upstream)
    assert success_of(deferred) == last
    assert record.results() == [(first.name, "servfail"), (second.name, "servfail")]
    assert upstreams.in_flight == 0


def test_a_truncated_answer_is_retried_over_tcp_within_the_deadline(reactor, upstream_sockets, record) -> None:
    first = upstream_sockets[0]
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    message, question = query_bytes()
    deferred = upstreams.resolve(message, question)
    query, _, source = first.receive()
    reactor.advance(0.25)
    first.answer(query, source, tc=True)
    read_when_ready(reactor, first)
    assert not deferred.called
    assert record.results() == [(first.name, "truncated")]

    host, port, factory, timeout, _ = reactor.tcpClients[0]
    assert (host, port) == ("127.0.0.1", first.endpoint.port)
    assert timeout == pytest.approx(TIMEOUT - 0.25), "TCP gets what is left of the query's deadline"
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    sent = transport.value()
    assert struct.unpack_from("!H", sent)[0] == len(sent) - 2
    tcp_query = DNSRecord.parse(sent[2:])
    assert sent[4:] == message[2:]

    reply = tcp_query.reply()
    reply.add_answer(RR("example.com", QTYPE.A, rdata=A("192.0.2.2"), ttl=60))
    data = reply.pack()
    stream = struct.pack("!H", len(data)) + data
    for index in range(len(stream)):  # byte by byte: framing must hold across reads
        protocol.dataReceived(stream[index : index + 1])

    answer = success_of(deferred)
    assert answer == data
    assert not struct.unpack_from("!H", answer, 2)[0] & FLAG_TC
    assert record.results() == [(first.name, "truncated"), (first.name, "success")]
    assert not upstream_sockets[1].has_query(), "a truncated answer is an answer: no failover"
    assert_quiet(reactor, upstreams)


def test_a_truncated_answer_after_another_upstream_answered_opens_no_tcp(reactor, upstream_sockets, record) -> None:
    first, second = upstream_sockets
    upstreams = make_upstreams(reactor, upstream_sockets, record, strategy="parallel")
    deferred = upstreams.resolve(*query_bytes())
    asked = {u.name: u.receive() for u in (first, second)}
    query, _, source = asked[first.name]
    reply = first.answer(query, source)
    read_when_ready(reactor, first)
    assert success_of(deferred) == reply
    query, _, source = asked[second.name]
    second.answer(query, source, tc=True)
    read_when_ready(reactor, second)
    assert reactor.tcpClients == []
    assert record.results()[-1] == (second.name, "truncated")
    assert_quiet(reactor, upstreams)


def test_max_in_flight_exceeded_fails_at_once(reactor, upstream_sockets, record) -> None:
    upstreams = make_upstreams(reactor, upstream_sockets, record, max_in_flight=2)
    message, question = query_bytes()
    pending = [upstreams.resolve(message, question) for _ in range(2)]
    assert upstreams.in_flight == 2

    refused = upstreams.resolve(message, question)
    failure_of(refused).trap(UpstreamError)
    assert upstreams.in_flight == 2
    assert record.calls == []

    reactor.advance(TIMEOUT)
    for deferred in pending:
        failure_of(deferred).trap(UpstreamError)
    assert upstreams.in_flight == 0
    accepted = upstreams.resolve(message, question)
    assert not accepted.called
    reactor.advance(TIMEOUT)
    failure_of(accepted).trap(UpstreamError)


def test_no_servers_is_an_upstream_error(reactor, record) -> None:
    upstreams = Upstreams(reactor, [], TIMEOUT, record=record)
    message, question = query_bytes()
    failure_of(upstreams.resolve(message, question)).trap(UpstreamError)
    assert upstreams.in_flight == 0


# --- health: down, skipped, probed, back ---------------------------------------------------------


def test_a_down_upstream_is_skipped_probed_and_used_again_once_it_answers(reactor, upstream_sockets, record) -> None:
    first, second = upstream_sockets
    port = first.endpoint.port
    first.close()
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    deferred = upstreams.resolve(*query_bytes("one.example"))
    read_when_ready(reactor, first)  # refused
    query, _, source = second.receive()
    second.answer(query, source)
    read_when_ready(reactor, second)
    success_of(deferred)
    assert upstreams.up()[first.name] is False

    revived = FakeUpstreamSocket(port)  # the same address answers again, but only probes ask it yet
    upstream_sockets[0] = revived
    deferred = upstreams.resolve(*query_bytes("two.example"))
    query, _, source = second.receive()
    assert str(query.q.qname) == "two.example."
    second.answer(query, source)
    read_when_ready(reactor, second)
    success_of(deferred)
    assert not revived.has_query(), "a down upstream is not asked first"

    reactor.advance(0.5)  # the first probe
    probe, _, source = revived.receive()
    assert (str(probe.q.qname), QTYPE[probe.q.qtype]) == (".", "NS")
    revived.socket.sendto(probe.reply().pack(), source)
    read_when_ready(reactor, revived)
    assert upstreams.up() == {first.name: True, second.name: True}
    assert reactor.getDelayedCalls() == [], "no probing once it is up"

    deferred = upstreams.resolve(*query_bytes("three.example"))
    query, _, source = revived.receive()
    assert str(query.q.qname) == "three.example."
    revived.answer(query, source)
    read_when_ready(reactor, revived)
    success_of(deferred)
    assert not second.has_query()


def test_probes_back_off_while_the_upstream_stays_down(reactor, upstream_sockets, record) -> None:
    first = upstream_sockets[0]
    first.close()
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    upstreams.resolve(*query_bytes())
    read_when_ready(reactor, first)
    probes = []
    for _ in range(200):  # bounded: ~45 s of fake time
        if reactor.seconds() > 45:
            break
        before = len(record.calls)
        reactor.advance(0.25)
        reader = [r for r in reactor.readers if r.socket.getpeername()[1] == first.endpoint.port]
        if reader and select.select(reader, [], [], 0.5)[0]:
            reader[0].doRead()
        if any(call == (first.name, "refused", None) for call in record.calls[before:]):
            probes.append(reactor.seconds())
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert probes[0] == pytest.approx(0.5)
    assert gaps[:4] == pytest.approx([1.0, 2.0, 4.0, 8.0], abs=0.26)
    assert max(gaps) <= 10.25, "the interval is capped"


def test_two_silent_attempts_take_an_upstream_down(reactor, upstream_sockets, record) -> None:
    first, second = upstream_sockets
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    for name in ("one.example", "two.example"):
        deferred = upstreams.resolve(*query_bytes(name))
        first.receive()
        reactor.advance(TIMEOUT)  # rto, then the second is asked; neither answers
        second.receive()
        failure_of(deferred)
    assert upstreams.up() == {first.name: False, second.name: False}
    # Both down: still tried, as a last resort, in order, within one deadline.
    deferred = upstreams.resolve(*query_bytes("three.example"))
    assert str(first.receive()[0].q.qname) == "three.example."
    reactor.advance(TIMEOUT)
    failure_of(deferred).trap(UpstreamError)
    assert reactor.seconds() <= 3 * TIMEOUT + 1.0


# --- strategies ------------------------------------------------------------------------------------


def test_parallel_asks_two_at_once_and_the_first_answer_wins(reactor, upstream_sockets, record) -> None:
    first, second = upstream_sockets
    upstreams = make_upstreams(reactor, upstream_sockets, record, strategy="parallel")
    deferred = upstreams.resolve(*query_bytes())
    asked = {u.name: u.receive() for u in (first, second)}  # both at once, no time passing
    query, _, source = asked[second.name]
    reply = second.answer(query, source)
    read_when_ready(reactor, second)
    assert success_of(deferred) == reply

    query, _, source = asked[first.name]
    reactor.advance(0.01)
    first.answer(query, source)  # the other answers later: counted as its success, not a mismatch
    read_when_ready(reactor, first)
    assert sorted(record.results()) == sorted([(first.name, "success"), (second.name, "success")])
    assert_quiet(reactor, upstreams)


def test_fastest_asks_the_upstream_with_the_lowest_smoothed_rtt_first(reactor, upstream_sockets, record) -> None:
    first, second = upstream_sockets
    upstreams = make_upstreams(reactor, upstream_sockets, record, strategy="fastest", rng=random.Random(7))
    for _ in range(5):  # answer times as measured (upstream_health's own tests cover the smoothing)
        upstreams.health.answered(first.name, 0.2, 0.0)
        upstreams.health.answered(second.name, 0.01, 0.0)
    slow_asked = 0
    for i in range(60):
        deferred = upstreams.resolve(*query_bytes(f"q{i}.example"))
        query, _, source = second.receive()  # the fastest, every time
        if first.has_query():  # now and then the slower one too, at once, to measure it again
            slow_asked += 1
            slow_query, _, slow_source = first.receive()
            first.answer(slow_query, slow_source)
            read_when_ready(reactor, first)
        second.answer(query, source)
        read_when_ready(reactor, second)
        success_of(deferred)
    assert 1 <= slow_asked <= 10


# --- tap -------------------------------------------------------------------------------------------


def test_the_tap_sees_every_exchange_with_its_wire_messages(reactor, upstream_sockets, record) -> None:
    first, second = upstream_sockets
    exchanges: list[tuple[str, int, str, bytes, int, bytes | None]] = []
    upstreams = make_upstreams(reactor, upstream_sockets, record, tap=lambda *args: exchanges.append(args))
    deferred = upstreams.resolve(*query_bytes())
    query, sent, source = first.receive()
    reactor.advance(FIRST_RTO)
    second.receive()
    reply = first.answer(query, source)
    read_when_ready(reactor, first)
    assert success_of(deferred) == reply
    assert exchanges == [("127.0.0.1", first.endpoint.port, "udp", sent, exchanges[0][4], reply)]
    reactor.advance(TIMEOUT)
    assert exchanges[1][:3] == ("127.0.0.1", second.endpoint.port, "udp") and exchanges[1][5] is None


def test_a_removed_upstream_s_sockets_close_once_its_queries_end(reactor, upstream_sockets, record) -> None:
    first, second = upstream_sockets
    upstreams = make_upstreams(reactor, upstream_sockets[:1], record)
    deferred = upstreams.resolve(*query_bytes())
    first.receive()
    upstreams.servers = [second.endpoint]  # a reload
    assert upstreams.open_sockets() == 1, "the query still out keeps its socket"
    reactor.advance(TIMEOUT)
    failure_of(deferred)
    assert upstreams.open_sockets() == 0 and reactor.readers == set()
    assert list(upstreams.up()) == [second.name]
