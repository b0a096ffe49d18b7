"""blockd.refresh (the SOA schedule, pure) and blockd.transfer.SecondaryZone driving it on a task.Clock.

SecondaryZone is given a fake start_transfer: each transfer is a Deferred the test fires, so
failover, the IXFR-to-AXFR fallback, NOTIFY and the timers are checked without a socket or a
sleep.  ZoneTransfer itself (the TCP side) is in test_transfer_knot.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from blockd.config import Endpoint
from blockd.refresh import RefreshSchedule, TimerLimits, Timers, bootstrap_wait
from blockd.transfer import RESULTS, SecondaryZone, TransferError
from blockd.xfr import FullZone, Incremental, Refused, TsigError, UpToDate, XfrError, read_message
from tests.test_xfr import AXFR, ZONE, response, soa

# --- RefreshSchedule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("soa_timers", "expected"),
    [
        ((3600, 600, 86400), (3600, 600, 86400)),
        ((0, 0, 0), (10, 5, 10)),  # hostile zeros: floors, expire at least refresh
        ((1, 1, 1), (10, 5, 10)),
        ((10**9, 10**9, 10**9), (86400, 86400, 365 * 86400)),  # caps
        ((300, 60, 120), (300, 60, 300)),  # expire below refresh is raised to it
        ((30, 900, 3600), (30, 900, 3600)),  # retry above refresh is left alone
    ],
)
def test_timers_are_clamped(soa_timers: tuple[int, int, int], expected: tuple[float, float, float]) -> None:
    timers = Timers.from_soa(*soa_timers)
    assert (timers.refresh, timers.retry, timers.expire) == expected


def test_timer_limits_are_settable() -> None:
    limits = TimerLimits(refresh_min=2, retry_min=1)
    assert Timers.from_soa(0, 0, 0, limits) == Timers(2, 1, 2)


@pytest.mark.parametrize(
    ("failures", "wait"), [(1, 5), (2, 20), (3, 45), (10, 500), (37, 6845), (38, 7200), (1000, 7200)]
)
def test_bootstrap_wait(failures: int, wait: float) -> None:
    assert bootstrap_wait(failures) == wait


def test_start_without_a_copy_checks_at_once() -> None:
    schedule = RefreshSchedule()
    schedule.start(100.0)
    assert schedule.next_check(100.0) == 100.0
    assert not schedule.has_copy and not schedule.expired(10**9)


def test_start_jitter_spreads_the_first_check_over_5_seconds_when_a_copy_serves() -> None:
    schedule = RefreshSchedule()
    schedule.start(100.0, copy_age=10.0, jitter=0.5)
    assert schedule.next_check(100.0) == 102.5


def test_start_without_a_copy_is_not_spread() -> None:
    """With nothing to serve, waiting only delays the first block."""
    schedule = RefreshSchedule()
    schedule.start(100.0, jitter=0.9)
    assert schedule.next_check(100.0) == 100.0


@pytest.mark.parametrize(("age", "expired"), [(0, False), (86399, False), (86400, True), (10**6, True)])
def test_start_with_a_copy_from_disk_counts_its_age(age: float, expired: bool) -> None:
    schedule = RefreshSchedule()
    schedule.start(1000.0, copy_age=age, timers=Timers(3600, 600, 86400))
    assert schedule.has_copy
    assert schedule.next_check(1000.0) == 1000.0  # checked at once all the same
    assert schedule.expired(1000.0) is expired


@pytest.mark.parametrize(("jitter", "due"), [(0.0, 3600.0), (0.5, 3420.0), (0.999999, 3240.00036), (7.0, 3240.0)])
def test_success_waits_refresh_up_to_10_percent_less(jitter: float, due: float) -> None:
    schedule = RefreshSchedule()
    schedule.start(0.0)
    schedule.begin(0.0)
    schedule.on_success(3600, 600, 86400, 0.0, jitter)
    assert schedule.next_check(0.0) == pytest.approx(due)
    assert schedule.failures == 0 and not schedule.in_progress


def test_failure_waits_retry_up_to_10_percent_more_but_not_past_expiry() -> None:
    schedule = RefreshSchedule()
    schedule.start(0.0)
    schedule.begin(0.0)
    schedule.on_success(3600, 600, 5000, 0.0)
    schedule.begin(3600.0)
    schedule.on_failure(3600.0, jitter=0.5)
    assert schedule.next_check(3600.0) == pytest.approx(3600.0 + 630.0)
    schedule.begin(4500.0)
    schedule.on_failure(4500.0)
    assert schedule.next_check(4500.0) == 5000.0  # the moment the copy expires: one more try then
    schedule.begin(5000.0)
    schedule.on_failure(5000.0)
    assert schedule.expired(5000.0)
    assert schedule.next_check(5000.0) == 5600.0  # past expiry: the plain retry interval


def test_failures_before_any_copy_back_off_as_knot_bootstraps() -> None:
    schedule = RefreshSchedule()
    schedule.start(0.0)
    now = 0.0
    waits = []
    for _ in range(4):
        schedule.begin(now)
        schedule.on_failure(now)
        waits.append(schedule.next_check(now) - now)
        now = schedule.next_check(now)
    assert waits == [5.0, 20.0, 45.0, 80.0]


def test_expiry_comes_after_expire_seconds_without_success_and_ends_with_one() -> None:
    schedule = RefreshSchedule()
    schedule.start(0.0)
    schedule.begin(0.0)
    schedule.on_success(100, 50, 1000, 0.0)
    assert not schedule.expired(999.0)
    assert schedule.expired(1000.0)
    schedule.begin(1000.0)
    schedule.on_success(100, 50, 1000, 1001.0)
    assert not schedule.expired(1001.0)


def test_no_check_is_due_while_one_is_under_way() -> None:
    schedule = RefreshSchedule()
    schedule.start(0.0)
    schedule.begin(0.0)
    assert schedule.next_check(5.0) == math.inf


def test_notify_checks_at_once() -> None:
    schedule = RefreshSchedule()
    schedule.start(0.0)
    schedule.begin(0.0)
    schedule.on_success(3600, 600, 86400, 0.0)
    assert schedule.on_notify(100.0)
    assert schedule.next_check(100.0) == 100.0


def test_notify_is_rate_limited() -> None:
    schedule = RefreshSchedule()
    schedule.start(0.0)
    schedule.begin(0.0)
    schedule.on_success(3600, 600, 86400, 0.0)
    assert schedule.on_notify(100.0)
    schedule.begin(100.0)
    schedule.on_success(3600, 600, 86400, 101.0)
    assert schedule.on_notify(102.0)  # scheduled, but not before 5 s after the last NOTIFY check
    assert schedule.next_check(102.0) == 105.0
    assert not schedule.on_notify(103.0)  # already due as soon as it may be


def test_notify_during_a_check_asks_for_another_right_after() -> None:
    schedule = RefreshSchedule()
    schedule.start(0.0)
    schedule.begin(0.0)
    assert schedule.on_notify(1.0)
    schedule.on_success(3600, 600, 86400, 2.0)
    assert schedule.next_check(2.0) == 2.0


def test_notify_when_a_check_is_due_anyway_changes_nothing() -> None:
    schedule = RefreshSchedule()
    schedule.start(0.0)
    assert not schedule.on_notify(0.0)


# --- SecondaryZone on a clock ------------------------------------------------------------------

P1 = Endpoint("192.0.2.1", 53)
P2 = Endpoint("2001:db8::2", 5353)
FULL7 = FullZone(read_message(response([soa(7)])).answers[0], read_message(response(AXFR)).answers[1:-1])
SOA8 = read_message(response([soa(8)])).answers[0]
INCR8 = Incremental(7, 8, [([], [])], SOA8)


class FakeTransfers:
    """start_transfer for SecondaryZone: every transfer waits for the test to fire it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Endpoint, int | None, defer.Deferred[Any]]] = []

    def __call__(self, primary: Endpoint, serial: int | None) -> defer.Deferred[Any]:
        deferred: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((primary, serial, deferred))
        return deferred

    def asked(self) -> list[tuple[Endpoint, int | None]]:
        return [(primary, serial) for primary, serial, _ in self.calls]

    def answer(self, outcome: object) -> None:
        pending = [d for _, _, d in self.calls if not d.called]
        assert pending, "no transfer in flight"
        if isinstance(outcome, BaseException):
            pending[0].errback(Failure(outcome))
        else:
            pending[0].callback(outcome)


