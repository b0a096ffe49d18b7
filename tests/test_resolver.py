"""blockd.resolver.Resolver in process: the query path's steps with a fake upstream and a task.Clock.

Every test builds a real policy snapshot from config text, a real AnswerCache and RepeatMemo,
and drives Resolver.handle() with wire bytes from dnspython; the upstream is a fake whose
answers the test gives (or withholds, or garbles) by hand.  No sockets, no sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from prometheus_client import CollectorRegistry
from twisted.internet import defer, task

from blockd import wire
from blockd.cache import AnswerCache
from blockd.config import parse_config
from blockd.metrics import Metrics
from blockd.notify import NoZones
from blockd.policy import Group, Policy, Verdict, build_policy
from blockd.repeats import BlockedRepeat, CachedRepeat, RepeatMemo
from blockd.resolver import IgnoreAnswers, Resolver
from blockd.upstream import UpstreamError
from blockd.upstream_answer import AnswerInfo
from blockd.wire import Query

GOV = "10.120.0.7"
OTHER = "192.0.2.50"
FORWARDER = "10.9.9.9"
BARRED = "203.0.113.9"

CONFIG = """
[server]
allow = ["10.0.0.0/8", "192.0.2.0/24"]
trusted_forwarders = ["10.9.9.9/32"]

[upstream]
servers = ["127.0.0.1:5399"]

[lists.tiktok]
path = "tiktok.txt"

[lists.watch]
path = "watch.txt"

[groups.government]
networks = ["10.120.0.0/16"]
lists = ["tiktok"]
action = "sinkhole"
ttl = 60

[groups.personal]
networks = ["192.0.2.0/25"]
lists = ["watch"]
action = "monitor"
"""


@dataclass
class FakeUpstreams:
    """Keeps every forwarded query's Deferred for the test to fire."""

    sent: list[tuple[bytes, bytes, defer.Deferred[bytes]]] = field(default_factory=list)

    def resolve(self, message: bytes, question: bytes) -> defer.Deferred[bytes]:
        deferred: defer.Deferred[bytes] = defer.Deferred()
        self.sent.append((message, question, deferred))
        return deferred

    def answer(self, index: int = -1, **records: Any) -> None:
        """Answer a forwarded query like a real upstream: its ID, its question, the given records."""
        message, _question, deferred = self.sent[index]
        deferred.callback(upstream_answer(message, **records))


def upstream_answer(
    message: bytes, a: str | None = "192.0.2.1", ttl: int = 300, cname: str | None = None, rcode: int = 0
) -> bytes:
    request = dns.message.from_wire(message)
    response = dns.message.make_response(request)
    response.set_rcode(rcode)
    name = request.question[0].name
    if cname is not None:
        response.answer.append(dns.rrset.from_text(name, ttl, "IN", "CNAME", cname))
        name = dns.name.from_text(cname)
    if a is not None and rcode == 0:
        response.answer.append(dns.rrset.from_text(name, ttl, "IN", "A", a))
    return response.to_wire()


class RecordingObserver:
    logs_blocked = True

    def __init__(self) -> None:
        self.lines: list[tuple[str, str | None, str, str | None, int, bool]] = []
        self.repeats: list[tuple[str, str]] = []
        self.transports: list[tuple[str, int]] = []

    def answered(
        self,
        client: str,
        group: Group | None,
        query: Query,
        verdict: Verdict | None,
        rcode: int,
        denied: bool = False,
        transport: str = "udp",
        duration_ms: int = 0,
    ) -> None:
        self.transports.append((transport, duration_ms))
        action = verdict.action if verdict is not None else None
        self.lines.append((client, group.name if group else None, query.key, action, rcode, denied))

    def repeated(self, client: str, tail: str) -> None:
        self.repeats.append((client, tail))

    def unreadable(
        self, client: str, group: Group | None, key: str | None, qtype: int, rcode: int, transport: str = "udp"
    ) -> None:
        self.lines.append((client, group.name if group else None, key or "", "error", rcode, False))

    def sampled(
        self,
        client: str,
        group: Group | None,
        query: Query | None,
        action: str,
        rcode: int,
        suppressed: int,
        transport: str = "udp",
    ) -> None:
        key = query.key if query is not None else ""
        self.lines.append((client, group.name if group else None, key, None, rcode, action == "denied"))


