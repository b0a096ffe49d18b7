"""The query path: bytes in, bytes out, as a short chain of named steps.

    read the question    blockd.question.read_question (fast path, dnslib fallback)
    classify the client  Policy.classifier (blockd.classify): allowed? group? ECS from a
                         trusted forwarder
    check the question   Policy.check: a listed name is answered here (blocked), or counted
                         and let through (monitor)
    cache / in flight    AnswerCache.get, or join an identical question already upstream
    forward              Upstreams.resolve
    scrub the answer     blockd.scrub: only the question's CNAME chain and its proof stay
    check the answer     Policy.check_answer: CNAME cloaking, blocked answer addresses
    deliver              render the cached bytes for this client, TC if too big for UDP

Why this order: classification comes first because every later step depends on the group;
the question is checked before the cache so that a name listed by a reload is blocked on its
very next query; the cache holds upstream answers *before* policy, and the answer check runs on
every answer, cached or fresh, for the asking client's group, so one group's view is never
served to another.  The policy snapshot is read once per query, so a reload swapping it never
changes a query half-way.  Repeats of a query already answered under the same snapshot skip
the steps (blockd.repeats): that is the hot path, and it stays a dictionary lookup.

Each step counts what it decides (blockd.metrics) and the answer is logged exactly once, by
whichever step gives it (the query log, or any QueryObserver).  The server writes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from blockd import wire
from blockd.cache import AnswerCache, CacheEntry, CacheKey, cache_key, render
from blockd.classify import Client
from blockd.garden import follow_target, splice
from blockd.limits import ClientLimits, Kind, LimitSettings, kind_of
from blockd.limits import Verdict as LimitVerdict
from blockd.log_sampling import Sampler
from blockd.metrics import Metrics
from blockd.notify import NotifyReceiver
from blockd.policy import DNSSEC_INFRASTRUCTURE_TYPES, NO_GROUP, Group, Policy, Verdict
from blockd.query_errors import ErrorReporter
from blockd.querylog import line_tail
from blockd.question import NotifyRequest, Unreadable, read_question
from blockd.repeats import BlockedRepeat, CachedRepeat, Repeat, RepeatMemo
from blockd.scrub import scrub
from blockd.upstream import UpstreamError
from blockd.upstream_answer import AnswerInfo, MalformedAnswer, analyze
from blockd.wire import Query

_log = Logger()


class Clock(Protocol):
    """Seconds on a clock that never steps back (the cache ages entries on it)."""

    def seconds(self) -> float: ...


class UpstreamClient(Protocol):
    def resolve(self, message: bytes, question: bytes) -> defer.Deferred[bytes]: ...


class QueryObserver(Protocol):
    """Sees every answered query once (the query log)."""

    @property
    def logs_blocked(self) -> bool: ...

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
        """duration_ms: from the query's arrival to its answer (whole ms; 0 when answered at once)."""

    def repeated(self, client: str, tail: str) -> None:
        """A repeated blocked query, with its line tail (blockd.querylog.line_tail) kept by the memo."""

    def unreadable(
        self, client: str, group: Group | None, key: str | None, qtype: int, rcode: int, transport: str = "udp"
    ) -> None:
        """A packet answered from its header (FORMERR, NOTIMP) or BADVERS: key and qtype when read."""

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
        """A refused ("denied") or rate-limited query, logged once per client per interval."""


class WireTap(Protocol):
    """Sees every answered query with its wire messages (dnstap): queries, answers, verdicts."""

    @property
    def active(self) -> bool: ...

    def now_ns(self) -> int:
        """The wall clock, in ns (a forwarded query's arrival time)."""

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
        """received_ns is 0 for a query answered as it arrived (the tap reads the clock once)."""

    def repeated(self, client: str, port: int, transport: str, query_id: bytes, repeat: BlockedRepeat) -> None:
        """A repeated blocked query: query_id + repeat.query_tail, answered query_id + repeat.answer_tail.

        (Only the two ID bytes: the datagram itself is not kept alive in a queue.)"""


class NoTap:
    """The WireTap when dnstap is off: the resolver reads `active` once and never calls it."""

    active = False

    def now_ns(self) -> int:
        return 0

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
        return None

    def repeated(self, client: str, port: int, transport: str, query_id: bytes, repeat: BlockedRepeat) -> None:
        return None