class Harness:
    def __init__(self, **kw: Any) -> None:
        self.clock = task.Clock()
        self.transfers = FakeTransfers()
        self.results: list[tuple[object, Endpoint]] = []
        self.failures: list[tuple[str, Endpoint]] = []
        self.apply: Any = None
        self.zone = SecondaryZone(
            self.clock,  # type: ignore[arg-type]  # no connectTCP needed with a fake start_transfer
            ZONE,
            kw.pop("primaries", [P1, P2]),
            None,
            self.on_result,
            lambda reason, primary: self.failures.append((reason, primary)),
            jitter=lambda: 0.0,
            start_transfer=self.transfers,
            **kw,
        )

    def start(self) -> None:
        self.zone.startService()
        self.clock.advance(0)  # the first check runs on the reactor's next turn

    def on_result(self, result: object, primary: Endpoint) -> object:
        self.results.append((result, primary))
        return self.apply(result) if self.apply else None


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def zone_lines(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(event) for event in events if "zone" in event]


def test_first_check_is_an_axfr_at_start() -> None:
    h = Harness()
    h.start()
    assert h.transfers.asked() == [(P1, None)]
    h.transfers.answer(FULL7)
    assert h.results == [(FULL7, P1)]
    assert h.zone.serial == 7 and h.zone.last_success == 0.0 and h.zone.last_primary == P1
    assert h.zone.transfers == {("axfr", "full"): 1}
    h.clock.advance(3599)
    assert len(h.transfers.calls) == 1
    h.clock.advance(1)  # the SOA's refresh, 3600 s
    assert h.transfers.asked()[-1] == (P1, 7)