class RecordingTap:
    """A WireTap (dnstap) that keeps what it is told; its clock is the test's."""

    active = True

    def __init__(self) -> None:
        self.events: list[tuple[str, int, str, bytes, bytes | None, str | None, bool, int]] = []
        self.clock_ns = 1_000

    def now_ns(self) -> int:
        return self.clock_ns

    def answered(
        self,
        client: str,
        port: int,
        transport: str,
        query: bytes,
        answer: bytes | None,
        verdict: Verdict | None,
        denied: bool,
        received_ns: int,
    ) -> None:
        action = verdict.action if verdict is not None else None
        self.events.append((client, port, transport, query, answer, action, denied, received_ns))

    def repeated(self, client: str, port: int, transport: str, query_id: bytes, repeat: BlockedRepeat) -> None:
        query, answer = query_id + repeat.query_tail, query_id + repeat.answer_tail  # what was asked and got
        self.events.append((client, port, transport, query, answer, repeat.verdict.action, False, 0))


class RecordingWatcher(IgnoreAnswers):
    def __init__(self) -> None:
        self.answers: list[tuple[tuple[str, ...], str | None]] = []
        self.blocked: list[str] = []

    def answer_seen(self, info: AnswerInfo, verdict: Verdict | None, group: Group | None) -> None:
        self.answers.append((info.names, verdict.action if verdict else None))

    def question_blocked(self, name: str, verdict: Verdict) -> None:
        self.blocked.append(name)


class Harness:
    def __init__(
        self, directory: Path, config_text: str = CONFIG, tiktok: str = "tiktok.com\n", tap: RecordingTap | None = None
    ):
        self.directory = directory
        (directory / "tiktok.txt").write_text(tiktok)
        (directory / "watch.txt").write_text("watched.example\n")
        self.config_text = config_text
        self.policy = self.build()
        self.clock = task.Clock()
        self.upstreams = FakeUpstreams()
        self.metrics = Metrics(CollectorRegistry())
        self.observer = RecordingObserver()
        self.watcher = RecordingWatcher()
        self.cache = AnswerCache(1000)
        self.repeats = RepeatMemo()
        self.resolver = Resolver(
            lambda: self.policy,
            self.upstreams,
            self.metrics,
            self.observer,
            self.cache,
            self.clock,
            self.watcher,
            self.repeats,
            NoZones(),
            tap=tap,
        )

    def build(self) -> Policy:
        return build_policy(parse_config(self.config_text, "test.toml", self.directory))

    def ask(
        self, name: str, qtype: str = "A", client: str = OTHER, transport: str = "udp", **kwargs: Any
    ) -> bytes | defer.Deferred[bytes | None] | None:
        query = dns.message.make_query(name, qtype, **kwargs)
        return self.resolver.handle(query.to_wire(), client, transport)

    def answer_now(self, *args: Any, **kwargs: Any) -> dns.message.Message:
        result = self.ask(*args, **kwargs)
        assert isinstance(result, bytes), f"expected an answer now, got {result!r}"
        return dns.message.from_wire(result)

    def queries(self, group: str, transport: str = "udp") -> float:
        value = self.metrics.registry.get_sample_value(
            "blockd_dns_queries_total", {"group": group, "transport": transport}
        )
        return value or 0.0

    def blocked(self, group: str, list_name: str, action: str) -> float:
        labels = {"group": group, "list": list_name, "action": action}
        return self.metrics.registry.get_sample_value("blockd_dns_blocked_total", labels) or 0.0


def result_of(deferred: Any) -> dns.message.Message:
    assert isinstance(deferred, defer.Deferred)
    assert deferred.called, "the answer is still pending"
    value = deferred.result
    assert isinstance(value, bytes)
    return dns.message.from_wire(value)


def addresses(message: dns.message.Message) -> list[str]:
    return [r.to_text() for rrset in message.answer for r in rrset if rrset.rdtype == dns.rdatatype.A]


def ede(message: dns.message.Message) -> list[tuple[int, str]]:
    return [(o.code, o.text or "") for o in message.options if isinstance(o, dns.edns.EDEOption)]


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


# --- one table: client + question -> what the query path answers at once ---------------------


