"""Twisted services for egress blocking (no pyroute2 here).

Netlink calls go through the adapter in the one worker thread (blockd.netlink_services);
decisions stay pure (blockd.egress) and run on the reactor thread.

  EgressService       reconciles blockd's rules and routes: at start-up, on request (after a
                      reload, after learning), on a timer, on netlink rule/route changes, and
                      when learned addresses expire.  Requests while one runs collapse into
                      one follow-up run: never two at once, none lost.
  FollowUpLookups     after a sinkholed lookup, resolves the name upstream in the background
                      (deduplicated, rate-limited) and learns its addresses.

Metrics: the service reports each reconcile to a callback as a ReconcileReport; the learned
counters live on LearnedAddresses and are read at scrape time.  Names (defined in
blockd.metrics by the daemon): blockd_egress_reconciles_total{result},
blockd_egress_last_reconcile_success_timestamp_seconds, blockd_egress_reconcile_duration_seconds,
blockd_egress_routes{source}, blockd_egress_rules, blockd_egress_changes_total{operation},
blockd_egress_learned_addresses, blockd_egress_learned_total, blockd_egress_never_skipped_total,
blockd_egress_learned_evicted_total.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from blockd.egress import (
    DesiredState,
    EgressSettings,
    LearnedAddresses,
    LearnResult,
    NetlinkChange,
    Plan,
    desired_state,
    diff,
)
from blockd.netlink_services import Coalescer, EgressAdapter, Runner
from blockd.prefix_table import IPAddress, IPNetwork

_log = Logger()


@dataclass(frozen=True)
class ReconcileReport:
    """One reconcile, as the metrics see it."""

    result: str  # "success" | "failure"
    timestamp: float
    duration: float
    route_counts: Mapping[str, int] = field(default_factory=dict)  # desired routes by source
    rules: int = 0
    changes: Mapping[str, int] = field(default_factory=dict)  # operations applied, by kind
    error: str | None = None


def _ignore_report(report: ReconcileReport) -> None:
    return None


class EgressService(service.Service):
    """Keeps blockd's rules and routes equal to the desired state."""

    name = "egress"  # type: ignore[assignment]  # Twisted: Service.name = None, unannotated

    def __init__(
        self,
        clock: Any,
        settings: EgressSettings,
        adapter: EgressAdapter,
        blocking_networks: Callable[[], Iterable[IPNetwork]],
        static_prefixes: Callable[[], Iterable[IPNetwork]],
        learned: LearnedAddresses,
        runner: Runner,
        record: Callable[[ReconcileReport], None] = _ignore_report,
        expiry_batch: float = 1.0,
    ):
        self.clock = clock
        self.settings = settings
        self.adapter = adapter
        self.blocking_networks = blocking_networks
        self.static_prefixes = static_prefixes
        self.learned = learned
        self.runner = runner
        self.record = record
        # Expiries within this many seconds of each other are removed in one reconcile.
        self.expiry_batch = expiry_batch
        self.last_desired: DesiredState | None = None
        self.ready: defer.Deferred[None] = defer.Deferred()
        self._reconciler = Coalescer(self._reconcile)
        self._reconciler.enabled = False
        self._loop: task.LoopingCall | None = None
        self._expiry_call: Any = None

    # -- lifecycle -------------------------------------------------------------------------

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        super().startService()
        self._reconciler.enabled = True
        # Fires after the first reconcile (success or failure), e.g. to open listeners only then.
        self.ready = self.request_reconcile()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.settings.reconcile_interval, now=False)
        self._schedule_expiry()

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802 (Twisted API)
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._expiry_call is not None and self._expiry_call.active():
            self._expiry_call.cancel()
        self._expiry_call = None
        self._reconciler.enabled = False
        done = self._reconciler.when_idle()
        if self.settings.on_exit == "remove":
            done.addCallback(lambda _: self.runner(self.adapter.remove_all, self.settings))
            done.addCallbacks(
                lambda removed: _log.info("egress: removed blockd's {count} rules and routes", count=removed),
                lambda failure: _log.failure("egress: could not remove blockd's rules and routes", failure),
            )
        else:
            done.addCallback(lambda _: _log.info("egress: leaving blockd's rules and routes in place (on_exit=keep)"))
        return done

    # -- entry points (reactor thread) -----------------------------------------------------

    def request_reconcile(self) -> defer.Deferred[None]:
        """Reconcile soon; fires once a reconcile that started after this call has finished."""
        return self._reconciler.request()

    def learn(self, addresses: Iterable[IPAddress | str], ttl: float) -> LearnResult:
        """Addresses an upstream answered for a listed name, with the answer's TTL."""
        if not self.settings.learn:
            return LearnResult()
        result = self.learned.learn(addresses, ttl, self.clock.seconds())
        if result.changed:
            self.request_reconcile()
        self._schedule_expiry()
        return result

    def netlink_event(self, change: NetlinkChange) -> None:
        # Someone (or blockd itself) changed rules or routes of blockd's table: check ours.
        if change in (NetlinkChange.RULE, NetlinkChange.ROUTE):
            self.request_reconcile()

    # -- reconcile -------------------------------------------------------------------------

    def _tick(self) -> None:
        # A LoopingCall whose function raises stops for good: never let anything out.
        try:
            self.request_reconcile()
        except Exception:  # noqa: BLE001 (keep the safety-net timer alive)
            _log.failure("egress: periodic reconcile could not be requested")

    def _reconcile(self) -> defer.Deferred[None]:
        started = self.clock.seconds()
        try:
            desired = desired_state(
                self.settings, self.blocking_networks(), self.static_prefixes(), self.learned.addresses()
            )
        except Exception:  # noqa: BLE001 (counted and logged; the next run retries)
            self._failed(Failure(), started, None)
            return defer.succeed(None)
        running = self.runner(self._reconcile_in_worker, desired)
        running.addCallbacks(
            self._succeeded, self._failed, callbackArgs=(started, desired), errbackArgs=(started, desired)
        )
        return running

    def _reconcile_in_worker(self, desired: DesiredState) -> Plan:
        # Worker thread: only the adapter and immutable values in here.
        plan = diff(desired, self.adapter.owned_state(self.settings))
        if not plan.empty:
            self.adapter.apply(plan)
        return plan

    def _succeeded(self, plan: Plan, started: float, desired: DesiredState) -> None:
        now = self.clock.seconds()
        self.last_desired = desired
        if not plan.empty:
            _log.info("egress: reconciled: {plan}", plan=str(plan))
        self.record(
            ReconcileReport(
                "success", now, now - started, desired.routes_by_source(), len(desired.rules), plan.counts()
            )
        )

    def _failed(self, failure: Failure, started: float, desired: DesiredState | None) -> None:
        now = self.clock.seconds()
        _log.failure("egress: reconcile failed (retried on the next change or timer)", failure)
        self.record(
            ReconcileReport(
                "failure",
                now,
                now - started,
                desired.routes_by_source() if desired else {},
                len(desired.rules) if desired else 0,
                error=failure.getErrorMessage(),
            )
        )

    # -- expiry ----------------------------------------------------------------------------

    def _schedule_expiry(self) -> None:
        if not self.running:
            return
        next_expiry = self.learned.next_expiry()
        if next_expiry is None:
            if self._expiry_call is not None and self._expiry_call.active():
                self._expiry_call.cancel()
            self._expiry_call = None
            return
        due = next_expiry + self.expiry_batch
        delay = max(0.0, due - self.clock.seconds())
        if self._expiry_call is not None and self._expiry_call.active():
            # One timer for all entries: move it only when something expires sooner.
            if self._expiry_call.getTime() > due:
                self._expiry_call.reset(delay)
            return
        self._expiry_call = self.clock.callLater(delay, self._expire)

    def _expire(self) -> None:
        self._expiry_call = None
        if self.learned.expire(self.clock.seconds()):
            self.request_reconcile()
        self._schedule_expiry()