def test_a_transfer_is_logged_with_zone_primary_and_serials(log_events: list[dict[str, Any]]) -> None:
    h = Harness(serial=7)
    h.start()
    h.transfers.answer(INCR8)
    assert "zone rpz.example from 192.0.2.1:53: IXFR, differences at serial 8 (was 7)" in zone_lines(log_events)


def test_ixfr_when_a_serial_is_known() -> None:
    h = Harness(serial=7, copy_age=10.0, copy_timers=Timers(3600, 600, 86400))
    h.start()
    assert h.transfers.asked() == [(P1, 7)]
    h.transfers.answer(INCR8)
    assert h.zone.serial == 8 and h.zone.transfers == {("ixfr", "incremental"): 1}


def test_up_to_date_keeps_the_serial_and_is_still_reported() -> None:
    h = Harness(serial=7)
    h.start()
    h.transfers.answer(UpToDate(7, FULL7.soa))
    assert h.results == [(UpToDate(7, FULL7.soa), P1)]
    assert h.zone.serial == 7 and h.zone.transfers == {("ixfr", "uptodate"): 1}


@pytest.mark.parametrize(
    "error",
    [Refused(5), Refused(4), XfrError("the differences start at serial 3, ours is 7"), XfrError("connection closed")],
)
def test_ixfr_failure_falls_back_to_axfr_from_the_same_primary(error: XfrError) -> None:
    h = Harness(serial=7)
    h.start()
    h.transfers.answer(error)
    assert h.transfers.asked() == [(P1, 7), (P1, None)]
    h.transfers.answer(FULL7)
    assert h.results == [(FULL7, P1)]
    assert h.zone.transfers[("axfr", "full")] == 1
    assert sum(count for (kind, _), count in h.zone.transfers.items() if kind == "ixfr") == 1


def test_an_ixfr_answered_with_the_full_zone_is_taken_as_is() -> None:
    h = Harness(serial=3)
    h.start()
    h.transfers.answer(FULL7)
    assert h.transfers.asked() == [(P1, 3)]
    assert h.zone.serial == 7 and h.zone.transfers == {("ixfr", "full"): 1}


@pytest.mark.parametrize(
    ("error", "result"),
    [
        (TsigError("bad signature (BADSIG)"), "tsig"),
        (TransferError("cannot connect: Connection refused", "unreachable"), "unreachable"),
        (TransferError("timeout: idle for 30 s", "timeout"), "timeout"),
        (TransferError("transfer larger than 10 bytes", "too_big"), "too_big"),
    ],
)
def test_failures_that_an_axfr_would_not_fix_go_to_the_next_primary(error: Exception, result: str) -> None:
    h = Harness(serial=7)
    h.start()
    h.transfers.answer(error)
    assert h.transfers.asked() == [(P1, 7), (P2, 7)]
    assert h.failures == [(str(error), P1)]
    assert h.zone.transfers == {("ixfr", result): 1}
    h.transfers.answer(INCR8)
    assert h.results == [(INCR8, P2)] and h.zone.last_primary == P2


def test_every_primary_failing_schedules_a_retry(log_events: list[dict[str, Any]]) -> None:
    h = Harness(serial=7, copy_age=0.0, copy_timers=Timers(3600, 600, 86400))
    h.start()
    h.transfers.answer(TransferError("timeout: idle for 30 s", "timeout"))
    h.transfers.answer(Refused(5))  # P2's IXFR
    h.transfers.answer(Refused(5))  # P2's AXFR
    assert h.transfers.asked() == [(P1, 7), (P2, 7), (P2, None)]
    assert [primary for _, primary in h.failures] == [P1, P2]
    assert h.zone.last_failure == "primary answered REFUSED"
    h.clock.advance(599)
    assert len(h.transfers.calls) == 3
    h.clock.advance(1)
    assert h.transfers.asked()[-1] == (P1, 7)
    lines = zone_lines(log_events)
    assert any("zone rpz.example from 192.0.2.1:53: IXFR failed: timeout: idle for 30 s" in line for line in lines)
    assert any("from [2001:db8::2]:5353: AXFR failed: primary answered REFUSED" in line for line in lines)
    assert any("next try in 600 s" in line for line in lines)
    assert not any(event.get("log_failure") for event in log_events)  # no tracebacks


