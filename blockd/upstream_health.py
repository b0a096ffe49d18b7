"""Upstream health: what blockd knows of each upstream, and which ones a query goes to.

Modelled on Unbound's infrastructure cache (services/cache/infra.c, util/rtt.c):
  rtt       answer times smoothed as in TCP (Jacobson/Karels: srtt += (rtt - srtt) / 8,
            rttvar += (|rtt - srtt| - rttvar) / 4), rto = srtt + 4 * rttvar, clamped to
            [MIN_RTO, the configured timeout]; the first rto is 376 ms (rttvar 94 ms) as in Unbound
  a loss    an attempt with no answer within its rto: the query also asks the next upstream
            (the first attempt still counts if its answer comes later), and the rto this attempt
            used is doubled (the one it used, not the current one, so a burst of simultaneous
            losses doubles it once, not n times); an answer recomputes the rto from srtt and
            rttvar, undoing the backoff
  failures  consecutive losses, socket errors and SERVFAIL/REFUSED answers; a usable answer
            (any other rcode, also late) ends the run
  down      after MAX_FAILS consecutive failures with no usable answer for QUIET seconds (a slow
            upstream answering late is not dead; a burst of cold names must not take it down),
            or at once on ICMP port unreachable (nothing listens there).  A down upstream is
            skipped by queries (tried only as a last resort, after every up one) and probed in
            the background: the first probe PROBE_MIN after it went down, the interval doubling
            to PROBE_MAX while probes fail.  A usable answer, to a probe or a last-resort query,
            brings it back, its estimate started afresh.

Strategies (`[upstream] strategy`), the upstreams that are up always before those that are down:
  ordered   in the configured order; the next one only when the previous failed or has not
            answered within its rto
  fastest   lowest srtt first (never measured counts as 0, so each gets measured); one query in
            EXPLORE also goes at once to another up upstream, picked at random, so a slower
            one's estimate stays current without that query waiting for it
  parallel  two up upstreams at once, picked at random (Blocky's parallel_best), the first good
            answer wins; the others follow one at a time as above

Pure: no I/O, no clock: every method that needs the time takes `now` (seconds, monotonic).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

STRATEGIES = ("ordered", "fastest", "parallel")
FAILURES = ("timeout", "refused", "error", "servfail")  # what failed() accepts

MIN_RTO = 0.05  # seconds; Unbound's RTT_MIN_TIMEOUT: below this a loopback upstream would "time out" on a busy reactor
INITIAL_RTTVAR = 0.094  # Unbound's: a first rto of 376 ms
MAX_FAILS = 2  # consecutive failures that take an upstream down (CoreDNS's max_fails default)
QUIET = 1.0  # seconds without a usable answer before failures take it down (at most the timeout)
PROBE_MIN = 0.5  # seconds to the first probe of a down upstream (CoreDNS probes every 0.5 s)
PROBE_MAX = 10.0  # ceiling of the probe interval while it stays down
EXPLORE = 0.05  # share of `fastest` queries sent first to another up upstream
PARALLEL = 2  # upstreams asked at once by `parallel`


@dataclass
class UpstreamState:
    srtt: float = 0.0
    rttvar: float = INITIAL_RTTVAR
    rto: float = 4 * INITIAL_RTTVAR
    measured: bool = False  # an answer time has been seen
    failures: int = 0  # consecutive
    last_good: float = float("-inf")  # when it last gave a usable answer
    down: bool = False
    probe_at: float = 0.0  # while down: when the next probe is due (inf while one is out)
    probe_interval: float = PROBE_MIN


@dataclass(frozen=True)
class Plan:
    """The upstreams one query may use, in order, and how many start at once."""

    order: tuple[str, ...]
    fanout: int = 1


@dataclass
class UpstreamHealth:
    """Health of each configured upstream, keyed by its name (str(Endpoint))."""

    names: Sequence[str]
    max_rto: float  # the configured timeout: no attempt waits longer than the whole query may
    rng: random.Random = field(default_factory=random.Random)
    states: dict[str, UpstreamState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.configure(self.names)

    def configure(self, names: Iterable[str]) -> None:
        """A new list of upstreams (a reload): the state of those that stay is kept."""
        self.names = tuple(names)
        self.states = {name: self.states.get(name) or _fresh(self.max_rto) for name in self.names}

    # -- what a query uses ------------------------------------------------------------------

    def plan(self, strategy: str) -> Plan:
        up = [n for n in self.names if not self.states[n].down]
        down = [n for n in self.names if self.states[n].down]
        if strategy == "fastest":
            up = self._fastest_first(up)
            if len(up) > 1 and self.rng.random() < EXPLORE:
                # Measure another one alongside the fastest: its estimate stays current, and
                # this query still gets the fastest answer.
                up.insert(1, up.pop(self.rng.randrange(1, len(up))))
                return Plan(tuple(up + down), 2)
        elif strategy == "parallel":
            pair = self.rng.sample(up, min(PARALLEL, len(up)))
            up = pair + self._fastest_first([n for n in up if n not in pair])
            return Plan(tuple(up + down), max(1, len(pair)))
        return Plan(tuple(up + down))

    def attempt_timeout(self, name: str) -> float:
        """How long to wait for this upstream before also asking the next one."""
        return min(max(self.states[name].rto, MIN_RTO), self.max_rto)

    def is_up(self, name: str) -> bool:
        return not self.states[name].down

    # -- outcomes ---------------------------------------------------------------------------

    def answered(self, name: str, rtt: float, now: float) -> bool:
        """A usable answer after rtt seconds.  True when this brings a down upstream back."""
        state = self.states.get(name)
        if state is None:  # removed by a reload while the query was out
            return False
        was_down = state.down
        if was_down:
            # As Unbound does for a host probed back to life: its old estimate (pushed up by
            # losses) says nothing of how it answers now.
            state.srtt, state.rttvar, state.measured = 0.0, INITIAL_RTTVAR, False
        delta = max(rtt, 0.0) - state.srtt  # a wall clock stepping back must not make it negative
        state.srtt += delta / 8
        state.rttvar += (abs(delta) - state.rttvar) / 4
        state.measured = True
        state.rto = _clamp(state.srtt + 4 * state.rttvar, self.max_rto)
        state.failures = 0
        state.last_good = now
        state.down = False
        state.probe_interval = PROBE_MIN
        return was_down

    def lost(self, name: str, rto_used: float, now: float) -> bool:
        """No answer within the rto_used this attempt waited: back off, count a failure."""
        state = self.states.get(name)
        if state is None:
            return False
        if state.rto <= 2 * rto_used:
            state.rto = _clamp(2 * rto_used, self.max_rto)
        return self.failed(name, "timeout", now)

    def failed(self, name: str, kind: str, now: float) -> bool:
        """A failure of this kind (FAILURES).  True when it takes the upstream down."""
        state = self.states.get(name)
        if state is None or state.down:
            return False  # a down upstream's schedule follows its probes only
        state.failures += 1
        quiet = now - state.last_good >= min(QUIET, self.max_rto)
        if kind == "refused" or (state.failures >= MAX_FAILS and quiet):
            state.down = True
            state.probe_interval = PROBE_MIN
            state.probe_at = now + PROBE_MIN
            return True
        return False

    # -- probing ----------------------------------------------------------------------------

    def due_probes(self, now: float) -> list[str]:
        """Down upstreams whose probe is due; each is marked as being probed (one at a time)."""
        due = [n for n in self.names if self.states[n].down and self.states[n].probe_at <= now]
        for name in due:
            self.states[name].probe_at = float("inf")
        return due

    def probe_failed(self, name: str, now: float) -> None:
        """The probe got no usable answer: the next one after twice the interval."""
        state = self.states.get(name)
        if state is None or not state.down:
            return
        state.probe_interval = min(2 * state.probe_interval, PROBE_MAX)
        state.probe_at = now + state.probe_interval

    def next_probe(self, now: float) -> float | None:
        """Seconds until the next probe is due, None when none is scheduled."""
        times = [s.probe_at for s in self.states.values() if s.down and s.probe_at != float("inf")]
        return max(0.0, min(times) - now) if times else None

    # ---------------------------------------------------------------------------------------

    def _fastest_first(self, names: list[str]) -> list[str]:
        position = {name: index for index, name in enumerate(self.names)}
        return sorted(names, key=lambda n: (self.states[n].srtt if self.states[n].measured else 0.0, position[n]))


def _clamp(rto: float, max_rto: float) -> float:
    return min(max(rto, MIN_RTO), max_rto)


def _fresh(max_rto: float) -> UpstreamState:
    return UpstreamState(rto=_clamp(4 * INITIAL_RTTVAR, max_rto))