class AnswerWatcher(Protocol):
    """Egress learning: every upstream answer with its verdict, and every blocked question."""

    def answer_seen(self, info: AnswerInfo, verdict: Verdict | None, group: Group | None) -> None: ...

    def question_blocked(self, name: str, verdict: Verdict) -> None: ...


class IgnoreAnswers:
    """The AnswerWatcher when nothing learns from answers (egress off, or learn = false)."""

    def answer_seen(self, info: AnswerInfo, verdict: Verdict | None, group: Group | None) -> None:
        return None

    def question_blocked(self, name: str, verdict: Verdict) -> None:
        return None


class Asker:
    """One client's query past the question check: what every later step needs to know."""

    __slots__ = (
        "client",
        "deferred",
        "group",
        "policy",
        "port",
        "query",
        "received_ns",
        "started",
        "transport",
        "trusted",
        "upstream_slot",
        "verdict",
    )

    def __init__(
        self,
        query: Query,
        client: str,
        group: Group | None,
        verdict: Verdict | None,
        transport: str,
        policy: Policy,
        trusted: bool,
        port: int = 0,
        received_ns: int = 0,
    ):
        self.query = query
        self.client = client
        self.port = port
        self.received_ns = received_ns  # wall-clock arrival, when a WireTap is on
        self.started = 0.0  # arrival on the resolver's clock (the query log's duration_ms)
        self.group = group
        self.verdict = verdict  # a monitor verdict of the question, counted already
        self.transport = transport
        self.policy = policy  # the snapshot the query started with; it finishes on it
        self.trusted = trusted
        self.upstream_slot: str | None = None  # the client's upstream slot, if this asker took one
        self.deferred: defer.Deferred[bytes | None] = defer.Deferred()