@pytest.mark.parametrize(
    ("client", "name", "qtype", "rcode", "answer", "ede_code"),
    [
        (GOV, "tiktok.com", "A", "NOERROR", ["0.0.0.0"], 15),
        (GOV, "www.TikTok.com", "A", "NOERROR", ["0.0.0.0"], 15),
        (GOV, "v16.tiktok.com", "AAAA", "NOERROR", [], 15),
        (GOV, "tiktok.com", "MX", "NOERROR", [], 15),
        (GOV, "use-application-dns.net", "A", "NXDOMAIN", [], 15),
        (GOV, "resolver.arpa", "SVCB", "NOERROR", [], 15),
        (BARRED, "example.com", "A", "REFUSED", [], 18),
        (BARRED, "tiktok.com", "A", "REFUSED", [], 18),
    ],
    ids=lambda value: str(value),
)
def test_answered_locally(
    harness: Harness, client: str, name: str, qtype: str, rcode: str, answer: list[str], ede_code: int
) -> None:
    message = harness.answer_now(name, qtype, client=client, use_edns=0)
    assert dns.rcode.to_text(message.rcode()) == rcode
    assert addresses(message) == answer
    assert [code for code, _ in ede(message)] == [ede_code]
    assert harness.upstreams.sent == []


@pytest.mark.parametrize(
    ("client", "name", "verdict_action"),
    [
        (OTHER, "tiktok.com", None),  # personal group: tiktok is not on its lists
        ("192.0.2.200", "tiktok.com", None),  # allowed, in no group
        (OTHER, "watched.example", "monitor"),  # monitored: forwarded, counted, logged
        (GOV, "nottiktok.com", None),
        (GOV, "tiktok.com.example.net", None),
    ],
    ids=lambda value: str(value),
)
def test_forwarded(harness: Harness, client: str, name: str, verdict_action: str | None) -> None:
    pending = harness.ask(name, client=client)
    assert isinstance(pending, defer.Deferred) and not pending.called
    harness.upstreams.answer()
    assert addresses(result_of(pending)) == ["192.0.2.1"]
    assert harness.observer.lines[-1][3] == verdict_action


# --- classify before policy; ECS only from trusted forwarders ---------------------------------


def ecs(subnet: str, prefix: int) -> dict[str, Any]:
    return {"use_edns": 0, "options": [dns.edns.ECSOption(subnet, prefix)]}


@pytest.mark.parametrize(
    ("client", "subnet", "prefix", "blocked"),
    [
        (FORWARDER, "10.120.3.0", 24, True),  # a government subnet behind the trusted forwarder
        (FORWARDER, "10.120.0.0", 16, True),  # exactly the group's network
        (FORWARDER, "10.0.0.0", 8, False),  # wider than any group network: no group
        (FORWARDER, "192.0.2.0", 25, False),  # the personal group's network
        (OTHER, "10.120.3.0", 24, False),  # an untrusted client cannot claim a subnet
        (GOV, "192.0.2.0", 25, True),  # nor escape its own group
    ],
)
def test_ecs_classifies_only_from_trusted_forwarders(
    harness: Harness, client: str, subnet: str, prefix: int, blocked: bool
) -> None:
    result = harness.ask("www.tiktok.com", client=client, **ecs(subnet, prefix))
    if blocked:
        assert isinstance(result, bytes)
        assert addresses(dns.message.from_wire(result)) == ["0.0.0.0"]
    else:
        assert isinstance(result, defer.Deferred)
        harness.upstreams.answer()
        assert addresses(result_of(result)) == ["192.0.2.1"]


def test_forwarder_answers_are_never_remembered(harness: Harness) -> None:
    """Its answer depends on the ECS option, which the repeat key does not read."""
    harness.answer_now("www.tiktok.com", client=FORWARDER, **ecs("10.120.3.0", 24))
    assert len(harness.repeats) == 0
    again = harness.ask("www.tiktok.com", client=FORWARDER, **ecs("192.0.2.0", 25))
    assert isinstance(again, defer.Deferred)  # classified afresh: not the remembered sinkhole


# --- repeats: memo hit, its counting, and its invalidation -----------------------------------


def test_repeated_blocked_query_is_answered_from_the_memo(harness: Harness) -> None:
    first = harness.ask("www.tiktok.com", client=GOV)
    assert isinstance(first, bytes)
    (remembered,) = harness.repeats._entries.values()
    assert isinstance(remembered, BlockedRepeat)
    query = dns.message.make_query("www.tiktok.com", "A")
    query.id = 0x4242
    second = harness.resolver.handle(query.to_wire(), GOV, "tcp")
    assert isinstance(second, bytes)
    assert second[:2] == b"\x42\x42" and second[2:] == first[2:]
    # Counted and logged like the first, through the memo's own counters and log tail.
    assert harness.queries("government", "udp") == 1 and harness.queries("government", "tcp") == 1
    assert harness.blocked("government", "tiktok", "sinkhole") == 2
    assert len(harness.observer.lines) == 1 and len(harness.observer.repeats) == 1
    assert '"qname":"www.tiktok.com"' in harness.observer.repeats[0][1]
    assert harness.watcher.blocked == ["www.tiktok.com", "www.tiktok.com"]


