"""EgressService, InterfaceNetworks and NetlinkServices with task.Clock and a fake adapter.

No netlink: FakeAdapter keeps a KernelState and applies plans with blockd.egress.apply_to.
The "worker thread" is either SynchronousRunner or ManualRunner, which queues each call so
the test decides when it runs (to hold a reconcile open while more requests arrive).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.logger import capturedLogs

from blockd.egress import (
    EgressSettings,
    KernelState,
    LearnedAddresses,
    NetlinkChange,
    Plan,
    Route,
    apply_to,
)
from blockd.egress_service import TYPE_A, TYPE_AAAA, EgressService, FollowUpLookups, ReconcileReport
from blockd.interface_groups import InterfaceNetworks, InterfaceSelector, networks_of
from blockd.netlink_services import Coalescer, NetlinkServices, SynchronousRunner

net = ipaddress.ip_network
START = 1_700_000_000.0


class AdapterFailure(Exception):
    pass


class FakeAdapter:
    def __init__(self) -> None:
        self.state = KernelState()
        self.fail = False
        self.calls: list[str] = []
        self.links: dict[str, tuple] = {}
        self.vlans: dict[int, list[str]] = {}
        self.closed = False

    def owned_state(self, settings: EgressSettings) -> KernelState:
        self.calls.append("owned_state")
        if self.fail:
            raise AdapterFailure("netlink said no")
        return self.state

    def apply(self, plan: Plan) -> int:
        self.calls.append("apply")
        self.state = apply_to(self.state, plan)
        return plan.operations

    def remove_all(self, settings: EgressSettings) -> int:
        self.calls.append("remove_all")
        count = len(self.state.rules) + len(self.state.routes)
        self.state = KernelState()
        return count

    def interface_networks(self, names: Any, vlan_ids: Any) -> dict[str, tuple]:
        self.calls.append("interface_networks")
        if self.fail:
            raise AdapterFailure("netlink said no")
        selected = [n for n in names if n in self.links]
        selected += [n for vlan in vlan_ids for n in self.vlans.get(vlan, []) if n in self.links]
        return {name: self.links[name] for name in selected}

    def close(self) -> None:
        self.closed = True

    def route_destinations(self) -> set[str]:
        return {str(r.destination) for r in self.state.routes}


class ManualRunner:
    """Queues calls; run_next() runs the oldest and fires its Deferred."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[..., Any], tuple[Any, ...], defer.Deferred[Any]]] = []
        self.started = self.stopped = False

    def __call__(self, function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.queue.append((function, args, d))
        return d

    def run_next(self) -> None:
        function, args, d = self.queue.pop(0)
        try:
            result = function(*args)
        except Exception as exc:  # noqa: BLE001 (handed to the Deferred like deferToThread does)
            d.errback(exc)
        else:
            d.callback(result)

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True


class Setup:
    def __init__(self, runner: Any = None, **settings: Any):
        self.clock = task.Clock()
        self.clock.advance(START)
        self.settings = EgressSettings(**{"enabled": True, "learn_min_ttl": 60, "reconcile_interval": 60, **settings})
        self.adapter = FakeAdapter()
        self.networks = [net("10.120.0.0/22"), net("fd00:120::/64")]
        self.prefixes = [net("198.51.100.0/24")]
        self.learned = LearnedAddresses.from_settings(self.settings)
        self.reports: list[ReconcileReport] = []
        self.runner = runner or SynchronousRunner()
        self.service = EgressService(
            self.clock,
            self.settings,
            self.adapter,
            lambda: self.networks,
            lambda: self.prefixes,
            self.learned,
            self.runner,
            self.reports.append,
            expiry_batch=0.0,
        )

    def results(self) -> list[str]:
        return [r.result for r in self.reports]


def test_reconcile_at_start():
    s = Setup()
    s.service.startService()
    assert s.adapter.calls == ["owned_state", "apply"]
    assert {str(r.source) for r in s.adapter.state.rules} == {"10.120.0.0/22", "fd00:120::/64"}
    assert s.adapter.route_destinations() == {"198.51.100.0/24"}
    (report,) = s.reports
    assert (report.result, report.timestamp, report.rules) == ("success", START, 2)
    assert report.route_counts == {"static": 1, "learned": 0, "never": 0}
    assert report.changes == {"add_rule": 2, "del_rule": 0, "add_route": 1, "del_route": 0}


def test_reconcile_removes_stale_state_left_by_an_earlier_run():
    s = Setup()
    stale = Route(4, net("192.0.2.0/24"), 1120, "prohibit", 120)
    s.adapter.state = KernelState((), (stale,))
    s.service.startService()
    assert s.adapter.route_destinations() == {"198.51.100.0/24"}


def test_requests_while_running_collapse_into_one_follow_up_and_none_is_lost():
    runner = ManualRunner()
    s = Setup(runner)
    s.service.startService()
    assert len(runner.queue) == 1  # the start-up reconcile, held open
    assert not s.service.ready.called
    fired = []
    for _ in range(3):
        s.service.request_reconcile().addCallback(fired.append)
    s.networks = [*s.networks, net("10.121.0.0/24")]  # changed while the first run is open
    assert len(runner.queue) == 1  # never two at once
    runner.run_next()
    assert s.service.ready.called
    assert len(runner.queue) == 1  # exactly one follow-up
    assert fired == []  # those requests wait for the run that started after them
    runner.run_next()
    assert runner.queue == []
    assert fired == [None, None, None]
    assert "10.121.0.0/24" in {str(r.source) for r in s.adapter.state.rules}
    assert s.results() == ["success", "success"]


def test_timer_reconcile_survives_adapter_errors_and_counts_them():
    s = Setup()
    s.service.startService()
    s.adapter.state = KernelState()  # someone flushed the table
    s.adapter.fail = True
    s.clock.advance(60)
    assert s.results() == ["success", "failure"]
    assert s.reports[-1].error == "netlink said no"
    s.clock.advance(60)
    assert s.results() == ["success", "failure", "failure"]
    s.adapter.fail = False
    s.clock.advance(60)  # the LoopingCall is still alive
    assert s.results()[-1] == "success"
    assert s.adapter.route_destinations() == {"198.51.100.0/24"}


def test_a_failing_desired_state_is_counted_not_raised():
    s = Setup()

    def broken() -> list:
        raise ValueError("snapshot missing")

    s.service.blocking_networks = broken
    s.service.startService()
    s.clock.advance(60)
    assert s.results() == ["failure", "failure"]


def test_rule_and_route_changes_trigger_a_reconcile_addresses_do_not():
    s = Setup()
    s.service.startService()
    s.adapter.state = KernelState((), s.adapter.state.routes)  # a rule was deleted by hand
    s.service.netlink_event(NetlinkChange.ADDRESS)
    s.service.netlink_event(NetlinkChange.LINK)
    assert len(s.reports) == 1
    s.service.netlink_event(NetlinkChange.RULE)
    assert len(s.reports) == 2
    assert len(s.adapter.state.rules) == 2  # restored


def test_learning_requests_a_reconcile_only_when_the_set_changes():
    s = Setup()
    s.service.startService()
    result = s.service.learn(["203.0.113.7", "2001:db8::7"], ttl=30)
    assert result.added == 2
    assert len(s.reports) == 2
    assert s.adapter.route_destinations() == {"198.51.100.0/24", "203.0.113.7/32", "2001:db8::7/128"}
    s.clock.advance(10)
    assert s.service.learn(["203.0.113.7"], ttl=30).refreshed == 1
    assert len(s.reports) == 2  # a refresh changes no route
    assert s.service.learn(["0.0.0.0"], ttl=30).special_skipped == 1
    assert len(s.reports) == 2


def test_learning_disabled_ignores_answers():
    s = Setup(learn=False)
    s.service.startService()
    assert s.service.learn(["203.0.113.7"], ttl=30).added == 0
    assert len(s.learned) == 0


def test_expiry_triggers_one_reconcile_at_the_right_time():
    s = Setup(reconcile_interval=3600)
    s.service.startService()
    s.service.learn(["203.0.113.7"], ttl=5)  # floor: learn_min_ttl = 60
    s.clock.advance(1)
    s.service.learn(["203.0.113.8", "203.0.113.9"], ttl=5)
    timers = [c for c in s.clock.getDelayedCalls() if c.func == s.service._expire]
    assert len(timers) == 1  # one timer, not one per entry
    before = len(s.reports)
    s.clock.advance(58.9)  # 59.9 s after the first answer
    assert len(s.reports) == before and "203.0.113.7/32" in s.adapter.route_destinations()
    s.clock.advance(0.1)  # 60 s: the first entry expires
    assert len(s.reports) == before + 1
    assert s.adapter.route_destinations() == {"198.51.100.0/24", "203.0.113.8/32", "203.0.113.9/32"}
    s.clock.advance(1)  # both later entries expire together: one more reconcile
    assert len(s.reports) == before + 2
    assert s.adapter.route_destinations() == {"198.51.100.0/24"}
    assert [c for c in s.clock.getDelayedCalls() if c.func == s.service._expire] == []


def test_expiry_batch_groups_nearby_expiries():
    s = Setup(reconcile_interval=3600)
    s.service.expiry_batch = 5.0
    s.service.startService()
    s.service.learn(["203.0.113.7"], ttl=0)
    s.clock.advance(3)
    s.service.learn(["203.0.113.8"], ttl=0)
    before = len(s.reports)
    s.clock.advance(61.9)  # 64.9 s: inside the batch window of the first expiry
    assert len(s.reports) == before
    s.clock.advance(0.1)  # 65 s: first expiry + 5 s; the second (at 63 s) is due too
    assert len(s.reports) == before + 1
    assert s.adapter.route_destinations() == {"198.51.100.0/24"}


def test_a_sooner_expiry_moves_the_timer_forward():
    s = Setup(learn_min_ttl=0, reconcile_interval=3600)
    s.service.startService()
    s.service.learn(["203.0.113.7"], ttl=100)
    s.service.learn(["203.0.113.8"], ttl=10)
    s.clock.advance(10)
    assert s.adapter.route_destinations() == {"198.51.100.0/24", "203.0.113.7/32"}


def test_on_exit_keep_leaves_state():
    s = Setup(on_exit="keep")
    s.service.startService()
    d = s.service.stopService()
    assert d.called
    assert "remove_all" not in s.adapter.calls
    assert len(s.adapter.state.rules) == 2
    assert s.clock.getDelayedCalls() == []  # timer and expiry stopped


def test_on_exit_remove_waits_for_a_running_reconcile_then_removes():
    runner = ManualRunner()
    s = Setup(runner, on_exit="remove")
    s.service.startService()
    d = s.service.stopService()
    assert not d.called and len(runner.queue) == 1
    runner.run_next()  # the start-up reconcile finishes
    assert len(runner.queue) == 1  # then remove_all, in the worker
    runner.run_next()
    assert d.called
    assert s.adapter.calls[-1] == "remove_all"
    assert s.adapter.state == KernelState()
    s.service.request_reconcile()
    assert runner.queue == []  # stopped: no more runs


def test_coalescer_when_idle():
    runs: list[defer.Deferred[None]] = []

    def job() -> defer.Deferred[None]:
        runs.append(defer.Deferred())
        return runs[-1]

    coalescer = Coalescer(job)
    assert coalescer.when_idle().called
    coalescer.request()
    coalescer.request()
    idle = coalescer.when_idle()
    runs[0].callback(None)
    assert not idle.called and len(runs) == 2
    runs[1].callback(None)
    assert idle.called


# -- FollowUpLookups -----------------------------------------------------------------------------


class FakeResolve:
    def __init__(self) -> None:
        self.pending: list[tuple[str, int, defer.Deferred[tuple[list[str], float]]]] = []

    def __call__(self, name: str, qtype: int) -> defer.Deferred[tuple[list[str], float]]:
        d: defer.Deferred[tuple[list[str], float]] = defer.Deferred()
        self.pending.append((name, qtype, d))
        return d

    def answer_all(self) -> None:
        pending, self.pending = self.pending, []
        for _name, qtype, d in pending:
            d.callback((["203.0.113.7"] if qtype == TYPE_A else ["2001:db8::7"], 300.0))


def make_follow_up(**kwargs: Any) -> tuple[FollowUpLookups, FakeResolve, list, task.Clock]:
    clock = task.Clock()
    resolve = FakeResolve()
    learned: list = []
    lookups = FollowUpLookups(clock, resolve, lambda addresses, ttl: learned.append((list(addresses), ttl)), **kwargs)
    return lookups, resolve, learned, clock


def test_follow_up_resolves_a_and_aaaa_and_learns_both():
    lookups, resolve, learned, _clock = make_follow_up()
    assert lookups.request("tiktok.com")
    assert [(n, q) for n, q, _ in resolve.pending] == [("tiktok.com", TYPE_A), ("tiktok.com", TYPE_AAAA)]
    resolve.answer_all()
    assert learned == [(["203.0.113.7"], 300.0), (["2001:db8::7"], 300.0)]


def test_follow_up_is_deduplicated_in_flight_and_for_min_interval():
    lookups, resolve, _learned, clock = make_follow_up(min_interval=100)
    assert lookups.request("tiktok.com")
    assert not lookups.request("tiktok.com")  # in flight
    resolve.answer_all()
    clock.advance(99)
    assert not lookups.request("tiktok.com")  # answered recently
    clock.advance(1)
    assert lookups.request("tiktok.com")
    assert (lookups.started_total, lookups.deduplicated_total) == (2, 2)


def test_follow_up_is_rate_limited_and_bounded():
    lookups, resolve, _learned, clock = make_follow_up(rate=1.0, burst=2, max_in_flight=10)
    assert [lookups.request(f"n{i}.example") for i in range(4)] == [True, True, False, False]
    assert lookups.rate_limited_total == 2
    clock.advance(1)
    assert lookups.request("n2.example")
    resolve.answer_all()
    lookups, resolve, _learned, clock = make_follow_up(rate=100.0, burst=100, max_in_flight=2)
    assert [lookups.request(f"n{i}.example") for i in range(3)] == [True, True, False]
    resolve.answer_all()
    assert lookups.request("n2.example")


def test_follow_up_failures_are_counted_and_forgotten():
    lookups, resolve, learned, _clock = make_follow_up(min_interval=0)
    lookups.request("tiktok.com")
    for _name, _qtype, d in resolve.pending:
        d.errback(AdapterFailure("upstream timeout"))
    resolve.pending.clear()
    assert (lookups.failed_total, learned) == (2, [])
    assert lookups.request("tiktok.com")  # not stuck "in flight"


# -- InterfaceNetworks ---------------------------------------------------------------------------


class InterfaceSetup:
    def __init__(self, selectors: dict[str, InterfaceSelector]):
        self.clock = task.Clock()
        self.adapter = FakeAdapter()
        self.changes: list[dict] = []
        self.service = InterfaceNetworks(
            self.clock, self.adapter, SynchronousRunner(), selectors, self.changes.append, interval=30
        )


def test_interface_networks_reported_at_start_and_only_on_change():
    s = InterfaceSetup({"gov": InterfaceSelector(names=("veth-gov",), vlans=(120,))})
    s.adapter.links = {"veth-gov": (net("10.120.0.0/24"),), "eth0.120": (net("10.121.0.0/24"), net("fd00:120::/64"))}
    s.adapter.vlans = {120: ["eth0.120"]}
    s.service.startService()
    assert s.service.ready.called
    assert s.changes == [
        {"gov": {"veth-gov": (net("10.120.0.0/24"),), "eth0.120": (net("10.121.0.0/24"), net("fd00:120::/64"))}}
    ]
    assert networks_of(s.changes[-1]["gov"]) == (net("10.120.0.0/24"), net("10.121.0.0/24"), net("fd00:120::/64"))
    s.service.netlink_event(NetlinkChange.ADDRESS)  # nothing changed
    s.service.netlink_event(NetlinkChange.ROUTE)  # not ours to watch
    assert len(s.changes) == 1
    s.adapter.links["veth-gov"] = (net("10.120.0.0/24"), net("10.122.0.0/24"))
    s.service.netlink_event(NetlinkChange.ADDRESS)
    assert len(s.changes) == 2
    assert s.changes[-1]["gov"]["veth-gov"] == (net("10.120.0.0/24"), net("10.122.0.0/24"))


def test_missing_interface_warns_once_and_is_picked_up_when_it_appears():
    s = InterfaceSetup({"gov": InterfaceSelector(names=("veth-late",))})
    with capturedLogs() as events:
        s.service.startService()
        s.service.netlink_event(NetlinkChange.LINK)
        s.clock.advance(30)
    warnings = [e for e in events if "does not exist" in e["log_format"]]
    assert len(warnings) == 1 and warnings[0]["interface"] == "veth-late"
    assert s.changes == [{"gov": {}}]
    s.adapter.links["veth-late"] = ()  # the interface appears, no address yet
    s.service.netlink_event(NetlinkChange.LINK)
    assert s.changes[-1] == {"gov": {"veth-late": ()}}
    s.adapter.links["veth-late"] = (net("10.120.0.0/24"),)
    s.clock.advance(30)  # no event this time: the periodic re-read is the safety net
    assert s.changes[-1] == {"gov": {"veth-late": (net("10.120.0.0/24"),)}}


def test_a_failed_read_keeps_the_last_mapping_and_the_timer():
    s = InterfaceSetup({"gov": InterfaceSelector(names=("veth-gov",))})
    s.adapter.links = {"veth-gov": (net("10.120.0.0/24"),)}
    s.service.startService()
    s.adapter.fail = True
    s.clock.advance(30)
    assert s.service.current == {"gov": {"veth-gov": (net("10.120.0.0/24"),)}}
    s.adapter.fail = False
    s.adapter.links["veth-gov"] = ()
    s.clock.advance(30)
    assert s.changes[-1] == {"gov": {"veth-gov": ()}}
    s.service.stopService()
    assert s.clock.getDelayedCalls() == []


# -- NetlinkServices -----------------------------------------------------------------------------


class FakeReactor:
    def __init__(self) -> None:
        self.from_thread: list[tuple] = []

    def callFromThread(self, function: Callable[..., Any], *args: Any) -> None:  # noqa: N802 (Twisted API)
        self.from_thread.append((function, args))
        function(*args)


class FakeWatcher:
    def __init__(self, callback: Callable[[NetlinkChange], None]):
        self.callback = callback
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True


def test_netlink_services_dispatch_and_stop_order():
    s = Setup(on_exit="remove")
    interfaces = InterfaceNetworks(
        s.clock, s.adapter, s.runner, {"gov": InterfaceSelector(names=("x",))}, lambda mapping: None
    )
    runner = ManualRunner()
    watchers: list[FakeWatcher] = []
    reactor = FakeReactor()

    def make_watcher(callback: Callable[[NetlinkChange], None]) -> FakeWatcher:
        watchers.append(FakeWatcher(callback))
        return watchers[-1]

    parent = NetlinkServices(reactor, runner, s.adapter, make_watcher)
    s.service.setServiceParent(parent)
    interfaces.setServiceParent(parent)
    parent.startService()
    assert runner.started and watchers[0].started and s.service.running and interfaces.running
    s.adapter.state = KernelState()
    watchers[0].callback(NetlinkChange.RULE)  # from the watcher thread, via callFromThread
    assert reactor.from_thread and len(s.adapter.state.rules) == 2
    d = parent.stopService()
    assert watchers[0].stopped
    assert len(runner.queue) == 1  # closing the adapter happens in the worker
    runner.run_next()
    assert d.called and runner.stopped and s.adapter.closed
    assert s.adapter.calls.count("remove_all") == 1 and not s.service.running and not interfaces.running


@pytest.mark.parametrize("change", list(NetlinkChange))
def test_dispatch_skips_stopped_children(change):
    s = Setup()
    parent = NetlinkServices(FakeReactor(), SynchronousRunner(), s.adapter)
    s.service.setServiceParent(parent)
    parent.dispatch(change)  # not running: nothing happens
    assert s.adapter.calls == []
