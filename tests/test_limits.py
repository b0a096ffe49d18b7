"""blockd.limits (pure), blockd.kernel_filter (programs checked on real loopback sockets),
blockd.query_errors, and the raw answers of blockd.wire used for limited and failed queries."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import replace

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockd import kernel_filter, wire
from blockd.limits import ClientKeys, ClientLimits, Counts, Kind, KindLimits, LimitSettings, TokenBuckets, Verdict
from blockd.query_errors import ErrorReporter
from blockd.question import read_question

SMALL = KindLimits(qps=10, burst=5, upstream_in_flight=2, tcp_connections=2)


def limits(**changes: object) -> ClientLimits:
    return ClientLimits(replace(LimitSettings(client=SMALL), **changes))  # type: ignore[arg-type]


# -- client keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("v4", "v6", "address", "key"),
    [
        (32, 56, "192.0.2.7", "192.0.2.7"),
        (24, 56, "192.0.2.7", "192.0.2.0/24"),
        (32, 56, "2001:db8:1:2ff:a:b:c:d", "2001:db8:1:200::/56"),
        (32, 128, "2001:db8::1", "2001:db8::1"),
        (32, 56, "::ffff:192.0.2.7", "192.0.2.7"),  # IPv4-mapped: the IPv4 client
        (32, 56, "fe80::1%eth0", "fe80::/56"),
        (32, 56, "not-an-address", "not-an-address"),
    ],
)
def test_client_keys_aggregate_to_the_prefix(v4: int, v6: int, address: str, key: str) -> None:
    assert ClientKeys(v4, v6, 100).key(address) == key


def test_client_keys_memo_is_bounded() -> None:
    keys = ClientKeys(32, 56, 10)
    for n in range(100):
        keys.key(f"192.0.2.{n}")
    assert len(keys._memo) <= 10


# -- token buckets -------------------------------------------------------------------------------


def test_a_bucket_gives_its_burst_then_its_rate() -> None:
    buckets = TokenBuckets(rate=10, burst=5, max_clients=100)
    assert [buckets.take("a", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert buckets.wait("a", 0.0) == pytest.approx(0.1)
    assert not buckets.take("a", 0.05)
    assert buckets.take("a", 0.15)
    assert buckets.take("b", 0.15), "one client's bucket is another's"
    # Idle for long, it refills to the burst and no more.
    assert [buckets.take("a", 100.0) for _ in range(6)] == [True] * 5 + [False]


@given(st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=300))
def test_a_bucket_never_gives_more_than_burst_plus_rate_times_time(gaps: list[float]) -> None:
    buckets = TokenBuckets(rate=20, burst=4, max_clients=100)
    now = 0.0
    given_out = 0
    for gap in gaps:
        now += gap
        given_out += buckets.take("c", now)
    assert given_out <= 4 + 20 * now + 1e-6


def test_a_full_table_forgets_idle_clients_first() -> None:
    buckets = TokenBuckets(rate=1, burst=2, max_clients=100)
    for n in range(100):
        buckets.take(f"idle{n}", 0.0)
    buckets.take("busy", 0.0)  # a sweep at 0.0: nobody idle yet, so the table empties (counted)
    assert buckets.overflows == 1 and len(buckets) == 1
    for n in range(99):
        buckets.take(f"idle{n}", 0.0)
    for _ in range(3):
        buckets.take("busy", 10.0)
    buckets.take("new", 10.0)  # idle ones have refilled by now: they go, busy stays
    assert buckets.overflows == 1
    assert not buckets.take("busy", 10.0), "a limited client escaped its limit through a sweep"


# -- UDP verdicts --------------------------------------------------------------------------------


def test_over_the_rate_every_slip_th_query_gets_tc_and_the_others_are_dropped() -> None:
    lim = limits()
    verdicts = [lim.check_udp("192.0.2.1", Kind.CLIENT, 0.0) for _ in range(11)]
    assert verdicts[:5] == [Verdict.ANSWER] * 5
    assert verdicts[5:] == [Verdict.DROP, Verdict.SLIP] * 3


def test_over_limit_drop_never_slips() -> None:
    lim = limits(over_limit="drop")
    verdicts = {lim.check_udp("192.0.2.1", Kind.CLIENT, 0.0) for _ in range(20)}
    assert verdicts == {Verdict.ANSWER, Verdict.DROP}


def test_each_kind_has_its_own_limits_and_zero_means_unlimited() -> None:
    lim = limits(forwarder=KindLimits(qps=0, burst=1, upstream_in_flight=0, tcp_connections=0))
    assert all(lim.check_udp("192.0.2.9", Kind.FORWARDER, 0.0) == Verdict.ANSWER for _ in range(1000))
    outside = [lim.check_udp("198.51.100.1", Kind.OUTSIDE, 0.0) for _ in range(100)]
    assert outside.count(Verdict.ANSWER) == LimitSettings().outside.burst


def test_disabled_limits_answer_everything() -> None:
    lim = limits(enabled=False)
    assert all(lim.check_udp("192.0.2.1", Kind.CLIENT, 0.0) == Verdict.ANSWER for _ in range(100))
    assert lim.tcp_wait("192.0.2.1", Kind.CLIENT, 0.0) == 0.0


def test_a_client_far_over_its_rate_is_reported_as_flooding_once_a_window() -> None:
    lim = limits(kernel_block_qps=500)  # 50 over-limit queries within 0.1 s
    flooding: list[str] = []
    lim.on_flood = flooding.append
    for n in range(90):
        lim.check_udp("192.0.2.1", Kind.CLIENT, n / 1000)  # 1000 qps for 0.09 s
    assert flooding == ["192.0.2.1"]
    for n in range(90):
        lim.check_udp("192.0.2.1", Kind.CLIENT, 2 + n / 1000)
    assert flooding == ["192.0.2.1"] * 2
    for n in range(40):
        lim.check_udp("192.0.2.2", Kind.CLIENT, 5 + n / 10)  # 10 qps: only over its rate, not a flood
    assert flooding == ["192.0.2.1"] * 2


def test_tcp_wait_is_the_time_until_a_token() -> None:
    lim = limits()
    assert [lim.tcp_wait("192.0.2.1", Kind.CLIENT, 0.0) for _ in range(5)] == [0.0] * 5
    assert lim.tcp_wait("192.0.2.1", Kind.CLIENT, 0.0) == pytest.approx(0.1)


# -- counts --------------------------------------------------------------------------------------


def test_upstream_slots_per_client_and_in_total() -> None:
    lim = limits(upstream_in_flight_total=3)
    a1, a2 = lim.start_upstream("192.0.2.1", Kind.CLIENT), lim.start_upstream("192.0.2.1", Kind.CLIENT)
    assert a1 == a2 == "192.0.2.1"
    assert lim.start_upstream("192.0.2.1", Kind.CLIENT) is None
    assert lim.upstream_refusal == "upstream_in_flight"
    b = lim.start_upstream("192.0.2.2", Kind.CLIENT)
    assert b is not None
    assert lim.start_upstream("192.0.2.3", Kind.CLIENT) is None
    assert lim.upstream_refusal == "upstream_total"
    lim.finish_upstream(b)
    assert lim.start_upstream("192.0.2.3", Kind.CLIENT) is not None
    assert lim.upstream_in_flight() == 3


def test_counts_never_go_negative() -> None:
    counts = Counts()
    counts.release("x")
    assert counts.total == 0 and counts.held("x") == 0
    assert counts.acquire("x", 1) and not counts.acquire("x", 1)
    counts.release("x")
    assert counts.total == 0 and len(counts) == 0


def test_tcp_connection_slots() -> None:
    lim = limits()
    keys = [lim.open_tcp("192.0.2.1", Kind.CLIENT) for _ in range(3)]
    assert keys == ["192.0.2.1", "192.0.2.1", None]
    lim.close_tcp("192.0.2.1")
    assert lim.open_tcp("192.0.2.1", Kind.CLIENT) == "192.0.2.1"
    assert lim.tcp_connections() == 2


# -- kernel filters, on real sockets -------------------------------------------------------------


def _delivered(receiver: socket.socket, port: int, sources: list[str]) -> list[str]:
    got = []
    for source in sources:
        family = socket.AF_INET6 if ":" in source else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sender:
            sender.bind((source, 0))
            sender.sendto(b"x", ("::1" if family == socket.AF_INET6 else "127.0.0.1", port))
        try:
            receiver.recvfrom(10)
            got.append(source)
        except TimeoutError:
            pass
    return got


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_the_drop_program_drops_exactly_the_blocked_clients(family: int) -> None:
    host = "127.0.0.1" if family == socket.AF_INET else "::"
    with socket.socket(family, socket.SOCK_DGRAM) as receiver:
        receiver.bind((host, 0))
        receiver.settimeout(0.2)
        port = receiver.getsockname()[1]
        blocked = [ipaddress.ip_network(n) for n in ("127.0.0.5/32", "127.0.1.0/24")]
        if family == socket.AF_INET6:
            blocked.append(ipaddress.ip_network("::1/128"))
        kernel_filter.attach(receiver, kernel_filter.drop_program(blocked))
        sources = ["127.0.0.5", "127.0.0.6", "127.0.1.9", "127.0.2.9"]
        expected = ["127.0.0.6", "127.0.2.9"]
        assert _delivered(receiver, port, sources) == expected
        if family == socket.AF_INET6:
            assert _delivered(receiver, port, ["::1"]) == []
        kernel_filter.attach(receiver, kernel_filter.drop_program([]))
        assert _delivered(receiver, port, sources) == sources


def test_an_ipv6_prefix_that_is_not_a_word_boundary_is_masked() -> None:
    program = kernel_filter.drop_program([ipaddress.ip_network("2001:db8:1:200::/56")])
    assert len(program) % 8 == 0
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("::", 0))
        receiver.settimeout(0.2)
        kernel_filter.attach(receiver, program)  # the kernel verifies the program
        assert _delivered(receiver, receiver.getsockname()[1], ["::1", "127.0.0.1"]) == ["::1", "127.0.0.1"]


def test_the_program_holds_max_blocked_clients() -> None:
    networks = [ipaddress.ip_network((0x0A000000 + n, 32)) for n in range(kernel_filter.MAX_BLOCKED)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        kernel_filter.attach(receiver, kernel_filter.drop_program(networks))
    with pytest.raises(ValueError, match="at most"):
        kernel_filter.drop_program([*networks, ipaddress.ip_network("10.255.0.0/32")])


# -- query errors --------------------------------------------------------------------------------


def _raise(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as caught:  # noqa: BLE001 - a real traceback for error_kind
        return caught


def test_errors_get_one_traceback_per_kind_then_a_summary_per_interval() -> None:
    reporter = ErrorReporter(interval=60)
    first = reporter.report(_raise(ValueError("bad")), "192.0.2.1", 0.0)
    assert first is not None and first.with_traceback and "ValueError" in first.message
    assert all(reporter.report(_raise(ValueError("bad")), "192.0.2.1", t) is None for t in range(1, 59))
    summary = reporter.report(_raise(ValueError("bad")), "192.0.2.2", 61.0)
    assert summary is not None and not summary.with_traceback
    assert summary.message.startswith("59 queries failed") and "192.0.2.2" in summary.message
    other = reporter.report(_raise(KeyError("k")), "192.0.2.1", 62.0)
    assert other is not None and other.with_traceback


def test_a_huge_error_message_is_cut() -> None:
    report = ErrorReporter().report(_raise(ValueError("x" * 100_000)), "c", 0.0)
    assert report is not None and len(report.message) < 400


# -- raw answers ---------------------------------------------------------------------------------


def test_a_raw_tc_answer_carries_the_question_only() -> None:
    query = dns.message.make_query("www.example.org", "AAAA", use_edns=0)
    answer = wire.raw_response(query.to_wire(), wire.RCODE_NOERROR, wire.FLAG_TC)
    assert answer is not None
    parsed = dns.message.from_wire(answer)
    assert parsed.id == query.id and parsed.flags & dns.flags.TC and parsed.flags & dns.flags.QR
    assert parsed.question == query.question and not parsed.answer and parsed.edns == -1


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x00" * 5, None),  # not even a header: nothing to answer
        (struct.pack("!HHHHHH", 7, 0x8000, 1, 0, 0, 0), None),  # a response
        (struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\x05ab", dns.rcode.FORMERR),  # cut question
        (struct.pack("!HHHHHH", 7, 0x0100, 0, 0, 0, 0), dns.rcode.FORMERR),  # no question
        (struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\x01a\x00\x00\x01\x00\x01", dns.rcode.SERVFAIL),
    ],
)
def test_raw_servfail_for_whatever_can_be_read(data: bytes, expected: int | None) -> None:
    answer = wire.raw_response(data, wire.RCODE_SERVFAIL)
    if expected is None:
        assert answer is None
    else:
        assert answer is not None and answer[:2] == data[:2] and answer[3] & 0x0F == expected


@given(st.binary(max_size=600))
def test_raw_response_never_raises(data: bytes) -> None:
    wire.raw_response(data, wire.RCODE_SERVFAIL, wire.FLAG_TC)


def test_the_minimal_any_answer_is_one_hinfo() -> None:
    for edns in (False, 0):
        query = dns.message.make_query("Example.ORG", "ANY", use_edns=edns)
        parsed_query = read_question(query.to_wire())
        assert isinstance(parsed_query, wire.Query)
        answer = dns.message.from_wire(wire.minimal_any_response(parsed_query))
        assert answer.id == query.id and answer.question == query.question
        (rrset,) = answer.answer
        assert rrset.rdtype == dns.rdatatype.HINFO and rrset.ttl == wire.RFC8482_TTL
        assert rrset.name.to_text() == "Example.ORG."
        assert rrset[0].cpu == b"RFC8482" and rrset[0].os == b""
        assert (answer.edns == 0) == (edns is not False)


# -- the repeated-query memo ---------------------------------------------------------------------


def test_the_repeat_memo_is_bounded_in_bytes() -> None:
    from blockd.repeats import BlockedRepeat, RepeatMemo

    memo = RepeatMemo(max_entries=1000, max_query_bytes=512, max_bytes=10_000)
    policy = object()
    memo.lookup(policy, None, b"")  # type: ignore[arg-type]  # adopt the snapshot
    for n in range(200):
        data = n.to_bytes(2, "big") + bytes(300)
        repeat = BlockedRepeat(b"a" * 100, None, "x", ("", ""), ([0], [0]))  # type: ignore[arg-type]
        memo.remember(policy, None, data[:2] + n.to_bytes(4, "big") + data[6:], repeat)  # type: ignore[arg-type]
        assert memo.bytes <= 10_000
    assert memo.clears > 0
    big = bytes(600)  # over max_query_bytes: never remembered
    memo.remember(policy, None, big, repeat)  # type: ignore[arg-type]
    assert memo.lookup(policy, None, big) is None  # type: ignore[arg-type]


# -- sampled logging -----------------------------------------------------------------------------


def test_the_sampler_logs_one_line_per_client_per_interval_with_the_count() -> None:
    from blockd.log_sampling import Sampler

    sampler = Sampler(interval=10)
    assert sampler.sample("a", 0.0) == 0
    assert [sampler.sample("a", t) for t in (1.0, 2.0, 9.9)] == [None, None, None]
    assert sampler.sample("b", 5.0) == 0, "one client's silence is not another's"
    assert sampler.sample("a", 10.0) == 3
    assert sampler.sample("a", 10.5) is None
    assert sampler.sample("a", 30.0) == 1


def test_the_sampler_is_bounded() -> None:
    from blockd.log_sampling import Sampler

    sampler = Sampler(max_clients=100)
    for n in range(1000):
        sampler.sample(f"c{n}", 0.0)
    assert len(sampler._seen) <= 100
