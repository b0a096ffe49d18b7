"""blockd.upstream: answer matching, and Upstreams on a MemoryReactorClock.

The "upstreams" are plain UDP sockets the test binds on 127.0.0.1 and answers by hand, so no
packet leaves loopback.  The reactor is fake: time moves only with advance(), and an answer is
read by calling the registered reader's doRead(), as a real reactor would when the socket
becomes readable.
"""

from __future__ import annotations

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


class FakeUpstreamSocket:
    """A UDP socket on loopback that receives blockd's queries and answers only when told."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(2.0)  # the query is already queued on loopback; this only bounds a bug
        self.endpoint = Endpoint("127.0.0.1", self.socket.getsockname()[1])

    def receive(self) -> tuple[DNSRecord, bytes, Any]:
        data, source = self.socket.recvfrom(65535)
        return DNSRecord.parse(data), data, source

    def has_query(self) -> bool:
        return bool(select.select([self.socket], [], [], 0)[0])

    def answer(self, query: DNSRecord, source: Any, qid: int | None = None, tc: bool = False) -> bytes:
        reply = query.reply()
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


def only_reader(reactor: MemoryReactorClock) -> Any:
    assert len(reactor.readers) == 1
    return next(iter(reactor.readers))


def read_when_ready(reactor: MemoryReactorClock) -> None:
    reader = only_reader(reactor)
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
    return Upstreams(reactor, [s.endpoint for s in sockets], TIMEOUT, record=record, **kwargs)


def query_bytes(name: str = "example.com", qid: int = 0xBEEF) -> tuple[bytes, bytes]:
    record = DNSRecord.question(name, "A")
    record.header.id = qid
    message = record.pack()
    return message, message[12:]


def test_an_answer_completes_the_query(reactor, upstream_sockets, record) -> None:
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    message, question = query_bytes()
    deferred = upstreams.resolve(message, question)
    assert not deferred.called
    assert upstreams.in_flight == 1

    query, sent, source = upstream_sockets[0].receive()
    assert sent[2:] == message[2:], "only the ID may differ from the client's query"
    assert source[0] == "127.0.0.1"
    reply = upstream_sockets[0].answer(query, source)
    read_when_ready(reactor)

    assert success_of(deferred) == reply
    assert record.results() == [(str(upstream_sockets[0].endpoint), "success")]
    seconds = record.calls[0][2]
    assert isinstance(seconds, float) and seconds >= 0
    assert upstreams.in_flight == 0
    assert reactor.readers == set()
    assert reactor.getDelayedCalls() == [], "the timeout was not cancelled"
    assert not upstream_sockets[1].has_query()


def test_each_query_gets_a_fresh_socket_and_id(reactor, upstream_sockets, record) -> None:
    upstreams = make_upstreams(reactor, upstream_sockets[:1], record)
    message, question = query_bytes()
    deferreds = [upstreams.resolve(message, question) for _ in range(4)]  # all in flight at once
    sources, ids = set(), set()
    for _ in deferreds:
        query, _, source = upstream_sockets[0].receive()
        sources.add(source)
        ids.add(query.header.id)
    assert len(reactor.readers) == 4
    assert len(sources) == 4
    assert len(ids) > 1  # 16 random bits each: four equal IDs would mean the ID is not random
    reactor.advance(TIMEOUT)
    for deferred in deferreds:
        failure_of(deferred).trap(UpstreamError)
    assert reactor.readers == set()


def test_a_timeout_moves_to_the_next_server(reactor, upstream_sockets, record) -> None:
    first, second = upstream_sockets
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    message, question = query_bytes()
    deferred = upstreams.resolve(message, question)
    first.receive()

    reactor.advance(TIMEOUT - 0.001)
    assert not deferred.called
    assert not second.has_query()
    reactor.advance(0.001)
    assert record.calls == [(str(first.endpoint), "timeout", None)]
    assert not deferred.called

    query, _, source = second.receive()
    reply = second.answer(query, source)
    read_when_ready(reactor)
    assert success_of(deferred) == reply
    assert record.results() == [(str(first.endpoint), "timeout"), (str(second.endpoint), "success")]
    assert upstreams.in_flight == 0
    assert reactor.readers == set()


def test_every_server_timing_out_is_an_upstream_error(reactor, upstream_sockets, record) -> None:
    first, second = upstream_sockets
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    message, question = query_bytes()
    deferred = upstreams.resolve(message, question)
    reactor.advance(TIMEOUT)
    reactor.advance(TIMEOUT - 0.001)
    assert not deferred.called
    reactor.advance(0.001)

    failure_of(deferred).trap(UpstreamError)
    assert record.calls == [(str(first.endpoint), "timeout", None), (str(second.endpoint), "timeout", None)]
    assert first.has_query() and second.has_query()
    assert upstreams.in_flight == 0
    assert reactor.readers == set()
    assert reactor.getDelayedCalls() == []


def test_a_reply_with_the_wrong_id_is_ignored_and_counted(reactor, upstream_sockets, record) -> None:
    first = upstream_sockets[0]
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    message, question = query_bytes()
    deferred = upstreams.resolve(message, question)
    query, _, source = first.receive()

    first.answer(query, source, qid=query.header.id ^ 0x5A5A)
    read_when_ready(reactor)
    assert not deferred.called
    assert record.calls == [(str(first.endpoint), "mismatch", None)]
    assert upstreams.in_flight == 1

    reply = first.answer(query, source)
    read_when_ready(reactor)
    assert success_of(deferred) == reply
    assert record.results() == [(str(first.endpoint), "mismatch"), (str(first.endpoint), "success")]
    assert upstreams.in_flight == 0


def test_a_forged_reply_and_the_real_one_in_one_read(reactor, upstream_sockets, record) -> None:
    first = upstream_sockets[0]
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    message, question = query_bytes()
    deferred = upstreams.resolve(message, question)
    query, _, source = first.receive()
    forged = query.reply()
    forged.header.id = query.header.id ^ 1
    first.socket.sendto(forged.pack(), source)
    reply = first.answer(query, source)
    read_when_ready(reactor)  # one doRead drains every queued datagram, skipping the forgery
    if not deferred.called:  # only if the real one was not yet queued at the first read
        read_when_ready(reactor)
    assert success_of(deferred) == reply
    assert record.results() == [(str(first.endpoint), "mismatch"), (str(first.endpoint), "success")]


def test_a_reply_for_another_question_is_a_mismatch(reactor, upstream_sockets, record) -> None:
    first = upstream_sockets[0]
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    message, question = query_bytes("example.com")
    deferred = upstreams.resolve(message, question)
    query, _, source = first.receive()
    other = DNSRecord.question("example.org", "A")
    other.header.id = query.header.id
    first.answer(other, source)
    read_when_ready(reactor)
    assert not deferred.called
    assert record.results() == [(str(first.endpoint), "mismatch")]
    reactor.advance(TIMEOUT)
    reactor.advance(TIMEOUT)
    failure_of(deferred).trap(UpstreamError)
    assert upstreams.in_flight == 0


def test_a_refused_port_moves_to_the_next_server(reactor, upstream_sockets, record) -> None:
    first, second = upstream_sockets
    first.close()  # nothing listens there now: the kernel answers with ICMP port unreachable
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    message, question = query_bytes()
    deferred = upstreams.resolve(message, question)
    read_when_ready(reactor)  # the pending socket error makes the socket readable
    assert record.calls == [(str(first.endpoint), "refused", None)]
    query, _, source = second.receive()
    reply = second.answer(query, source)
    read_when_ready(reactor)
    assert success_of(deferred) == reply


def test_a_truncated_answer_is_retried_over_tcp(reactor, upstream_sockets, record) -> None:
    first = upstream_sockets[0]
    upstreams = make_upstreams(reactor, upstream_sockets, record)
    message, question = query_bytes()
    deferred = upstreams.resolve(message, question)
    query, _, source = first.receive()
    first.answer(query, source, tc=True)
    read_when_ready(reactor)
    assert not deferred.called
    assert record.results() == [(str(first.endpoint), "truncated")]
    assert reactor.readers == set()

    host, port, factory, timeout, _ = reactor.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", first.endpoint.port, TIMEOUT)
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
    assert record.results() == [(str(first.endpoint), "truncated"), (str(first.endpoint), "success")]
    assert upstreams.in_flight == 0
    assert reactor.getDelayedCalls() == []


def test_max_in_flight_exceeded_fails_at_once(reactor, upstream_sockets, record) -> None:
    upstreams = make_upstreams(reactor, upstream_sockets, record, max_in_flight=2)
    message, question = query_bytes()
    pending = [upstreams.resolve(message, question) for _ in range(2)]
    assert upstreams.in_flight == 2

    refused = upstreams.resolve(message, question)
    failure_of(refused).trap(UpstreamError)
    assert upstreams.in_flight == 2
    assert len(reactor.readers) == 2, "the refused query must not open a socket"
    assert record.calls == []

    reactor.advance(TIMEOUT)
    reactor.advance(TIMEOUT)
    for deferred in pending:
        failure_of(deferred).trap(UpstreamError)
    assert upstreams.in_flight == 0
    accepted = upstreams.resolve(message, question)
    assert not accepted.called
    reactor.advance(TIMEOUT)
    reactor.advance(TIMEOUT)
    failure_of(accepted).trap(UpstreamError)


def test_no_servers_is_an_upstream_error(reactor, record) -> None:
    upstreams = Upstreams(reactor, [], TIMEOUT, record=record)
    message, question = query_bytes()
    failure_of(upstreams.resolve(message, question)).trap(UpstreamError)
    assert upstreams.in_flight == 0