def test_a_result_the_daemon_rejects_is_not_taken() -> None:
    h = Harness()
    h.apply = lambda result: (_ for _ in ()).throw(ValueError("zone has 3 invalid triggers"))
    h.start()
    h.transfers.answer(FULL7)
    assert h.zone.serial is None
    assert h.failures == [("zone has 3 invalid triggers", P1)]
    assert h.zone.transfers == {("axfr", "rejected"): 1}
    assert h.transfers.asked() == [(P1, None), (P2, None)]


def test_the_daemon_may_apply_asynchronously() -> None:
    h = Harness()
    applied: defer.Deferred[None] = defer.Deferred()
    h.apply = lambda result: applied
    h.start()
    h.transfers.answer(FULL7)
    assert h.zone.serial is None and h.zone.schedule.in_progress
    applied.callback(None)
    assert h.zone.serial == 7 and not h.zone.schedule.in_progress


def test_notify_from_a_primary_checks_at_once_from_that_primary() -> None:
    h = Harness()
    h.start()
    h.transfers.answer(FULL7)
    h.clock.advance(100)
    assert h.zone.notify("2001:db8:0::2")
    assert len(h.transfers.calls) == 1  # on the next turn of the reactor
    h.clock.advance(0)
    assert h.transfers.asked()[-1] == (P2, 7)
    h.transfers.answer(INCR8)
    assert h.zone.serial == 8


def test_notify_from_anyone_else_is_ignored() -> None:
    h = Harness()
    h.start()
    h.transfers.answer(FULL7)
    assert not h.zone.notify("198.51.100.7")
    h.clock.advance(100)
    assert len(h.transfers.calls) == 1


def test_notify_from_an_ipv4_mapped_address_counts() -> None:
    h = Harness()
    h.start()
    h.transfers.answer(FULL7)
    assert h.zone.notify("::ffff:192.0.2.1")


def test_notify_during_a_transfer_checks_again_after_it() -> None:
    h = Harness()
    h.start()
    assert h.zone.notify("192.0.2.1")
    assert len(h.transfers.calls) == 1  # at most one in progress
    h.transfers.answer(FULL7)
    h.clock.advance(0)
    assert h.transfers.asked() == [(P1, None), (P1, 7)]


def test_expiry_is_reported_once_and_the_copy_kept(log_events: list[dict[str, Any]]) -> None:
    h = Harness(serial=7, copy_age=86000.0, copy_timers=Timers(3600, 600, 86400), primaries=[P1])
    h.start()
    assert not h.zone.expired
    h.transfers.answer(TransferError("cannot connect: Connection refused", "unreachable"))
    assert not h.zone.expired
    h.clock.advance(400)  # retry capped at the moment of expiry
    assert h.zone.expired
    h.transfers.answer(TransferError("cannot connect: Connection refused", "unreachable"))
    h.clock.advance(600)
    h.transfers.answer(TransferError("cannot connect: Connection refused", "unreachable"))
    expired_lines = [line for line in zone_lines(log_events) if "expired" in line]
    assert len(expired_lines) == 1
    assert "serial 7" in expired_lines[0] and "still serving it" in expired_lines[0]
    assert h.zone.serial == 7
    h.clock.advance(600)
    h.transfers.answer(UpToDate(7, FULL7.soa))
    assert not h.zone.expired


def test_an_older_serial_at_the_primary_is_logged(log_events: list[dict[str, Any]]) -> None:
    h = Harness(serial=9)
    h.start()
    h.transfers.answer(UpToDate(7, FULL7.soa))
    assert h.zone.serial == 9
    assert any("primary has serial 7, older than ours (9)" in line for line in zone_lines(log_events))


def test_stop_cancels_the_transfer_and_the_timer() -> None:
    h = Harness()
    h.start()
    in_flight = h.transfers.calls[0][2]
    h.zone.stopService()
    assert in_flight.called  # cancelled
    in_flight.addErrback(lambda failure: None)
    h.clock.advance(10**6)
    assert len(h.transfers.calls) == 1 and h.failures == []
    assert not h.clock.getDelayedCalls()


def test_counter_results_are_a_closed_set() -> None:
    h = Harness(serial=7)
    h.start()
    h.transfers.answer(TsigError("x"))
    h.transfers.answer(Refused(5))
    h.transfers.answer(XfrError("y"))
    assert {result for _, result in h.zone.transfers} <= set(RESULTS)


def test_a_zone_needs_a_primary() -> None:
    with pytest.raises(ValueError, match="no primaries"):
        Harness(primaries=[])
