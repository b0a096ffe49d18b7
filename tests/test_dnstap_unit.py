"""dnstap without a daemon: Frame Streams frames, payload encoding against the protobuf library,
the Policy mapping, and the sink's queue, handshake, drops and reconnects against an in-test
collector on a unix socket (no sleeps: the sink is flushed by the test, its clocks are fakes)."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnstap_pb import dnstap_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task

from blockd import dnstap, fstrm
from blockd.dnstap import Counters, DnstapSettings, DnstapSink
from blockd.dnstap_frames import PayloadEncoder, PolicyFacts, policy_facts, varint
from blockd.names import key_from_wire_labels, key_to_wire
from blockd.policy import Group, Verdict
from blockd.repeats import BlockedRepeat
from blockd.services import DnstapService

# --- Frame Streams ------------------------------------------------------------------------------


def test_control_frame_round_trip() -> None:
    raw = fstrm.control_frame(fstrm.READY, (fstrm.DNSTAP_CONTENT_TYPE, b"other"))
    assert raw[:4] == b"\0\0\0\0"
    frames = fstrm.ControlReader().feed(raw)
    assert frames == [fstrm.ControlFrame(fstrm.READY, (fstrm.DNSTAP_CONTENT_TYPE, b"other"))]


def test_control_reader_collects_frames_split_anywhere() -> None:
    raw = fstrm.control_frame(fstrm.ACCEPT, (fstrm.DNSTAP_CONTENT_TYPE,)) + fstrm.control_frame(fstrm.FINISH)
    reader = fstrm.ControlReader()
    got = []
    for byte in raw:
        got += reader.feed(bytes([byte]))
    assert [f.name for f in got] == ["ACCEPT", "FINISH"]


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (fstrm.data_frame(b"x" * 10), "a data frame of 10 bytes where a control frame was expected"),
        (b"\0\0\0\0" + (600).to_bytes(4, "big"), "control frame of 600 bytes (at most 512)"),
        (b"\0\0\0\0\0\0\0\x02\0\0", "control frame of 2 bytes has no type"),
        (b"\0\0\0\0\0\0\0\x08\0\0\0\x01\0\0\0\x01", "control frame ends inside a field header"),
        (b"\0\0\0\0\0\0\0\x0c\0\0\0\x01\0\0\0\x01\0\0\0\x09", "control field of 9 bytes runs past the frame"),
    ],
)
def test_bad_control_frames_are_named(raw: bytes, error: str) -> None:
    with pytest.raises(fstrm.FstrmError, match=error.replace("(", r"\(").replace(")", r"\)")):
        fstrm.ControlReader().feed(raw)


def test_unknown_control_fields_are_skipped() -> None:
    body = (fstrm.ACCEPT).to_bytes(4, "big") + (7).to_bytes(4, "big") + (2).to_bytes(4, "big") + b"zz"
    assert fstrm.parse_control(body) == fstrm.ControlFrame(fstrm.ACCEPT, ())


def test_expect_names_what_came_instead() -> None:
    with pytest.raises(fstrm.FstrmError, match="expected ACCEPT, got FINISH"):
        fstrm.expect(fstrm.ControlFrame(fstrm.FINISH), fstrm.ACCEPT)
    with pytest.raises(fstrm.FstrmError, match=r"does not accept protobuf:dnstap\.Dnstap"):
        fstrm.expect(fstrm.ControlFrame(fstrm.ACCEPT, (b"x",)), fstrm.ACCEPT, fstrm.DNSTAP_CONTENT_TYPE)
    fstrm.expect(fstrm.ControlFrame(fstrm.ACCEPT), fstrm.ACCEPT, fstrm.DNSTAP_CONTENT_TYPE)  # none offered: fine


# --- payloads: what the hand-assembled fields decode to, against the library's own encoding -------

hosts = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), st.just("::ffff:10.1.2.3"), st.just("fe80::1%eth0")
)
times = st.integers(min_value=0, max_value=2**40)
policies = st.one_of(
    st.none(),
    st.builds(
        PolicyFacts,
        st.sampled_from(["blockd", "rpz"]),
        st.text(min_size=1, max_size=20),
        st.one_of(st.none(), st.sampled_from([pb.Policy.LOCAL_DATA, pb.Policy.NXDOMAIN, pb.Policy.PASS])),
        st.sampled_from([pb.Policy.QNAME, pb.Policy.CLIENT_IP, pb.Policy.RESPONSE_IP]),
        st.binary(max_size=40),
    ),
)


def address_of(host: str) -> tuple[int, bytes]:
    address = ipaddress.ip_address(host.split("%")[0])
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (pb.INET if address.version == 4 else pb.INET6), address.packed


def library_policy(message: pb.Message, policy: PolicyFacts | None) -> None:
    if policy is None:
        return
    message.policy.type = policy.type
    message.policy.rule = policy.rule.encode()
    if policy.action is not None:
        message.policy.action = policy.action
    message.policy.match = policy.match
    message.policy.value = policy.value


def decoded(payload: bytes) -> pb.Dnstap:
    envelope = pb.Dnstap()
    envelope.ParseFromString(payload)
    return envelope


@settings(max_examples=120, deadline=None)
@given(
    host=hosts,
    port=st.integers(0, 65535),
    transport=st.sampled_from(["udp", "tcp"]),
    query=st.binary(max_size=600),
    response=st.binary(max_size=70000),
    received=times,
    delay=st.integers(0, 10**10),
    policy=policies,
)
def test_client_messages_equal_the_library_encoding(
    host: str,
    port: int,
    transport: str,
    query: bytes,
    response: bytes,
    received: int,
    delay: int,
    policy: PolicyFacts | None,
) -> None:
    encoder = PayloadEncoder(b"resolver-1", b"blockd test")
    family, packed = address_of(host)
    protocol = pb.UDP if transport == "udp" else pb.TCP
    answered = received + delay

    expected_query = pb.Message(
        type=pb.Message.CLIENT_QUERY, socket_family=family, socket_protocol=protocol, query_address=packed
    )
    expected_query.query_port = port
    expected_query.query_time_sec, expected_query.query_time_nsec = divmod(received, 10**9)
    expected_query.query_message = query
    library_policy(expected_query, policy)
    got = decoded(encoder.client_query(host, port, transport, query, received, policy))
    assert (got.identity, got.version, got.type) == (b"resolver-1", b"blockd test", pb.Dnstap.MESSAGE)
    assert got.message == expected_query

    expected = pb.Message(
        type=pb.Message.CLIENT_RESPONSE, socket_family=family, socket_protocol=protocol, query_address=packed
    )
    expected.query_port = port
    expected.query_time_sec, expected.query_time_nsec = divmod(received, 10**9)
    expected.response_time_sec, expected.response_time_nsec = divmod(answered, 10**9)
    expected.response_message = response
    library_policy(expected, policy)
    assert decoded(encoder.client_response(host, port, transport, response, received, answered, policy)).message == (
        expected
    )


@settings(max_examples=100, deadline=None)
@given(host=hosts, port=st.integers(1, 65535), query=st.binary(max_size=300), answer=st.one_of(st.none(), st.binary()))
def test_forwarder_messages_equal_the_library_encoding(
    host: str, port: int, query: bytes, answer: bytes | None
) -> None:
    family, packed = address_of(host)
    payloads = PayloadEncoder(b"", b"").forwarder(
        host, port, "udp", query, 1_800_000_000_123, answer, 1_800_000_000_010
    )
    assert len(payloads) == (1 if answer is None else 2)
    asked = decoded(payloads[0])
    assert not asked.HasField("identity") and not asked.HasField("version")
    expected = pb.Message(
        type=pb.Message.FORWARDER_QUERY,
        socket_family=family,
        socket_protocol=pb.UDP,
        response_address=packed,
        response_port=port,
        query_time_sec=1800,
        query_time_nsec=123,
        query_message=query,
        query_zone=b"\0",
    )
    assert asked.message == expected
    if answer is not None:
        answered = decoded(payloads[1]).message
        assert answered.type == pb.Message.FORWARDER_RESPONSE
        assert (answered.response_message, answered.response_time_sec, answered.response_time_nsec) == (
            answer,
            1800,
            10,
        )


@given(st.integers(0, 2**64 - 1))
def test_varint_is_protobufs(value: int) -> None:
    assert b"\x40" + varint(value) == pb.Message(query_time_sec=value).SerializePartialToString()


@pytest.mark.parametrize("key", ["tiktok.com", "*.tiktok.com", "a\\046b.example", "x\\000y.z", ""])
def test_key_to_wire_inverts_key_from_wire_labels(key: str) -> None:
    wire = key_to_wire(key)
    labels = []
    at = 0
    while wire[at]:
        labels.append(wire[at + 1 : at + 1 + wire[at]])
        at += 1 + wire[at]
    assert key_from_wire_labels(labels) == key


# --- the Policy of an answer ---------------------------------------------------------------------

GROUP = Group("gov", "sinkhole", 300, b"\0" * 4, b"\0" * 16, 1, (0,), {}, None, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("verdict", "facts"),
    [
        (
            Verdict(GROUP, "tiktok", "tiktok.com", "sinkhole"),
            PolicyFacts("blockd", "tiktok", pb.Policy.LOCAL_DATA, pb.Policy.QNAME, b"\x06tiktok\x03com\x00"),
        ),
        (
            Verdict(GROUP, "gov-rpz", "*.tiktok.com", "nxdomain", source="rpz"),
            PolicyFacts("rpz", "gov-rpz", pb.Policy.NXDOMAIN, pb.Policy.QNAME, b"\x01*\x06tiktok\x03com\x00"),
        ),
        (
            Verdict(GROUP, "tiktok", "tiktokcdn.com", "sinkhole", "cname"),
            PolicyFacts("blockd", "tiktok", pb.Policy.LOCAL_DATA, pb.Policy.QNAME, b"\x09tiktokcdn\x03com\x00"),
        ),
        (
            Verdict(GROUP, "bytedance-prefixes", "2001:db8::1", "nxdomain", "address"),
            PolicyFacts(
                "blockd",
                "bytedance-prefixes",
                pb.Policy.NXDOMAIN,
                pb.Policy.RESPONSE_IP,
                b" \x01\r\xb8" + b"\0" * 11 + b"\x01",
            ),
        ),
        (
            Verdict(GROUP, "watch", "watched.example", "monitor"),
            PolicyFacts("blockd", "watch", pb.Policy.PASS, pb.Policy.QNAME, b"\x07watched\x07example\x00"),
        ),
        (
            Verdict(GROUP, "x", "x.example", "refused"),
            PolicyFacts("blockd", "x", None, pb.Policy.QNAME, b"\x01x\x07example\x00"),
        ),
        (
            Verdict(GROUP, "r", "r.example", "tcp-only", source="rpz"),
            PolicyFacts("rpz", "r", pb.Policy.TRUNCATE, pb.Policy.QNAME, b"\x01r\x07example\x00"),
        ),
    ],
    ids=lambda value: value.action if isinstance(value, Verdict) else "",
)
def test_policy_of_a_verdict(verdict: Verdict, facts: PolicyFacts) -> None:
    assert policy_facts(verdict) == facts


def test_policy_of_a_refused_client() -> None:
    assert policy_facts(None, denied=True, client="203.0.113.9") == PolicyFacts(
        "blockd", "server.allow", None, pb.Policy.CLIENT_IP, bytes([203, 0, 113, 9])
    )
    assert policy_facts(None) is None


# --- the sink ------------------------------------------------------------------------------------


class Collector:
    """An fstrm reader on a unix socket: READY -> ACCEPT, START, data frames, STOP -> FINISH."""

    def __init__(self, path: Path, accept: bytes = fstrm.DNSTAP_CONTENT_TYPE):
        self.path = path
        self.accept = accept
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.payloads: list[bytes] = []
        self.controls: list[str] = []
        self.connections: list[socket.socket] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        self.connections.append(conn)
        conn.settimeout(10)
        buffer = b""
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                buffer += data
                while len(buffer) >= 4:
                    length = int.from_bytes(buffer[:4], "big")
                    if length == 0:
                        if len(buffer) < 8:
                            break
                        size = int.from_bytes(buffer[4:8], "big")
                        if len(buffer) < 8 + size:
                            break
                        frame = fstrm.parse_control(buffer[8 : 8 + size])
                        buffer = buffer[8 + size :]
                        self.controls.append(frame.name)
                        if frame.kind == fstrm.READY:
                            conn.sendall(fstrm.control_frame(fstrm.ACCEPT, (self.accept,)))
                        elif frame.kind == fstrm.STOP:
                            conn.sendall(fstrm.control_frame(fstrm.FINISH))
                            return
                        continue
                    if len(buffer) < 4 + length:
                        break
                    self.payloads.append(buffer[4 : 4 + length])
                    buffer = buffer[4 + length :]
        except OSError:
            pass
        finally:
            conn.close()
            self.done.set()

    def wait_for(self, count: int) -> list[bytes]:
        for _ in range(500):
            if len(self.payloads) >= count:
                break
            self.done.wait(0.01)
        return self.payloads

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for conn in self.connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes the thread's recv
            except OSError:
                pass
        self.thread.join(5)


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorded:
    def __init__(self) -> None:
        self.frames: dict[str, int] = {"sent": 0, "dropped": 0}
        self.up: list[bool] = []

    def counters(self) -> Counters:
        return Counters(lambda result, n: self.frames.__setitem__(result, self.frames[result] + n), self.up.append)


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "dnstap.sock"
    yield path
    path.unlink(missing_ok=True)


def make_sink(target: str, recorded: Recorded, clock: FakeMonotonic, messages: str = "all") -> DnstapSink:
    settings = DnstapSettings(target, b"id-1", b"v-1", messages)
    return DnstapSink(settings, recorded.counters(), clock_ns=lambda: 1_800_000_000_000_000_000, monotonic=clock)


QUERY = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01x\x00\x00\x01\x00\x01"
ANSWER = b"\x12\x34\x81\x80" + QUERY[4:]
BLOCKED = Verdict(GROUP, "tiktok", "tiktok.com", "sinkhole")


def test_sink_handshakes_and_streams_queries_and_responses(sock_path: Path) -> None:
    collector = Collector(sock_path)
    recorded, clock = Recorded(), FakeMonotonic()
    sink = make_sink(f"unix:{sock_path}", recorded, clock)
    sink.answered("10.120.0.7", 5353, "udp", QUERY, ANSWER, BLOCKED, False, 0)
    sink.answered("10.120.0.8", 5354, "tcp", QUERY, ANSWER, None, False, 1_799_999_999_000_000_000)
    sink.flush()
    payloads = [decoded(p) for p in collector.wait_for(4)]
    sink.stop()
    sink._out.close() if sink._out else None
    collector.done.wait(5)
    assert collector.controls == ["READY", "START", "STOP"]
    assert [p.message.type for p in payloads] == [pb.Message.CLIENT_QUERY, pb.Message.CLIENT_RESPONSE] * 2
    assert payloads[0].identity == b"id-1" and payloads[0].version == b"v-1"
    assert payloads[1].message.policy.rule == b"tiktok" and not payloads[3].message.HasField("policy")
    assert payloads[2].message.query_time_sec == 1_799_999_999  # a forwarded query: its arrival time
    assert payloads[3].message.response_time_sec == 1_800_000_000
    assert recorded.frames == {"sent": 4, "dropped": 0} and recorded.up == [True]
    collector.close()


@pytest.mark.parametrize(
    ("messages", "types"),
    [
        ("all", ["CQ", "CR", "CQ", "CR", "CQ", "CR", "CQ"]),
        ("blocked", ["CQ", "CR", "CQ", "CR", "CQ"]),
        ("responses", ["CR", "CR", "CR", "CQ"]),
    ],
)
def test_which_messages(sock_path: Path, messages: str, types: list[str]) -> None:
    collector = Collector(sock_path)
    sink = make_sink(f"unix:{sock_path}", Recorded(), FakeMonotonic(), messages)
    sink.answered("10.120.0.7", 1, "udp", QUERY, ANSWER, BLOCKED, False, 0)  # blocked
    sink.answered("10.120.0.7", 1, "udp", QUERY, ANSWER, None, False, 0)  # forwarded
    sink.answered("203.0.113.9", 1, "udp", QUERY, ANSWER, None, True, 0)  # refused
    sink.answered("10.120.0.7", 1, "udp", QUERY, None, BLOCKED, False, 0)  # dropped: no response
    sink.flush()
    names = {pb.Message.CLIENT_QUERY: "CQ", pb.Message.CLIENT_RESPONSE: "CR"}
    got = [names[decoded(p).message.type] for p in collector.wait_for(len(types))]
    assert got == types
    collector.close()


def test_events_wait_for_an_absent_collector_then_flow(sock_path: Path) -> None:
    recorded, clock = Recorded(), FakeMonotonic()
    sink = make_sink(f"unix:{sock_path}", recorded, clock)
    sink.answered("10.120.0.7", 1, "udp", QUERY, ANSWER, BLOCKED, False, 0)
    sink.flush()  # nobody listening: the event waits, encoded
    assert len(sink.chunks) == 1 and recorded.frames == {"sent": 0, "dropped": 0}
    collector = Collector(sock_path)
    sink.flush()  # within the backoff: no new attempt yet
    assert len(sink.chunks) == 1
    clock.now += dnstap.BACKOFF_FIRST
    sink.flush()
    assert len(collector.wait_for(2)) == 2 and recorded.frames["sent"] == 2
    collector.close()


def test_a_full_queue_drops_and_counts(sock_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dnstap, "QUEUE_LIMIT", 3)
    recorded = Recorded()
    sink = make_sink(f"unix:{sock_path}", recorded, FakeMonotonic())
    for _ in range(3):
        sink.answered("10.120.0.7", 1, "udp", QUERY, ANSWER, BLOCKED, False, 0)
    sink.answered("10.120.0.7", 1, "udp", QUERY, None, BLOCKED, False, 0)  # a drop: one frame
    repeat = BlockedRepeat(ANSWER[2:], BLOCKED, "tiktok.com", ("", ""), ([0], [0]), QUERY[2:])
    sink.repeated("10.120.0.7", 1, "udp", QUERY[:2], repeat)
    sink.encode()  # the bound applies here: the first three lookups kept, the newest dropped
    assert [events for _, _, events in sink.chunks] == [3]
    assert recorded.frames == {"sent": 0, "dropped": 1 + 2}


def test_a_collector_that_goes_away_is_reconnected(sock_path: Path) -> None:
    recorded, clock = Recorded(), FakeMonotonic()
    sink = make_sink(f"unix:{sock_path}", recorded, clock)
    first = Collector(sock_path)
    sink.answered("10.120.0.7", 1, "udp", QUERY, ANSWER, BLOCKED, False, 0)
    sink.flush()
    assert len(first.wait_for(2)) == 2
    first.close()
    sock_path.unlink()
    first.done.wait(5)
    # The closed connection is seen before the next batch is written: the batch waits, not lost.
    sink.answered("10.120.0.8", 1, "udp", QUERY, ANSWER, BLOCKED, False, 0)
    sink.flush()
    assert sink._out is None and len(sink.chunks) == 1
    assert recorded.up == [True, False] and recorded.frames == {"sent": 2, "dropped": 0}
    second = Collector(sock_path)
    clock.now += dnstap.BACKOFF_MAX
    sink.answered("10.120.0.9", 1, "udp", QUERY, ANSWER, BLOCKED, False, 0)
    sink.flush()
    payloads = [decoded(p) for p in second.wait_for(4)]
    assert [p.message.query_address for p in payloads] == [bytes([10, 120, 0, 8])] * 2 + [bytes([10, 120, 0, 9])] * 2
    assert recorded.up == [True, False, True] and recorded.frames == {"sent": 6, "dropped": 0}
    second.close()


def test_the_bound_counts_lookups_encoded_but_not_yet_written(sock_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dnstap, "QUEUE_LIMIT", 3)
    recorded, clock = Recorded(), FakeMonotonic()
    sink = make_sink(f"unix:{sock_path}", recorded, clock)
    for _ in range(2):
        sink.answered("10.120.0.7", 1, "udp", QUERY, ANSWER, BLOCKED, False, 0)
    sink.flush()  # no collector: two lookups encoded and waiting
    sink.answered("10.120.0.7", 1, "udp", QUERY, ANSWER, BLOCKED, False, 0)
    sink.answered("10.120.0.7", 1, "udp", QUERY, ANSWER, BLOCKED, False, 0)
    sink.encode()  # 2 waiting: room for one more
    assert recorded.frames == {"sent": 0, "dropped": 2}
    collector = Collector(sock_path)
    clock.now += dnstap.BACKOFF_MAX
    sink.flush()
    assert len(collector.wait_for(6)) == 6 and recorded.frames == {"sent": 6, "dropped": 2}
    sink.answered("10.120.0.7", 1, "udp", QUERY, ANSWER, BLOCKED, False, 0)  # written: room again
    sink.encode()
    assert [events for _, _, events in sink.chunks] == [1]
    collector.close()


def test_the_service_encodes_on_the_reactor_clock_and_finishes_on_stop(tmp_path: Path) -> None:
    path = tmp_path / "tap.fstrm"
    recorded, reactor = Recorded(), task.Clock()
    sink = make_sink(f"file:{path}", recorded, FakeMonotonic())
    service = DnstapService(sink, reactor)
    service.startService()
    try:
        sink.answered("10.120.0.7", 1, "udp", QUERY, ANSWER, BLOCKED, False, 0)
        assert len(sink.queue) == 1
        reactor.advance(dnstap.ENCODE_INTERVAL)
        assert not sink.queue and sum(n for _, n, _ in sink.chunks) in (0, 2)  # encoded (maybe written)
        sink.answered("10.120.0.8", 1, "udp", QUERY, ANSWER, BLOCKED, False, 0)
    finally:
        service.stopService()  # the last lookup is encoded and written before STOP
    data = path.read_bytes()
    assert data.endswith(fstrm.control_frame(fstrm.STOP)) and recorded.frames == {"sent": 4, "dropped": 0}


def test_an_encoding_failure_drops_and_counts_and_keeps_going(sock_path: Path) -> None:
    recorded = Recorded()
    sink = make_sink(f"unix:{sock_path}", recorded, FakeMonotonic())
    sink.answered("10.120.0.7", 1, "udp", QUERY, ANSWER, BLOCKED, False, 0)
    sink.queue.append(("not an event",))
    sink.encode()
    assert recorded.frames["dropped"] == 4 and not sink.queue and not sink.chunks
    sink.answered("10.120.0.7", 1, "udp", QUERY, ANSWER, BLOCKED, False, 0)
    sink.encode()
    assert len(sink.chunks) == 1


def test_a_collector_refusing_the_content_type_is_not_streamed_to(sock_path: Path) -> None:
    collector = Collector(sock_path, accept=b"protobuf:other")
    recorded = Recorded()
    sink = make_sink(f"unix:{sock_path}", recorded, FakeMonotonic())
    sink.answered("10.120.0.7", 1, "udp", QUERY, ANSWER, BLOCKED, False, 0)
    sink.flush()
    assert len(sink.chunks) == 1 and recorded.up == []
    collector.close()


def test_file_output_is_a_frame_stream_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "tap.fstrm"
    path.write_bytes(b"an earlier stream")
    recorded = Recorded()
    sink = make_sink(f"file:{path}", recorded, FakeMonotonic())
    sink.answered("10.120.0.7", 1, "udp", QUERY, ANSWER, BLOCKED, False, 0)
    sink.flush()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("tap.fstrm.")]
    assert len(kept) == 1 and kept[0].read_bytes() == b"an earlier stream"  # never overwritten
    rotated = tmp_path / "tap.fstrm.1"
    path.rename(rotated)
    sink.reopen()
    sink.answered("10.120.0.7", 1, "udp", QUERY, ANSWER, BLOCKED, False, 0)
    sink.flush()
    for stream in (rotated, path):
        data = stream.read_bytes()
        start = fstrm.control_frame(fstrm.START, (fstrm.DNSTAP_CONTENT_TYPE,))
        assert data.startswith(start)
        assert data.endswith(fstrm.control_frame(fstrm.STOP)) == (stream == rotated)
    assert recorded.frames["sent"] == 4


@settings(max_examples=100, deadline=None)
@given(
    host=hosts,
    port=st.integers(0, 65535),
    query=st.binary(max_size=300),
    response=st.one_of(st.none(), st.binary(max_size=3000)),
    received=times,
    delay=st.integers(0, 10**10),
    policy=policies,
    with_query=st.booleans(),
)
def test_the_stream_is_the_frames_of_the_payloads(
    host: str,
    port: int,
    query: bytes,
    response: bytes | None,
    received: int,
    delay: int,
    policy: PolicyFacts | None,
    with_query: bool,
) -> None:
    """What the writer sends for one lookup is the data frames of its CLIENT_QUERY and CLIENT_RESPONSE."""
    encoder = PayloadEncoder(b"id", b"v")
    answered = received + delay
    expected = []
    if with_query or response is None:
        expected.append(fstrm.data_frame(encoder.client_query(host, port, "udp", query, received, policy)))
    if response is not None:
        expected.append(
            fstrm.data_frame(encoder.client_response(host, port, "udp", response, received, answered, policy))
        )
    stream = encoder.client_stream(host, port, "udp", query, response, received, answered, policy, with_query)
    assert stream == b"".join(expected)


def test_the_c_encoder_is_built_where_ci_builds_blockd() -> None:
    """.ci/run installs blockd with a compiler there: the C loop must have been built, not silently
    skipped (it is optional only for installs without one)."""
    import blockd.dnstap_frames

    if os.environ.get("CI") != "true":
        pytest.skip("CI only: a developer's checkout may lack the compiled module")
    assert blockd.dnstap_frames._fast is not None


@settings(max_examples=150, deadline=None)
@given(
    clients=st.lists(hosts, min_size=1, max_size=2),
    ports=st.lists(st.integers(0, 65535), min_size=1, max_size=4),
    transport=st.sampled_from(["udp", "tcp"]),
    questions=st.lists(st.binary(max_size=300), min_size=1, max_size=2),
    tail=st.binary(max_size=600),
    at=st.lists(
        st.one_of(times, st.integers(1 << 28, (1 << 35) - 1).map(lambda s: s * 10**9 + 7)), min_size=1, max_size=6
    ),
    with_query=st.booleans(),
    ids=st.lists(st.binary(min_size=2, max_size=2), min_size=6, max_size=6),
)
def test_repeats_are_streamed_as_client_stream_would(
    clients: list[str],
    ports: list[int],
    transport: str,
    questions: list[bytes],
    tail: bytes,
    at: list[int],
    with_query: bool,
    ids: list[bytes],
) -> None:
    """Repeated blocked queries, encoded from kept parts (twice, so the second batch finds them
    kept), in C and in Python, give the bytes client_stream builds field by field."""
    repeats = [BlockedRepeat(tail, BLOCKED, "tiktok.com", ("", ""), ([0], [0]), question) for question in questions]
    facts = policy_facts(BLOCKED)
    assert facts is not None
    events = [
        (clients[i % len(clients)], ports[i % len(ports)], transport, ids[i], repeats[i % len(questions)], when)
        for i, when in enumerate(at)
    ]
    slow = PayloadEncoder(b"id", b"v")
    expected = b"".join(
        slow.client_stream(c, p, t, q + r.query_tail, q + r.answer_tail, w, w, facts, with_query)
        for c, p, t, q, r, w in events
    )
    for in_c in (True, False):  # blockd/_dnstap_fast.c (when built) and the Python loop
        fast = PayloadEncoder(b"id", b"v")
        fast.fast = in_c
        for _ in range(2):
            assert fast.repeat_streams(events, lambda v: facts, with_query) == expected