# -- background lookups for sinkholed names ------------------------------------------------------

TYPE_A = 1
TYPE_AAAA = 28


class FollowUpLookups:
    """Resolves sinkholed names upstream in the background, to learn what the device was after.

    A government device whose lookup was sinkholed got no address, yet may hold one from
    elsewhere (another resolver, DoH, a hard-coded list).  Looking the name up ourselves (A and
    AAAA) puts those addresses into blockd's table too.  Deduplicated: one lookup per name in
    flight, and none again for `min_interval` seconds after it finished (learned routes live
    far longer); rate-limited by a token bucket (`rate` per second, `burst`); a bounded number
    in flight.  What is dropped is counted, never queued.

    resolve(name, qtype) -> Deferred of (addresses, ttl) is the upstream client (the daemon
    adapts Upstreams + blockd.upstream_answer.analyze to it); learn is EgressService.learn.
    """

    def __init__(
        self,
        clock: Any,
        resolve: Callable[[str, int], defer.Deferred[tuple[Iterable[IPAddress | str], float]]],
        learn: Callable[[Iterable[IPAddress | str], float], object],
        rate: float = 5.0,
        burst: int = 20,
        max_in_flight: int = 16,
        min_interval: float = 1800.0,
        max_remembered: int = 10000,
    ):
        self.clock = clock
        self.resolve = resolve
        self.learn = learn
        self.rate = rate
        self.burst = burst
        self.max_in_flight = max_in_flight
        self.min_interval = min_interval
        self.max_remembered = max_remembered
        self._tokens = float(burst)
        self._refilled = clock.seconds()
        self._in_flight: set[str] = set()
        self._done: dict[str, float] = {}  # name -> when its lookups finished (insertion-ordered)
        self.started_total = 0
        self.deduplicated_total = 0
        self.rate_limited_total = 0
        self.failed_total = 0

    def request(self, name: str) -> bool:
        """Look name up in the background unless a recent or running lookup covers it."""
        now = self.clock.seconds()
        finished = self._done.get(name)
        if name in self._in_flight or (finished is not None and now - finished < self.min_interval):
            self.deduplicated_total += 1
            return False
        self._tokens = min(float(self.burst), self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1 or len(self._in_flight) >= self.max_in_flight:
            self.rate_limited_total += 1
            return False
        self._tokens -= 1
        self._in_flight.add(name)
        self.started_total += 1
        lookups = [self._lookup(name, qtype) for qtype in (TYPE_A, TYPE_AAAA)]
        defer.DeferredList(lookups).addCallback(lambda _: self._finished(name))
        return True

    def _lookup(self, name: str, qtype: int) -> defer.Deferred[object]:
        lookup = defer.maybeDeferred(self.resolve, name, qtype)
        # addCallback and addErrback return the same Deferred, typed for its new result.
        learned = lookup.addCallback(lambda result: self.learn(*result))
        return learned.addErrback(self._failed, name)

    def _failed(self, failure: Failure, name: str) -> None:
        self.failed_total += 1
        _log.debug("egress: background lookup of {name} failed: {error}", name=name, error=failure.getErrorMessage())

    def _finished(self, name: str) -> None:
        self._in_flight.discard(name)
        self._done.pop(name, None)
        self._done[name] = self.clock.seconds()
        while len(self._done) > self.max_remembered:
            del self._done[next(iter(self._done))]