def test_policy_swap_between_two_queries(harness: Harness) -> None:
    """A reload that lists a name blocks its very next query, memo and cache notwithstanding."""
    first = harness.ask("newly.example", client=GOV)
    harness.upstreams.answer()
    assert addresses(result_of(first)) == ["192.0.2.1"]
    assert addresses(harness.answer_now("newly.example", client=GOV)) == ["192.0.2.1"]  # cache hit
    (harness.directory / "tiktok.txt").write_text("tiktok.com\nnewly.example\n")
    harness.policy = harness.build()
    assert addresses(harness.answer_now("newly.example", client=GOV)) == ["0.0.0.0"]
    # And back: unlisted again, the cached upstream answer serves without a new upstream query.
    (harness.directory / "tiktok.txt").write_text("tiktok.com\n")
    harness.policy = harness.build()
    assert addresses(harness.answer_now("newly.example", client=GOV)) == ["192.0.2.1"]
    assert len(harness.upstreams.sent) == 1


def test_cached_repeat_is_dropped_when_the_cache_entry_changes(harness: Harness) -> None:
    first = harness.ask("short.example")
    harness.upstreams.answer(ttl=5)
    result_of(first)
    assert addresses(harness.answer_now("short.example")) == ["192.0.2.1"]
    assert any(isinstance(r, CachedRepeat) for r in harness.repeats._entries.values())
    harness.clock.advance(6)  # the entry expired: the memo must not serve it
    pending = harness.ask("short.example")
    assert isinstance(pending, defer.Deferred)
    harness.upstreams.answer(a="192.0.2.99")
    assert addresses(result_of(pending)) == ["192.0.2.99"]
    assert addresses(harness.answer_now("short.example")) == ["192.0.2.99"]


def test_groups_never_share_remembered_answers(harness: Harness) -> None:
    assert addresses(harness.answer_now("www.tiktok.com", client=GOV)) == ["0.0.0.0"]
    pending = harness.ask("www.tiktok.com", client=OTHER)
    assert isinstance(pending, defer.Deferred)


def test_oversized_query_is_answered_but_not_remembered(harness: Harness) -> None:
    query = dns.message.make_query(
        "www.tiktok.com", "A", use_edns=0, options=[dns.edns.GenericOption(65001, b"x" * 600)]
    )
    answer = harness.resolver.handle(query.to_wire(), GOV, "udp")
    assert isinstance(answer, bytes)
    assert addresses(dns.message.from_wire(answer)) == ["0.0.0.0"]
    assert len(harness.repeats) == 0


# --- cache and in-flight join -------------------------------------------------------------


def test_identical_questions_in_flight_share_one_upstream_query(harness: Harness) -> None:
    waiting = [harness.ask("shared.example", client=client) for client in (OTHER, GOV, OTHER)]
    assert len(harness.upstreams.sent) == 1
    assert all(isinstance(w, defer.Deferred) and not w.called for w in waiting)
    harness.upstreams.answer()
    assert [addresses(result_of(w)) for w in waiting] == [["192.0.2.1"]] * 3
    assert len(harness.resolver.in_flight) == 0


def test_in_flight_answer_checked_per_asker_group(harness: Harness) -> None:
    """Two groups share one upstream query; its CNAME to a listed name blocks only the blocking group."""
    gov = harness.ask("cloaked.example", client=GOV, use_edns=0)
    other = harness.ask("cloaked.example", client=OTHER, use_edns=0)
    assert len(harness.upstreams.sent) == 1
    harness.upstreams.answer(cname="edge.tiktok.com.")
    gov_answer, other_answer = result_of(gov), result_of(other)
    assert addresses(gov_answer) == ["0.0.0.0"]
    assert "CNAME chain" in ede(gov_answer)[0][1]
    assert addresses(other_answer) == ["192.0.2.1"]


def test_ttl_ages_on_the_clock(harness: Harness) -> None:
    first = harness.ask("aging.example")
    harness.upstreams.answer(ttl=300)
    assert result_of(first).answer[0].ttl == 300
    harness.clock.advance(10)
    assert harness.answer_now("Aging.Example").answer[0].ttl == 290
    harness.clock.advance(250)
    message = harness.answer_now("aging.example")
    assert message.answer[0].ttl == 40
    assert message.question[0].name.to_text() == "aging.example."
    assert len(harness.upstreams.sent) == 1


