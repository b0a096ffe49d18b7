"""The netlink side's Twisted plumbing: one worker thread, the watcher, and their parent service.

Everything that touches netlink goes through an adapter object (blockd.netlink.NetlinkAdapter
in the daemon, a fake in tests) called in ONE worker thread through a runner, because the
adapter is not thread-safe and netlink calls block.  Decisions stay pure (blockd.egress) and
run on the reactor thread; only kernel dumps and applies run in the worker.

  Runner / ThreadRunner  the worker thread (SynchronousRunner runs inline, for tests)
  Coalescer              requests while a job runs collapse into one follow-up run
  NetlinkServices        owns the worker thread and the notification watcher; parent of
                         EgressService and InterfaceNetworks, which get netlink_event() calls
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, Protocol

from twisted.application import service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from blockd.egress import EgressSettings, KernelState, NetlinkChange, Plan
from blockd.prefix_table import IPNetwork

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


class Watcher(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


def _stop_if_running(child: service.IService) -> Callable[[object], defer.Deferred[None] | None]:
    """A callback that stops child unless it is already stopped."""
    return lambda _: child.stopService() if child.running else None


class NetlinkServices(service.MultiService):
    """Owns the netlink worker thread and the watcher; children get netlink_event(change) calls.

    Start: worker, then watcher (so no change is missed between a child's first read and the
    subscription), then the children.  Stop: watcher, then the children one after another in
    reverse order (EgressService may still need the worker to remove its state), then the
    adapter is closed in the worker, then the worker stops.
    """

    name = "netlink"  # type: ignore[assignment]  # Twisted: Service.name = None, unannotated

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
            done.addCallback(_stop_if_running(child))
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
