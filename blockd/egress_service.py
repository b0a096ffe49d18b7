"""Twisted glue for egress blocking and interface-defined groups (no pyroute2 here).

Everything that touches netlink goes through an adapter object (blockd.netlink.NetlinkAdapter
in the daemon, a fake in tests) called in ONE worker thread through a runner, because the
adapter is not thread-safe and netlink calls block.  Decisions stay pure (blockd.egress) and
run on the reactor thread; only the kernel dump and the apply run in the worker.

  EgressService       reconciles blockd's rules and routes: at start-up, on request (after a
                      reload, after learning), on a timer, on netlink rule/route changes, and
                      when learned addresses expire.  Requests while one runs collapse into
                      one follow-up run: never two at once, none lost.
  InterfaceNetworks   re-reads the connected subnets of the interfaces (by name or VLAN id)
                      that define groups, on netlink address/link changes and on a timer, and
                      reports the mapping when it changed.
  NetlinkServices     owns the worker thread and the notification watcher; parent of both.
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

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from blockd.classify import IPAddress, IPNetwork
from blockd.egress import (
    DesiredState,
    EgressSettings,
    KernelState,
    LearnedAddresses,
    LearnResult,
    NetlinkChange,
    Plan,
    desired_state,
    diff,
)

_log = Logger()


class EgressAdapter(Protocol):
    """What the services need from blockd.netlink.NetlinkAdapter (and what test fakes provide)."""

    def owned_state(self, settings: EgressSettings) -> KernelState: ...

    def apply(self, plan: Plan) -> int: ...

    def remove_all(self, settings: EgressSettings) -> int: ...

    def interface_networks(
        self, names: Collection[str], vlan_ids: Collection[int]
    ) -> dict[str, tuple[IPNetwork, ...]]: ...

    def close(self) -> None: ...


class Runner(Protocol):
    """Runs a blocking call in the netlink worker thread; the result arrives on the reactor thread."""

    def __call__(self, function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class ThreadRunner:
    """One worker thread for every netlink call of the daemon."""

    def __init__(self, reactor: Any, name: str = "blockd-netlink"):
        self.reactor = reactor
        self.pool = ThreadPool(1, 1, name)

    def __call__(self, function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return deferToThreadPool(self.reactor, self.pool, function, *args)

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()


class SynchronousRunner:
    """Runs calls in the caller's thread (tests; never in the daemon: netlink calls block)."""

    def __call__(self, function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(function, *args)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class Coalescer:
    """Runs job() one at a time; requests made during a run share one follow-up run.

    request() returns a Deferred that fires (with None) once a run that started after the
    request has finished, so a caller knows its change has been taken into account.
    """

    def __init__(self, job: Callable[[], defer.Deferred[Any] | None]):
        self._job = job
        self.enabled = True
        self.busy = False
        self._next: list[defer.Deferred[None]] = []
        self._idle: list[defer.Deferred[None]] = []

    def request(self) -> defer.Deferred[None]:
        waiter: defer.Deferred[None] = defer.Deferred()
        if not self.enabled:
            waiter.callback(None)
        elif self.busy:
            self._next.append(waiter)
        else:
            self._start([waiter])
        return waiter

    def when_idle(self) -> defer.Deferred[None]:
        waiter: defer.Deferred[None] = defer.Deferred()
        if self.busy:
            self._idle.append(waiter)
        else:
            waiter.callback(None)
        return waiter

    def _start(self, waiters: list[defer.Deferred[None]]) -> None:
        self.busy = True
        run = defer.maybeDeferred(self._job)
        run.addErrback(lambda failure: _log.failure("unexpected error in a coalesced job", failure))
        run.addBoth(self._finished, waiters)

    def _finished(self, _result: object, waiters: list[defer.Deferred[None]]) -> None:
        self.busy = False
        following, self._next = self._next, []
        if following and self.enabled:
            self._start(following)
        else:
            waiters.extend(following)
        for waiter in waiters:
            waiter.callback(None)
        if not self.busy:
            idle, self._idle = self._idle, []
            for waiter in idle:
                waiter.callback(None)


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

    name = "egress"

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
    adapts Upstreams + blockd.answer.analyze to it); learn is EgressService.learn.
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

    def _lookup(self, name: str, qtype: int) -> defer.Deferred[None]:
        lookup = defer.maybeDeferred(self.resolve, name, qtype)
        lookup.addCallback(lambda result: self.learn(*result))
        lookup.addErrback(self._failed, name)
        return lookup

    def _failed(self, failure: Failure, name: str) -> None:
        self.failed_total += 1
        _log.debug("egress: background lookup of {name} failed: {error}", name=name, error=failure.getErrorMessage())

    def _finished(self, name: str) -> None:
        self._in_flight.discard(name)
        self._done.pop(name, None)
        self._done[name] = self.clock.seconds()
        while len(self._done) > self.max_remembered:
            del self._done[next(iter(self._done))]


# -- interface-defined groups ------------------------------------------------------------------


@dataclass(frozen=True)
class InterfaceSelector:
    """Which interfaces define a group: by name, and every interface on one of the VLAN ids."""

    names: tuple[str, ...] = ()
    vlans: tuple[int, ...] = ()


InterfaceMap = Mapping[str, Mapping[str, tuple[IPNetwork, ...]]]  # key -> interface -> subnets