def test_big_answer_truncated_for_udp_not_for_tcp(harness: Harness) -> None:
    first = harness.ask("big.example")
    message, _question, deferred = harness.upstreams.sent[0]
    response = dns.message.make_response(dns.message.from_wire(message))
    response.answer.append(
        dns.rrset.from_text_list("big.example.", 300, "IN", "A", [f"192.0.2.{i}" for i in range(1, 60)])
    )
    deferred.callback(response.to_wire())
    truncated = result_of(first)
    assert truncated.flags & dns.flags.TC and not truncated.answer
    assert len(harness.answer_now("big.example", transport="tcp").answer[0]) == 59


# --- what upstream failures give the client ---------------------------------------------------


def garbage_after_question(message: bytes) -> bytes:
    """A response that claims an answer record and then ends."""
    header = bytearray(message[:12])
    header[2] |= 0x80
    header[7] = 1  # ANCOUNT 1
    return bytes(header) + message[12:] + b"\xc0\x0c\x00\x01"


@pytest.mark.parametrize(
    ("name", "fail"),
    [
        ("dead.example", lambda message, d: d.errback(UpstreamError("no upstream answered"))),
        ("garbled.example", lambda message, d: d.callback(garbage_after_question(message))),
        ("short.example", lambda message, d: d.callback(message[:7])),
        ("bug.example", lambda message, d: d.errback(RuntimeError("upstream client bug"))),
    ],
    ids=["every-upstream-failed", "truncated-record", "shorter-than-a-header", "unexpected-error"],
)
def test_upstream_failures_are_servfail_for_every_waiting_client(harness: Harness, name: str, fail: Any) -> None:
    waiting = [harness.ask(name, client=client, use_edns=0) for client in (OTHER, GOV)]
    message, _question, deferred = harness.upstreams.sent[0]
    fail(message, deferred)
    for pending in waiting:
        answer = result_of(pending)
        assert answer.rcode() == dns.rcode.SERVFAIL
        assert ede(answer)[0][0] == wire.EDE_NO_REACHABLE_AUTHORITY
    assert len(harness.resolver.in_flight) == 0
    # Nothing was cached: the next query goes upstream again.
    assert isinstance(harness.ask(name), defer.Deferred) and len(harness.upstreams.sent) == 2


def test_truncated_upstream_answer_is_passed_on_but_not_cached(harness: Harness) -> None:
    first = harness.ask("tc.example")
    message, _question, deferred = harness.upstreams.sent[0]
    response = dns.message.make_response(dns.message.from_wire(message))
    response.flags |= dns.flags.TC
    deferred.callback(response.to_wire())
    assert result_of(first).flags & dns.flags.TC
    assert isinstance(harness.ask("tc.example"), defer.Deferred)


def test_the_upstream_message_drops_hop_by_hop_options(harness: Harness) -> None:
    cookie = dns.edns.GenericOption(dns.edns.COOKIE, b"12345678")
    harness.ask("example.org", use_edns=0, options=[cookie, dns.edns.ECSOption("192.0.2.0", 24)])
    sent = dns.message.from_wire(harness.upstreams.sent[0][0])
    assert sent.edns == 0 and not sent.options


def test_slow_path_queries_take_the_same_steps(harness: Harness) -> None:
    """A query only dnslib reads (an escaped "." inside a label here) is blocked and counted the same way."""
    query = dns.message.make_query(dns.name.from_text(r"a\.b.tiktok.com"), "A")
    assert wire.parse_query(query.to_wire()) is None
    answer = harness.resolver.handle(query.to_wire(), GOV, "udp")
    assert isinstance(answer, bytes)
    assert dns.message.from_wire(answer).rcode() == dns.rcode.NOERROR  # blocked locally: NODATA
    assert len(harness.repeats) == 0  # slow-path queries are not remembered
    assert harness.queries("government") == 1


def test_unreadable_packets(harness: Harness) -> None:
    assert harness.resolver.handle(b"\x12\x34", OTHER, "udp") is None
    response = dns.message.make_response(dns.message.make_query("example.com", "A")).to_wire()
    assert harness.resolver.handle(response, OTHER, "udp") is None
    notify = bytearray(dns.message.make_query("example.com", "SOA").to_wire())
    notify[2] |= 0x20  # opcode NOTIFY
    answer = harness.resolver.handle(bytes(notify), OTHER, "udp")
    assert isinstance(answer, bytes) and answer[3] & 0x0F == wire.RCODE_NOTIMP
    dropped = harness.metrics.registry.get_sample_value("blockd_dns_dropped_total", {"reason": "short"})
    assert dropped == 1