class InFlight:
    """Questions upstream now, each with the askers waiting for its answer (they share it)."""

    def __init__(self) -> None:
        self._waiting: dict[CacheKey, list[Asker]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def join(self, key: CacheKey, asker: Asker) -> bool:
        """Wait for a question already upstream; False when there is none."""
        waiting = self._waiting.get(key)
        if waiting is None:
            return False
        waiting.append(asker)
        return True

    def start(self, key: CacheKey, asker: Asker) -> None:
        self._waiting[key] = [asker]

    def finish(self, key: CacheKey) -> list[Asker]:
        return self._waiting.pop(key, [])

    def holds_policy(self, policy: Policy) -> bool:
        """Whether a query that started on this snapshot is still waiting."""
        return any(asker.policy is policy for askers in self._waiting.values() for asker in askers)


def _label(group: Group | None) -> str:
    return group.name if group is not None else NO_GROUP


NO_ANSWER = -1  # the rcode logged for a query given no answer (RPZ drop)


def _ms(seconds: float) -> int:
    """A duration for the query log: whole milliseconds, never negative."""
    return int(seconds * 1000) if seconds > 0 else 0


def _blocked_bytes(query: Query, verdict: Verdict, ede_text: str) -> bytes:
    """The answer for a blocking verdict: blockd's actions, and RPZ's tcp-only and local data."""
    rules = verdict.group
    if verdict.action == "tcp-only":  # over UDP only (Verdict.blocks_on): "ask again over TCP"
        return wire.error_response(query, wire.RCODE_NOERROR, flags=wire.FLAG_TC)
    if verdict.action == "local-data" and verdict.rule is not None:
        return query.local_data_response(verdict.rule.records, rules.ttl, ede_text)
    return query.blocked_response(verdict.action, rules.ttl, rules.sinkhole_a, rules.sinkhole_aaaa, ede_text)


class Resolver:
    """Answers one query at a time through the steps above; built by the composition root."""

    def __init__(
        self,
        policy: Callable[[], Policy],
        upstreams: UpstreamClient,
        metrics: Metrics,
        observer: QueryObserver,
        cache: AnswerCache,
        clock: Clock,
        watcher: AnswerWatcher,
        repeats: RepeatMemo,
        notifications: NotifyReceiver,
        forward_ecs: bool = False,
        tap: WireTap | None = None,
        identity: wire.ServerIdentity | None = None,
        limits: ClientLimits | None = None,
        max_udp_size: int = wire.SERVER_UDP_PAYLOAD,
        errors: ErrorReporter | None = None,
    ):
        self.policy = policy
        self.upstreams = upstreams
        self.metrics = metrics
        self.observer = observer
        self.cache = cache
        self.clock = clock
        self.watcher = watcher
        self.repeats = repeats
        self.notifications = notifications  # NOTIFY for transferred zones (blockd.notify)
        self.forward_ecs = forward_ecs
        self.identity = identity if identity is not None else wire.ServerIdentity()
        self._nsid = self.identity.nsid  # b"": no NSID, and no per-answer check
        self.tap: WireTap = tap if tap is not None else NoTap()
        self._tapping = self.tap.active  # read once: every answer checks it
        self.in_flight = InFlight()
        self._log_blocked = observer.logs_blocked  # read once: the repeat path checks it per query
        self._following = False  # resolving a walled garden's target (blockd.garden)
        self.limits = limits if limits is not None else ClientLimits(LimitSettings(enabled=False))
        self._limiting = self.limits.enabled  # read once: every UDP query checks it
        self.max_udp_size = max_udp_size  # no UDP answer is larger (amplification)
        self.errors = errors if errors is not None else ErrorReporter()
        self._refused_log = Sampler()
        self._limited_log = Sampler()

    def handle(
        self, data: bytes, client: str, transport: str, port: int = 0
    ) -> bytes | defer.Deferred[bytes | None] | None:
        """Answer one query: bytes now, a Deferred for forwarded queries, None to drop.

        port is the client's (dnstap reports it; 0 when unknown)."""
        policy = self.policy()
        who = policy.classifier.classify(client)
        if self._limiting and transport == "udp":
            # Kind: 0 client, 1 trusted forwarder, 2 outside server.allow (blockd.limits.Kind).
            kind = (1 if who.trusted else 0) if who.allowed else 2
            decision = self.limits.check_udp(client, kind, self.clock.seconds())
            if decision:
                return self._over_rate(decision, data, client)
        if who.allowed and not who.trusted:
            repeat = self.repeats.lookup(policy, who.group, data)
            if repeat is not None:
                answer = self._answer_repeat(repeat, data, client, who.group, transport, port)
                if answer is not None:
                    return answer
        query = read_question(data)
        if isinstance(query, Unreadable):
            return self._unreadable(query, data, client, who.group if who.allowed else None, transport, port)
        if isinstance(query, NotifyRequest):
            return self.notifications.receive(query.data, client)
        group = policy.classifier.group_of(who, query)
        self.metrics.count_query(_label(group), transport, query.qtype)
        if not who.allowed:
            return self._refused(client, group, query, transport, port)
        if query.qclass == wire.CLASS_CH:
            return self._chaos(client, group, query, transport, port)
        verdict = self._check_question(policy, group, query)
        if verdict is not None and verdict.blocks_on(transport):
            return self._answer_blocked_question(policy, who, client, query, verdict, transport, port)
        if query.qtype == wire.TYPE_ANY and transport == "udp":
            return self._minimal_any(client, group, query, verdict, port)
        # The arrival time, for dnstap; -1: a walled garden's own lookup, not a client's query.
        received = (self.tap.now_ns() if not self._following else -1) if self._tapping else 0
        asker = Asker(query, client, group, verdict, transport, policy, who.trusted, port, received)
        asker.started = self.clock.seconds()
        return self._answer_from_upstream(asker)

    # -- outside the steps: limits and failures -------------------------------------------------

    def client_kind(self, client: str) -> Kind:
        """Which limits this client gets (blockd.limits)."""
        who = self.policy().classifier.classify(client)
        return kind_of(who.allowed, who.trusted)

    def _over_rate(self, decision: int, data: bytes, client: str) -> bytes | None:
        """A UDP query over its client's rate: dropped, or (slip) answered TC=1 to come back over TCP;
        logged sampled, without reading it (what it asked is not worth the time)."""
        suppressed = self._limited_log.sample(self.limits.keys.key(client), self.clock.seconds())
        if suppressed is not None:
            self.observer.sampled(client, None, None, "rate-limited", NO_ANSWER, suppressed)
        if decision == LimitVerdict.DROP:
            self.metrics.count_limited("rate_drop")
            return None
        self.metrics.count_limited("rate_slip")
        return wire.raw_response(data, wire.RCODE_NOERROR, wire.FLAG_TC)

    def failed(self, data: bytes, client: str, exc: BaseException) -> bytes | None:
        """The answer to a query whose handling raised: SERVFAIL (FORMERR if it has no readable
        question), counted, and logged without a traceback per packet (blockd.query_errors)."""
        self.metrics.query_errors.inc()
        report = self.errors.report(exc, client, self.clock.seconds())
        if report is not None:
            if report.with_traceback:
                _log.failure(report.message, Failure(exc))
            else:
                _log.warn("{message}", message=report.message)
        try:
            return wire.raw_response(data, wire.RCODE_SERVFAIL)
        except Exception:  # noqa: BLE001 - the error answer itself must never raise
            return None

    # -- the steps ------------------------------------------------------------------------------

    def _answer_repeat(
        self, repeat: Repeat, data: bytes, client: str, group: Group | None, transport: str, port: int
    ) -> bytes | None:
        """The remembered answer for a repeated query, or None when it no longer holds."""
        if isinstance(repeat, BlockedRepeat):
            repeat.counters[transport == "tcp"][0] += 1  # queries, type, blocked and rcode in one add
            if self._log_blocked:
                self.observer.repeated(client, repeat.log_tails[transport == "tcp"])
            self.watcher.question_blocked(repeat.name, repeat.verdict)
            id_bytes = data[:2]
            if self._tapping:
                self.tap.repeated(client, port, transport, id_bytes, repeat)
            return id_bytes + repeat.answer_tail
        now = self.clock.seconds()
        if not self.cache.hit_if_current(repeat.cache_key, repeat.entry, now):
            return None
        verdict = repeat.verdict
        self.metrics.count_query(_label(group), transport, repeat.query.qtype)
        if verdict is not None:
            self.metrics.count_blocked(verdict.group.name, verdict.list_name, verdict.action)
        self.watcher.answer_seen(repeat.entry.info, verdict, group)
        query_id = (data[0] << 8) | data[1]
        answer = self._deliver(repeat.entry, repeat.query, query_id, transport, client, group, verdict, now)
        if self._tapping:
            self.tap.answered(client, port, transport, data, answer, verdict, False, 0)
        return answer

    def _unreadable(
        self, unreadable: Unreadable, data: bytes, client: str, group: Group | None, transport: str, port: int
    ) -> bytes | None:
        if unreadable.answer is None:
            self.metrics.count_drop(unreadable.drop_reason)
            return None
        self.metrics.count_query(NO_GROUP, transport, unreadable.qtype)
        self.metrics.count_response(unreadable.rcode)
        self.observer.unreadable(client, group, unreadable.key, unreadable.qtype, unreadable.rcode, transport)
        if self._tapping:
            self.tap.answered(client, port, transport, data, unreadable.answer, None, False, 0)
        return unreadable.answer

    def _with_nsid(self, query: Query, answer: bytes) -> bytes:
        """The answer with blockd's NSID when configured and the client asked for it (RFC 5001)."""
        if self._nsid and wire.asks_nsid(query):
            return wire.with_nsid(answer, self._nsid)
        return answer

    def _chaos(self, client: str, group: Group | None, query: Query, transport: str, port: int) -> bytes:
        """CH class (version.bind, hostname.bind, id.server...): answered here, never forwarded."""
        text = self.identity.chaos_text(query.key) if query.qtype in (wire.TYPE_TXT, wire.TYPE_ANY) else ""
        answer = wire.chaos_response(query, text) if text else wire.error_response(query, wire.RCODE_REFUSED)
        answer = self._with_nsid(query, answer)
        rcode = answer[3] & 0x0F
        self.metrics.count_response(rcode)
        self.observer.answered(client, group, query, None, rcode, transport=transport)
        if self._tapping:
            self.tap.answered(client, port, transport, query.raw, answer, None, False, 0)
        return answer

    def _minimal_any(
        self, client: str, group: Group | None, query: Query, verdict: Verdict | None, port: int
    ) -> bytes:
        """ANY over UDP: RFC 8482's one HINFO, never the whole name (amplification); TCP is forwarded."""
        answer = self._with_nsid(query, wire.minimal_any_response(query))
        self.metrics.count_response(wire.RCODE_NOERROR)
        self.observer.answered(client, group, query, verdict, wire.RCODE_NOERROR, transport="udp")
        if self._tapping:
            self.tap.answered(client, port, "udp", query.raw, answer, verdict, False, 0)
        return answer

    def _refused(self, client: str, group: Group | None, query: Query, transport: str, port: int) -> bytes:
        self.metrics.count_response(wire.RCODE_REFUSED)
        suppressed = self._refused_log.sample(self.limits.keys.key(client), self.clock.seconds())
        if suppressed is not None:  # one line per client per interval: a refused flood cannot fill the disk
            self.observer.sampled(client, group, query, "denied", wire.RCODE_REFUSED, suppressed, transport)
        answer = wire.error_response(query, wire.RCODE_REFUSED, wire.EDE_PROHIBITED, "client not allowed")
        answer = self._with_nsid(query, answer)
        if self._tapping:
            self.tap.answered(client, port, transport, query.raw, answer, None, True, 0)
        return answer

    def _check_question(self, policy: Policy, group: Group | None, query: Query) -> Verdict | None:
        if group is None or query.qtype in DNSSEC_INFRASTRUCTURE_TYPES:
            return None
        verdict = policy.check(group, query.key)
        if verdict is not None:
            self.metrics.count_blocked(group.name, verdict.list_name, verdict.action)
        return verdict

    def _answer_blocked_question(
        self,
        policy: Policy,
        who: Client[Group],
        client: str,
        query: Query,
        verdict: Verdict,
        transport: str,
        port: int,
    ) -> bytes | defer.Deferred[bytes | None] | None:
        answer = self._blocked(client, query, verdict, transport)
        self.watcher.question_blocked(query.key, verdict)
        target = follow_target(verdict, query) if answer is not None and not self._following else None
        if answer is not None and target is not None:
            garden = self._walled_garden(answer, target, query, client, transport)
            if transport == "udp":
                garden = self._fit_udp_later(query, garden)
            if self._tapping:
                self._tap_garden(garden, client, port, transport, query, verdict)
            return garden
        whole = answer
        if answer is not None and transport == "udp" and verdict.action == "local-data":
            answer = self._fit_udp(query, answer, query.id)  # RPZ local data can be long
        if self._tapping and not self._following:
            self.tap.answered(client, port, transport, query.raw, answer, verdict, False, 0)
        # Not remembered: no answer (drop), or one that differs by transport (tcp-only, truncated).
        if (
            answer is not None
            and answer is whole
            and verdict.action != "tcp-only"
            and self.repeats.may_remember(query, who.trusted)
        ):
            group = verdict.group
            rcode = answer[3] & 0x0F
            counters = (
                self.metrics.repeat_cell(group.name, "udp", query.qtype, verdict.list_name, verdict.action, rcode),
                self.metrics.repeat_cell(group.name, "tcp", query.qtype, verdict.list_name, verdict.action, rcode),
            )
            tails = tuple(
                line_tail(group, query.key, query.qtype, verdict, rcode, transport=t, duration_ms=0)
                for t in ("udp", "tcp")
            )
            repeat = BlockedRepeat(answer[2:], verdict, query.key, (tails[0], tails[1]), counters, query.raw[2:])
            self.repeats.remember(policy, who.group, query.raw, repeat)
        return answer

    def _walled_garden(
        self, answer: bytes, target: str, query: Query, client: str, transport: str
    ) -> bytes | defer.Deferred[bytes | None]:
        """The CNAME answer and its target, resolved as this client's query for it would be."""
        try:
            message, _question = wire.lookup_message(target, query.qtype, query.id)
        except ValueError:
            return answer
        self._following = True  # one step: a garden whose target is a garden again is not followed
        try:
            followed = self.handle(message, client, transport, port=0)
        finally:
            self._following = False
        if followed is None:
            return answer
        if isinstance(followed, bytes):
            return splice(answer, followed)
        return followed.addCallback(lambda target_answer: splice(answer, target_answer) if target_answer else answer)

    def _tap_garden(
        self,
        garden: bytes | defer.Deferred[bytes | None],
        client: str,
        port: int,
        transport: str,
        query: Query,
        verdict: Verdict,
    ) -> None:
        """The walled-garden answer as the client gets it (the CNAME and its target's answer)."""
        if isinstance(garden, bytes):
            self.tap.answered(client, port, transport, query.raw, garden, verdict, False, 0)
            return
        received = self.tap.now_ns()

        def tap(answer: bytes | None) -> bytes | None:
            self.tap.answered(client, port, transport, query.raw, answer, verdict, False, received)
            return answer

        garden.addCallback(tap)

    def _answer_from_upstream(self, asker: Asker) -> bytes | defer.Deferred[bytes | None] | None:
        """From the cache, or by joining the same question in flight, or by forwarding it."""
        key = cache_key(asker.query)
        now = self.clock.seconds()
        entry = self.cache.get(key, now)
        if entry is not None:
            return self._answer_with(asker, entry, now, key)
        if self.in_flight.join(key, asker):
            return asker.deferred
        try:
            message = asker.query.upstream_message(self.forward_ecs)
        except Exception:  # noqa: BLE001 - e.g. dnslib cannot re-pack a record it parsed
            _log.failure("cannot forward {name}", name=asker.query.key)
            return self._servfail(asker, "query cannot be forwarded")
        slot = self.limits.start_upstream(asker.client, Kind.FORWARDER if asker.trusted else Kind.CLIENT)
        if slot is None:  # this client's share of upstream queries (or everyone's) is taken
            self.metrics.count_limited(self.limits.upstream_refusal)
            return self._servfail(asker, "too many queries in flight", wire.EDE_OTHER)
        asker.upstream_slot = slot
        self.in_flight.start(key, asker)
        self.upstreams.resolve(message, asker.query.question).addCallbacks(
            self._answered, self._failed, callbackArgs=(key,), errbackArgs=(key,)
        )
        return asker.deferred

    def _finish(self, key: CacheKey) -> list[Asker]:
        """The askers of a question that came back (or failed), its upstream slot given back."""
        askers = self.in_flight.finish(key)
        if askers and askers[0].upstream_slot is not None:  # the first asker started it
            self.limits.finish_upstream(askers[0].upstream_slot)
            askers[0].upstream_slot = None
        return askers

    def _answered(self, answer: bytes, key: CacheKey) -> None:
        askers = self._finish(key)
        now = self.clock.seconds()
        try:
            scrubbed = scrub(answer)  # before anything reads it: only the question's chain stays
            info = analyze(scrubbed.answer)
        except MalformedAnswer as exc:
            _log.warn("malformed upstream answer for {name}: {error}", name=key[0], error=exc)
            for asker in askers:
                asker.deferred.callback(self._servfail(asker, "malformed upstream answer"))
            return
        self.metrics.scrubbed.count(scrubbed.removed)
        answer = scrubbed.answer
        entry = self.cache.entry_for(answer, info, now)
        self.cache.put(key, entry)
        for asker in askers:
            try:
                result = self._answer_with(asker, entry, now, key)
            except Exception:  # noqa: BLE001 - one asker's failure must not strand the others
                _log.failure("answering {name} failed", name=asker.query.key)
                result = self._servfail(asker, "internal error")
            asker.deferred.callback(result)

    def _failed(self, failure: Failure, key: CacheKey) -> None:
        if not failure.check(UpstreamError):
            _log.failure("forwarding {name} failed", failure, name=key[0])
        askers = self._finish(key)
        now = self.clock.seconds()
        stale = self.cache.stale(key, now) if askers else None
        for asker in askers:
            if stale is not None:  # serve-stale (RFC 8767): the last answer, policy checked as ever
                asker.deferred.callback(self._answer_with(asker, stale, now, key))
            else:
                asker.deferred.callback(self._servfail(asker, "no upstream answered"))

    def _answer_with(self, asker: Asker, entry: CacheEntry, now: float, key: CacheKey) -> bytes | None:
        """An upstream answer (cached or fresh) for one asker: check it, remember it, deliver it."""
        info = entry.info
        verdict = self._check_answer(asker, info)
        self.watcher.answer_seen(info, verdict, asker.group)
        if verdict is not None and verdict.blocks_on(asker.transport):
            answer = self._blocked(asker.client, asker.query, verdict, asker.transport, _ms(now - asker.started))
        else:
            query = asker.query
            if self.repeats.may_remember(query, asker.trusted) and self.cache.holds(key, entry):
                self.repeats.remember(asker.policy, asker.group, query.raw, CachedRepeat(key, entry, query, verdict))
            took = _ms(now - asker.started)
            group, transport = asker.group, asker.transport
            answer = self._deliver(entry, query, query.id, transport, asker.client, group, verdict, now, took)
        if self._tapping:
            self._tap_asker(asker, answer, verdict)
        return answer

    def _tap_asker(self, asker: Asker, answer: bytes | None, verdict: Verdict | None) -> None:
        if asker.received_ns >= 0:  # not a walled garden's own lookup
            raw = asker.query.raw
            self.tap.answered(asker.client, asker.port, asker.transport, raw, answer, verdict, False, asker.received_ns)

    def _check_answer(self, asker: Asker, info: AnswerInfo) -> Verdict | None:
        """The verdict the answer gets: a blocking one from its CNAME chain or addresses, else the
        question's monitor verdict, else a monitor verdict of the answer."""
        group, question = asker.group, asker.verdict
        if group is None or not (group.mask or group.answer_prefixes is not None):
            return question
        found = asker.policy.check_answer(group, info)
        if found is None:
            return question
        if question is None or (question.list_name, question.action) != (found.list_name, found.action):
            self.metrics.count_blocked(group.name, found.list_name, found.action)  # not counted on the way in
        return found if found.blocks_on(asker.transport) or question is None else question

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
        duration_ms: int = 0,
    ) -> bytes:
        """The answer as this client gets it: its ID and spelling, aged TTLs, TC if too big for UDP."""
        answer = self._with_nsid(query, render(entry, query, now, query_id))
        if transport == "udp":
            answer = self._fit_udp(query, answer, query_id)
        rcode = answer[3] & 0x0F
        self.metrics.count_response(rcode)
        self.observer.answered(client, group, query, verdict, rcode, transport=transport, duration_ms=duration_ms)
        return answer

    def _fit_udp(self, query: Query, answer: bytes, query_id: int) -> bytes:
        """The answer, or TC=1 when it is larger than the client accepts or than blockd sends
        (limits.max_udp_size: what blockd advertises, so a spoofed query cannot amplify)."""
        limit = query.response_limit
        if limit > self.max_udp_size:
            limit = self.max_udp_size
        if len(answer) <= limit:
            return answer
        return self._with_nsid(query, wire.truncated_response(answer, query, query_id))

    def _fit_udp_later(
        self, query: Query, answer: bytes | defer.Deferred[bytes | None]
    ) -> bytes | defer.Deferred[bytes | None]:
        if isinstance(answer, bytes):
            return self._fit_udp(query, answer, query.id)
        return answer.addCallback(lambda whole: self._fit_udp(query, whole, query.id) if whole else whole)

    def _blocked(
        self, client: str, query: Query, verdict: Verdict, transport: str, duration_ms: int = 0
    ) -> bytes | None:
        """blockd's own answer for a blocked name (None: drop it), counted and logged."""
        if verdict.action == "drop":
            self.metrics.count_drop("policy")
            self.observer.answered(client, verdict.group, query, verdict, NO_ANSWER, False, transport, duration_ms)
            return None
        answer = _blocked_bytes(query, verdict, verdict.ede_text)
        if len(answer) > wire.PLAIN_UDP_LIMIT and verdict.action != "local-data":
            # A maximum-length name plus a long listed name in the EDE text can pass 512 bytes:
            # keep the answer within what every client accepts by naming only the list.
            answer = _blocked_bytes(query, verdict, f"blocked by blockd: list {verdict.list_name}")
        answer = self._with_nsid(query, answer)
        rcode = answer[3] & 0x0F
        self.metrics.count_response(rcode)
        self.observer.answered(client, verdict.group, query, verdict, rcode, False, transport, duration_ms)
        return answer

    def _servfail(self, asker: Asker, reason: str, ede_code: int = wire.EDE_NO_REACHABLE_AUTHORITY) -> bytes:
        self.metrics.count_response(wire.RCODE_SERVFAIL)
        duration = _ms(self.clock.seconds() - asker.started)
        self.observer.answered(
            asker.client, asker.group, asker.query, asker.verdict, wire.RCODE_SERVFAIL, False, asker.transport, duration
        )
        answer = wire.error_response(asker.query, wire.RCODE_SERVFAIL, ede_code, reason)
        answer = self._with_nsid(asker.query, answer)
        if self._tapping:
            self._tap_asker(asker, answer, asker.verdict)
        return answer