def networks_of(interfaces: Mapping[str, tuple[IPNetwork, ...]]) -> tuple[IPNetwork, ...]:
    """Every subnet of a key's interfaces, each once, in a stable order."""
    unique = {n for networks in interfaces.values() for n in networks}
    return tuple(sorted(unique, key=lambda n: (n.version, int(n.network_address), n.prefixlen)))


class InterfaceNetworks(service.Service):
    """Reports the subnets of selected interfaces whenever they change.

    selectors maps a key (a group name) to the interfaces defining it; on_change receives
    {key: {interface: subnets}} for every key, and is called at start-up and after every
    change.  A named interface that does not exist is a warning, once; it counts as soon as it
    appears.  A failed read keeps the previous mapping.
    """

    name = "interface-networks"

    def __init__(
        self,
        clock: Any,
        adapter: EgressAdapter,
        runner: Runner,
        selectors: Mapping[str, InterfaceSelector],
        on_change: Callable[[InterfaceMap], None],
        interval: float = 30.0,
    ):
        self.clock = clock
        self.adapter = adapter
        self.runner = runner
        self.selectors = dict(selectors)
        self.on_change = on_change
        self.interval = interval
        self.current: InterfaceMap | None = None
        self.ready: defer.Deferred[None] = defer.Deferred()
        self._missing: set[tuple[str, str]] = set()
        self._refresher = Coalescer(self._refresh)
        self._refresher.enabled = False
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        super().startService()
        self._refresher.enabled = True
        # Fires after the first read: the daemon should classify clients only from then on.
        self.ready = self.request_refresh()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802 (Twisted API)
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self._refresher.enabled = False
        return self._refresher.when_idle()

    def request_refresh(self) -> defer.Deferred[None]:
        return self._refresher.request()

    def netlink_event(self, change: NetlinkChange) -> None:
        if change in (NetlinkChange.ADDRESS, NetlinkChange.LINK):
            self.request_refresh()

    def _tick(self) -> None:
        try:
            self.request_refresh()
        except Exception:  # noqa: BLE001 (keep the safety-net timer alive)
            _log.failure("interfaces: periodic re-read could not be requested")

    def _refresh(self) -> defer.Deferred[None]:
        reading = self.runner(self._read_in_worker, dict(self.selectors))
        reading.addCallbacks(self._read, self._read_failed)
        return reading

    def _read_in_worker(self, selectors: Mapping[str, InterfaceSelector]) -> dict[str, dict[str, tuple]]:
        return {
            key: self.adapter.interface_networks(selector.names, selector.vlans) for key, selector in selectors.items()
        }

    def _read(self, mapping: dict[str, dict[str, tuple[IPNetwork, ...]]]) -> None:
        for key, selector in self.selectors.items():
            for name in selector.names:
                if name not in mapping.get(key, {}):
                    if (key, name) not in self._missing:
                        self._missing.add((key, name))
                        _log.warn(
                            "interfaces: {interface} (group {group}) does not exist; "
                            "its subnets join the group when it appears",
                            interface=name,
                            group=key,
                        )
                elif (key, name) in self._missing:
                    self._missing.discard((key, name))
                    _log.info("interfaces: {interface} (group {group}) appeared", interface=name, group=key)
        if mapping == self.current:
            return
        self.current = mapping
        for key, interfaces in sorted(mapping.items()):
            networks = ", ".join(str(n) for n in networks_of(interfaces)) or "none"
            _log.info("interfaces: group {group} subnets: {networks}", group=key, networks=networks)
        self.on_change(mapping)

    def _read_failed(self, failure: Failure) -> None:
        _log.failure("interfaces: could not read interface addresses (keeping the last ones)", failure)


# -- the parent: worker thread and watcher ------------------------------------------------------


class Watcher(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


class NetlinkServices(service.MultiService):
    """Owns the netlink worker thread and the watcher; children get netlink_event(change) calls.

    Start: worker, then watcher (so no change is missed between a child's first read and the
    subscription), then the children.  Stop: watcher, then the children one after another in
    reverse order (EgressService may still need the worker to remove its state), then the
    adapter is closed in the worker, then the worker stops.
    """

    name = "netlink"

    def __init__(
        self,
        reactor: Any,
        runner: Runner,
        adapter: EgressAdapter,
        watcher_factory: Callable[[Callable[[NetlinkChange], None]], Watcher] | None = None,
    ):
        super().__init__()
        self.reactor = reactor
        self.runner = runner
        self.adapter = adapter
        self.watcher_factory = watcher_factory
        self.watcher: Watcher | None = None

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        self.runner.start()
        if self.watcher_factory is not None:
            self.watcher = self.watcher_factory(self._from_watcher_thread)
            self.watcher.start()
        super().startService()

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802 (Twisted API)
        service.Service.stopService(self)
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.stop()
        done: defer.Deferred[Any] = defer.succeed(None)
        for child in reversed(list(self)):
            done.addCallback(lambda _, child=child: child.stopService() if child.running else None)
            done.addErrback(lambda failure: _log.failure("netlink: a service failed to stop", failure))
        done.addCallback(lambda _: self.runner(self.adapter.close))
        done.addErrback(lambda failure: _log.failure("netlink: closing the adapter failed", failure))
        done.addBoth(lambda _: self.runner.stop())
        return done

    def _from_watcher_thread(self, change: NetlinkChange) -> None:
        self.reactor.callFromThread(self.dispatch, change)

    def dispatch(self, change: NetlinkChange) -> None:
        for child in self:
            handler = getattr(child, "netlink_event", None)
            if handler is not None and child.running:
                handler(change)