# --- the wire tap (dnstap): one report per answer, with the bytes the client sent and got -------


def test_the_tap_sees_every_answer_with_its_wire_messages(tmp_path: Path) -> None:
    tap = RecordingTap()
    harness = Harness(tmp_path, tap=tap)
    query = dns.message.make_query("www.tiktok.com", "A").to_wire()
    blocked = harness.resolver.handle(query, GOV, "udp", 40000)
    repeat_query = b"\x42\x42" + query[2:]
    repeated = harness.resolver.handle(repeat_query, GOV, "tcp", 40001)
    refused_query = dns.message.make_query("example.com", "A").to_wire()
    refused = harness.resolver.handle(refused_query, BARRED, "udp", 40002)
    tap.clock_ns = 5_000  # the forwarded query arrives now; its answer comes later
    forwarded_query = dns.message.make_query("example.com", "A").to_wire()
    pending = harness.resolver.handle(forwarded_query, OTHER, "udp", 40003)
    assert tap.events == [
        (GOV, 40000, "udp", query, blocked, "sinkhole", False, 0),
        (GOV, 40001, "tcp", repeat_query, repeated, "sinkhole", False, 0),
        (BARRED, 40002, "udp", refused_query, refused, None, True, 0),
    ]
    harness.upstreams.answer()
    answer = pending.result  # type: ignore[union-attr]
    assert tap.events[-1] == (OTHER, 40003, "udp", forwarded_query, answer, None, False, 5_000)
    cached = harness.resolver.handle(forwarded_query, OTHER, "udp", 40004)  # a cache hit: answered now
    assert tap.events[-1] == (OTHER, 40004, "udp", forwarded_query, cached, None, False, 0)


def test_the_tap_sees_a_failed_forward_as_its_servfail(tmp_path: Path) -> None:
    tap = RecordingTap()
    harness = Harness(tmp_path, tap=tap)
    query = dns.message.make_query("watched.example", "A").to_wire()
    pending = harness.resolver.handle(query, OTHER, "tcp", 7)
    harness.upstreams.sent[-1][2].errback(UpstreamError("no upstream answered"))
    servfail = pending.result  # type: ignore[union-attr]
    assert dns.message.from_wire(servfail).rcode() == dns.rcode.SERVFAIL
    assert tap.events == [(OTHER, 7, "tcp", query, servfail, "monitor", False, 1_000)]


def test_an_unreadable_packet_is_tapped_with_its_answer(tmp_path: Path) -> None:
    tap = RecordingTap()
    harness = Harness(tmp_path, tap=tap)
    packet = b"\x12\x34\x01\x00\x00\x02" + b"\x00" * 6  # two questions: FORMERR
    answer = harness.resolver.handle(packet, OTHER, "udp", 9)
    assert isinstance(answer, bytes) and tap.events == [(OTHER, 9, "udp", packet, answer, None, False, 0)]


@pytest.mark.parametrize("qtype", ["DS", "DNSKEY", "NSEC", "NSEC3", "NSEC3PARAM"])
def test_dnssec_infrastructure_of_a_blocked_name_is_forwarded(harness: Harness, qtype: str) -> None:
    """A validator in front of blockd must prove a blocked zone insecure: these go upstream."""
    pending = harness.ask("tiktok.com", qtype, client=GOV, want_dnssec=True)
    assert isinstance(pending, defer.Deferred) and harness.upstreams.sent
    assert harness.blocked("government", "tiktok", "sinkhole") == 0
    assert addresses(harness.answer_now("tiktok.com", "A", client=GOV)) == ["0.0.0.0"]  # the rest: blocked


def test_the_log_says_each_query_s_transport_and_how_long_its_answer_took(harness: Harness) -> None:
    waiting = harness.ask("slow.example", transport="tcp")
    harness.clock.advance(0.25)
    harness.upstreams.answer()
    result_of(waiting)
    harness.answer_now("slow.example")  # from the cache: at once
    harness.answer_now("www.tiktok.com", client=GOV)  # blocked: at once
    assert harness.observer.transports == [("tcp", 250), ("udp", 0), ("udp", 0)]
