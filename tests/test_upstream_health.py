"""blockd.upstream_health: rtt smoothing, rto backoff, down and probing, and the strategies' plans.

Pure: every call passes `now`; no reactor, no sockets.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

from blockd.upstream_health import (
    EXPLORE,
    INITIAL_RTTVAR,
    MIN_RTO,
    PROBE_MAX,
    PROBE_MIN,
    QUIET,
    Plan,
    UpstreamHealth,
)

A, B, C = "192.0.2.1:53", "192.0.2.2:53", "192.0.2.3:53"
TIMEOUT = 2.0


def health(*names: str, timeout: float = TIMEOUT, seed: int = 1) -> UpstreamHealth:
    return UpstreamHealth(names or (A, B), timeout, random.Random(seed))


# --- rtt and rto ---------------------------------------------------------------------------------


def test_the_first_rto_is_unbounds_376_ms_clamped_to_the_timeout() -> None:
    assert health().attempt_timeout(A) == pytest.approx(4 * INITIAL_RTTVAR) == pytest.approx(0.376)
    assert health(timeout=0.3).attempt_timeout(A) == 0.3


def test_answers_are_smoothed_as_jacobson_karels() -> None:
    h = health()
    h.answered(A, 0.1, now=1.0)
    state = h.states[A]
    assert state.srtt == pytest.approx(0.1 / 8)
    assert state.rttvar == pytest.approx(INITIAL_RTTVAR + (0.1 - INITIAL_RTTVAR) / 4)
    assert h.attempt_timeout(A) == pytest.approx(state.srtt + 4 * state.rttvar)


def test_a_fast_upstream_converges_to_the_minimum_rto() -> None:
    h = health()
    for i in range(60):
        h.answered(A, 0.001, now=float(i))
    assert h.attempt_timeout(A) == MIN_RTO


def test_a_slow_upstream_gets_an_rto_above_its_answer_time() -> None:
    h = health()
    for i in range(60):
        h.answered(A, 0.8, now=float(i))
    assert 0.8 < h.attempt_timeout(A) <= TIMEOUT


def test_a_loss_doubles_the_rto_the_attempt_used_not_the_current_one() -> None:
    h = health()
    used = h.attempt_timeout(A)
    h.lost(A, used, now=1.0)
    assert h.attempt_timeout(A) == pytest.approx(2 * used)
    h.lost(A, used, now=1.0)  # a second attempt sent with the same rto, lost at the same time
    assert h.attempt_timeout(A) == pytest.approx(2 * used), "simultaneous losses double it once"
    for _ in range(10):
        h.lost(A, h.attempt_timeout(A), now=1.0)
    assert h.attempt_timeout(A) == TIMEOUT, "capped at the timeout"


def test_an_answer_undoes_the_backoff() -> None:
    h = health()
    h.answered(A, 0.01, now=0.0)
    before = h.attempt_timeout(A)
    h.lost(A, before, now=0.5)
    h.answered(A, 0.01, now=0.6)
    assert h.attempt_timeout(A) < before


# --- failures, down, back ----------------------------------------------------------------------


def test_icmp_refused_takes_an_upstream_down_at_once_and_it_goes_last() -> None:
    h = health(A, B, C)
    assert h.failed(A, "refused", now=5.0) is True
    assert not h.is_up(A)
    assert h.plan("ordered") == Plan((B, C, A))


def test_two_failures_with_no_usable_answer_take_it_down() -> None:
    h = health()
    assert h.failed(A, "timeout", now=0.0) is False
    assert h.is_up(A)
    assert h.failed(A, "servfail", now=0.1) is True
    assert not h.is_up(A)
    assert h.failed(A, "timeout", now=0.2) is False, "already down: reported once"


def test_failures_right_after_a_usable_answer_do_not_take_it_down_until_it_stays_quiet() -> None:
    h = health()
    h.answered(A, 0.01, now=10.0)
    assert not h.failed(A, "timeout", now=10.2)
    assert not h.failed(A, "timeout", now=10.4)  # a burst of slow names: it answered 0.4 s ago
    assert h.is_up(A)
    assert h.failed(A, "timeout", now=10.0 + QUIET)  # and still nothing usable a second on
    assert not h.is_up(A)


def test_a_usable_answer_ends_the_run_of_failures() -> None:
    h = health()
    h.failed(A, "servfail", now=0.0)
    h.answered(A, 0.01, now=0.1)
    assert h.states[A].failures == 0
    assert not h.failed(A, "servfail", now=5.0), "one failure after an answer is not two in a row"


def test_the_quiet_window_is_at_most_the_timeout() -> None:
    h = health(timeout=0.3)
    h.answered(A, 0.01, now=0.0)
    h.failed(A, "timeout", now=0.3)
    assert h.failed(A, "timeout", now=0.6)


def test_probes_are_due_after_half_a_second_then_back_off_to_ten_seconds() -> None:
    h = health()
    h.failed(A, "refused", now=100.0)
    assert h.next_probe(100.0) == pytest.approx(PROBE_MIN)
    assert h.due_probes(100.0 + PROBE_MIN - 0.01) == []
    now = 100.0 + PROBE_MIN
    assert h.due_probes(now) == [A]
    assert h.due_probes(now) == [], "one probe out at a time"
    assert h.next_probe(now) is None
    gaps = []
    for _ in range(8):
        h.probe_failed(A, now)
        gap = h.next_probe(now)
        assert gap is not None
        gaps.append(gap)
        now += gap
        assert h.due_probes(now) == [A]
    assert gaps == pytest.approx([1.0, 2.0, 4.0, 8.0, PROBE_MAX, PROBE_MAX, PROBE_MAX, PROBE_MAX])


def test_an_answer_brings_it_back_with_a_fresh_estimate() -> None:
    h = health()
    for _ in range(5):
        h.lost(A, h.attempt_timeout(A), now=0.0)
    assert not h.is_up(A) and h.attempt_timeout(A) == TIMEOUT
    h.due_probes(10.0)
    assert h.answered(A, 0.02, now=10.1) is True
    assert h.is_up(A)
    assert h.attempt_timeout(A) < 0.4, "not the backed-off rto"
    assert h.next_probe(10.1) is None
    assert h.answered(A, 0.02, now=10.2) is False, "already up"
    h.probe_failed(A, now=10.3)  # a probe's late failure after it came back changes nothing
    assert h.is_up(A)


def test_a_reload_keeps_the_state_of_upstreams_that_stay() -> None:
    h = health(A, B)
    h.failed(A, "refused", now=0.0)
    h.answered(B, 0.05, now=0.0)
    srtt = h.states[B].srtt
    h.configure([B, C])
    assert set(h.states) == {B, C}
    assert h.states[B].srtt == srtt
    assert h.is_up(C) and h.attempt_timeout(C) == pytest.approx(0.376)
    # Outcomes of queries sent before the reload, for an upstream gone since: ignored.
    assert h.answered(A, 0.01, now=1.0) is False
    assert h.failed(A, "timeout", now=1.0) is False
    assert h.lost(A, 0.3, now=1.0) is False
    h.probe_failed(A, now=1.0)


# --- plans ---------------------------------------------------------------------------------------


def test_ordered_keeps_the_configured_order() -> None:
    assert health(A, B, C).plan("ordered") == Plan((A, B, C), fanout=1)


def test_fastest_puts_the_lowest_srtt_first_and_the_unmeasured_before_the_measured() -> None:
    h = health(A, B, C, seed=3)
    for _ in range(10):
        h.answered(A, 0.3, now=0.0)
        h.answered(B, 0.02, now=0.0)
    plans = [h.plan("fastest") for _ in range(2000)]
    usual = Plan((C, B, A))  # C never measured: it gets a measurement first
    explored = [plan for plan in plans if plan != usual]
    assert 0.5 * EXPLORE * 2000 < len(explored) < 2 * EXPLORE * 2000
    # Exploring asks the fastest and another one at once: the query waits for neither.
    assert {plan.order[0] for plan in explored} == {C}
    assert {plan.order[1] for plan in explored} == {A, B}
    assert {plan.fanout for plan in explored} == {2}


def test_fastest_and_parallel_put_down_upstreams_last() -> None:
    h = health(A, B, C)
    h.failed(B, "refused", now=0.0)
    for _ in range(200):
        assert h.plan("fastest").order[-1] == B
        plan = h.plan("parallel")
        assert plan.fanout == 2 and set(plan.order[:2]) == {A, C} and plan.order[-1] == B


def test_parallel_picks_two_random_up_upstreams() -> None:
    h = health(A, B, C, seed=5)
    pairs = {frozenset(h.plan("parallel").order[:2]) for _ in range(300)}
    assert pairs == {frozenset(p) for p in ((A, B), (A, C), (B, C))}, "load spread over every pair"


def test_parallel_with_one_up_upstream_asks_one_and_with_none_the_down_ones() -> None:
    h = health(A, B)
    h.failed(A, "refused", now=0.0)
    assert h.plan("parallel") == Plan((B, A), fanout=1)
    h.failed(B, "refused", now=0.0)
    assert h.plan("parallel") == Plan((A, B), fanout=1)
    assert h.plan("ordered") == Plan((A, B)), "every one down: all tried, in order, as a last resort"


def test_the_module_is_pure() -> None:
    source = Path(__file__).resolve().parent.parent / "blockd" / "upstream_health.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "random", "collections", "dataclasses"}, imported
