"""The query path: bytes in, bytes out.

    parse (fast path, dnslib fallback) -> allowed? -> classify client (ECS from trusted
    forwarders) -> policy on the question -> cache -> upstreams -> policy on the answer

Why this order: classification comes first because every later step depends on the group;
the question is checked before the cache so that a name listed by a reload is blocked on its
very next query; the cache holds upstream answers *before* policy, and the answer check (CNAME
cloaking, blocked addresses) runs on every answer, cached or fresh, for the asking client's
group, so one group's view is never served to another.  Blocked names are answered here from
bytes; errors map to rcodes here and nowhere else.  The policy snapshot is read once per query,
so a reload swapping it never changes a query half-way.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from blockd import slowpath, wire
from blockd.cache import AnswerCache, CacheEntry, CacheKey, cache_key, render
from blockd.metrics import Metrics
from blockd.policy import NO_GROUP, Group, Policy, Verdict
from blockd.querylog import line_tail
from blockd.upstream import UpstreamError, Upstreams
from blockd.upstream_answer import AnswerInfo, MalformedAnswer, analyze
from blockd.wire import Query

_log = Logger()


class QueryObserver(Protocol):
    """Receives one call per answered query (the query log)."""

    def __call__(
        self, client: str, group: Group | None, query: Query, verdict: Verdict | None, rcode: int, denied: bool = False
    ) -> None: ...


def _ignore_answer(info: AnswerInfo, verdict: Verdict | None, group: Group | None) -> None:
    return None


def _ignore_blocked(key: str, verdict: Verdict) -> None:
    return None


class MonotonicClock:
    def seconds(self) -> float:
        return time.monotonic()


class _NoLog:
    logs_blocked = False

    def __call__(
        self, client: str, group: Group | None, query: Query, verdict: Verdict | None, rcode: int, denied: bool = False
    ) -> None:
        return None

    def write(self, client: str, tail: str) -> None:
        return None


# Repeated queries: (group, query bytes after the ID) -> the answer given, valid while the
# policy snapshot is the same object (a reload or an interface change replaces it).  A blocked
# answer depends only on those bytes and the group's policy; a cache hit also on the cache
# entry, which is checked to be the current one before it is used.
_BLOCKED = 0
_CACHED = 1
_MEMO_LIMIT = 50_000


class _Asker:
    """One client waiting for a forwarded answer (several share one upstream query)."""

    __slots__ = ("client", "deferred", "group", "policy", "query", "record", "transport", "trusted", "verdict")

    def __init__(
        self,
        query: Query,
        record: Any,
        client: str,
        group: Group | None,
        verdict: Verdict | None,
        transport: str,
        policy: Policy,
        trusted: bool = False,
    ):
        self.trusted = trusted
        self.query = query
        self.record = record
        self.client = client
        self.group = group
        self.verdict = verdict
        self.transport = transport
        self.policy = policy
        self.deferred: defer.Deferred[bytes | None] = defer.Deferred()


class Resolver:
    def __init__(
        self,
        policy: Callable[[], Policy],
        upstreams: Upstreams,
        metrics: Metrics,
        query_log: QueryObserver | None = None,
        cache: AnswerCache | None = None,
        clock: IReactorTime | None = None,
        forward_ecs: bool = False,
        on_answer: Callable[[AnswerInfo, Verdict | None, Group | None], None] = _ignore_answer,
        on_blocked_question: Callable[[str, Verdict], None] = _ignore_blocked,
    ):
        self.policy = policy
        self.upstreams = upstreams
        self.metrics = metrics
        self.query_log = query_log if query_log is not None else _NoLog()
        self.cache = cache if cache is not None else AnswerCache(size=0)
        # The cache ages entries on a monotonic clock: a wall-clock step must not stretch TTLs.
        self.clock = clock if clock is not None else MonotonicClock()
        self.forward_ecs = forward_ecs
        self.on_answer = on_answer  # egress learning sees every upstream answer with its verdict
        self.on_blocked_question = on_blocked_question  # (query key, verdict) of every blocked question
        self.in_flight: dict[CacheKey, list[_Asker]] = {}
        self._memo: dict[tuple[Group | None, bytes], tuple[Any, ...]] = {}
        self._memo_policy: Policy | None = None

    def handle(self, data: bytes, client: str, transport: str) -> bytes | defer.Deferred[bytes | None] | None:
        """Answer one query: bytes now, a Deferred for forwarded queries, None to drop."""
        metrics = self.metrics
        policy = self.policy()
        allowed, group, trusted = policy.client(client)
        if allowed and not trusted:
            if policy is not self._memo_policy:  # decisions taken under an older snapshot go
                self._memo.clear()
                self._memo_policy = policy
            memo = self._memo.get((group, data[2:]))
            if memo is not None:
                if memo[0] == _BLOCKED:
                    _, tail, verdict, key, log_tail, cells = memo
                    cells[transport == "tcp"][0] += 1  # queries, type, blocked and rcode in one add
                    if self.query_log.logs_blocked:
                        self.query_log.write(client, log_tail)
                    self.on_blocked_question(key, verdict)
                    return data[:2] + tail
                _, cached_key, entry, template, verdict = memo
                now = self.clock.seconds()
                if self.cache.hit_if_current(cached_key, entry, now):
                    metrics.count_query(group.name if group is not None else NO_GROUP, transport, template.qtype)
                    if verdict is not None:
                        metrics.count_blocked(verdict.group.name, verdict.list_name, verdict.action)
                    self.on_answer(entry.info, verdict, group)
                    query_id = (data[0] << 8) | data[1]
                    return self._deliver(entry, template, query_id, transport, client, group, verdict, now)
        record = None
        try:
            query = wire.parse_query(data)
            if query is None:
                query, record = slowpath.parse_query_slow(data)
        except wire.Drop:
            metrics.count_drop("response" if len(data) >= 12 else "short")
            return None
        except wire.HeaderOnlyError as exc:
            metrics.count_query(NO_GROUP, transport, 0)
            metrics.count_response(exc.rcode)
            return wire.header_only_response(exc.query_id, exc.flags, exc.rcode)
        except slowpath.BadVersion as exc:
            metrics.count_query(NO_GROUP, transport, exc.query.qtype)
            metrics.count_response(slowpath.RCODE_BADVERS)
            return slowpath.badvers_response(exc.query)

        if trusted and query.options:
            ecs = wire.ecs_option(query)
            if ecs is not None:
                network = wire.parse_ecs(ecs)
                if network is not None:
                    group = policy.group_for_network(network)
        metrics.count_query(group.name if group is not None else NO_GROUP, transport, query.qtype)
        if not allowed:
            metrics.count_response(wire.RCODE_REFUSED)
            self.query_log(client, group, query, None, wire.RCODE_REFUSED, denied=True)
            return wire.error_response(query, wire.RCODE_REFUSED, wire.EDE_PROHIBITED, "client not allowed")

        verdict = policy.check(group, query.key) if group is not None else None
        if verdict is not None:
            metrics.count_blocked(group.name, verdict.list_name, verdict.action)  # type: ignore[union-attr]
            if verdict.blocks:
                answer = self._blocked(client, query, record, verdict)
                self.on_blocked_question(query.key, verdict)
                if record is None and not trusted and policy is self._memo_policy:
                    rcode = answer[3] & 0x0F
                    log_tail = line_tail(verdict.group, query, verdict, rcode)
                    cells = tuple(
                        metrics.repeat_cell(group.name, t, query.qtype, verdict.list_name, verdict.action, rcode)
                        for t in ("udp", "tcp")
                    )
                    self._remember(group, data, (_BLOCKED, answer[2:], verdict, query.key, log_tail, cells))
                return answer

        asker = _Asker(query, record, client, group, verdict, transport, policy, trusted)
        key = cache_key(query)
        now = self.clock.seconds()
        entry = self.cache.get(key, now)
        if entry is not None:
            return self._from_upstream(asker, entry, now, key)
        waiting = self.in_flight.get(key)
        if waiting is not None:
            waiting.append(asker)  # the same question is already upstream: share its answer
            return asker.deferred
        try:
            message = self._upstream_message(query, record)
        except Exception:  # noqa: BLE001 - e.g. dnslib cannot re-pack a record it parsed
            _log.failure("cannot forward {name}", name=query.key)
            return self._servfail(asker, "query cannot be forwarded")
        self.in_flight[key] = [asker]
        self.upstreams.resolve(message, query.question).addCallbacks(
            self._answered, self._failed, callbackArgs=(key,), errbackArgs=(key,)
        )
        return asker.deferred

    def _upstream_message(self, query: Query, record: Any) -> bytes:
        if record is None:
            return wire.upstream_message(query, self.forward_ecs)
        return slowpath.upstream_message_slow(record, query, self.forward_ecs)

    @staticmethod
    def _blocked_answer(query: Query, record: Any, verdict: Verdict, ede_text: str) -> bytes:
        group = verdict.group
        if record is None:
            return wire.blocked_response(
                query, verdict.action, group.ttl, group.sinkhole_a, group.sinkhole_aaaa, ede_text
            )
        return slowpath.blocked_response_slow(
            record, query, verdict.action, group.ttl, group.sinkhole_a, group.sinkhole_aaaa, ede_text
        )

    def _blocked(self, client: str, query: Query, record: Any, verdict: Verdict) -> bytes:
        group = verdict.group
        answer = self._blocked_answer(query, record, verdict, verdict.ede_text)
        if len(answer) > wire.PLAIN_UDP_LIMIT:
            # A maximum-length name plus a long listed name in the EDE text can pass 512 bytes:
            # keep the answer within what every client accepts by naming only the list.
            answer = self._blocked_answer(query, record, verdict, f"blocked by blockd: list {verdict.list_name}")
        rcode = answer[3] & 0x0F
        self.metrics.count_response(rcode)
        self.query_log(client, group, query, verdict, rcode)
        return answer

    def _answered(self, answer: bytes, key: CacheKey) -> None:
        askers = self.in_flight.pop(key, [])
        now = self.clock.seconds()
        try:
            info = analyze(answer)
        except MalformedAnswer as exc:
            _log.warn("malformed upstream answer for {name}: {error}", name=key[0], error=exc)
            for asker in askers:
                asker.deferred.callback(self._servfail(asker, "malformed upstream answer"))
            return
        entry = self.cache.entry_for(answer, info, now)
        self.cache.put(key, entry)
        for asker in askers:
            try:
                result = self._from_upstream(asker, entry, now, key)
            except Exception:  # noqa: BLE001 - one asker's failure must not strand the others
                _log.failure("answering {name} failed", name=asker.query.key)
                result = self._servfail(asker, "internal error")
            asker.deferred.callback(result)

    def _failed(self, failure: Failure, key: CacheKey) -> None:
        if not failure.check(UpstreamError):
            _log.failure("forwarding {name} failed", failure, name=key[0])
        for asker in self.in_flight.pop(key, []):
            asker.deferred.callback(self._servfail(asker, "no upstream answered"))

    def _from_upstream(self, asker: _Asker, entry: CacheEntry, now: float, key: CacheKey) -> bytes:
        """An upstream answer (cached or fresh) for one client, after the answer policy."""
        query, group = asker.query, asker.group
        info = entry.info
        verdict = asker.verdict
        if group is not None and group.mask | (group.answer_prefixes is not None):
            answer_verdict = asker.policy.check_answer(group, info)
            if answer_verdict is not None:
                question = asker.verdict  # counted on the way in; count the answer's only if it differs
                if question is None or (question.list_name, question.action) != (
                    answer_verdict.list_name,
                    answer_verdict.action,
                ):
                    self.metrics.count_blocked(group.name, answer_verdict.list_name, answer_verdict.action)
                if answer_verdict.blocks:
                    self.on_answer(info, answer_verdict, group)
                    return self._blocked(asker.client, query, asker.record, answer_verdict)
                verdict = verdict or answer_verdict
        self.on_answer(info, verdict, group)
        if (
            asker.record is None
            and not asker.trusted
            and asker.policy is self._memo_policy
            and self.cache.holds(key, entry)
        ):
            self._remember(group, query.raw, (_CACHED, key, entry, query, verdict))
        return self._deliver(entry, query, query.id, asker.transport, asker.client, group, verdict, now)

    def _remember(self, group: Group | None, data: bytes, memo: tuple[Any, ...]) -> None:
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[(group, data[2:])] = memo

    def _deliver(
        self,
        entry: CacheEntry,
        query: Query,
        query_id: int,
        transport: str,
        client: str,
        group: Group | None,
        verdict: Verdict | None,
        now: float,
    ) -> bytes:
        """The answer as this client gets it: its ID and spelling, aged TTLs, TC if too big for UDP."""
        answer = render(entry, query, now, query_id)
        if transport == "udp" and len(answer) > query.response_limit:
            flags = struct.unpack_from("!H", answer, 2)[0]
            opt = wire.opt_record(query.dnssec_ok) if query.edns else b""
            answer = (
                struct.pack("!HHHHHH", query_id, flags | wire.FLAG_TC, 1, 0, 0, 1 if opt else 0) + query.question + opt
            )
        rcode = answer[3] & 0x0F
        self.metrics.count_response(rcode)
        self.query_log(client, group, query, verdict, rcode)
        return answer

    def _servfail(self, asker: _Asker, reason: str) -> bytes:
        self.metrics.count_response(wire.RCODE_SERVFAIL)
        self.query_log(asker.client, asker.group, asker.query, asker.verdict, wire.RCODE_SERVFAIL)
        return wire.error_response(asker.query, wire.RCODE_SERVFAIL, wire.EDE_NO_REACHABLE_AUTHORITY, reason)
