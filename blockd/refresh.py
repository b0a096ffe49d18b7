"""When a secondary zone checks its primaries: the SOA refresh/retry/expire schedule (RFC 1034 4.3.5).

Pure: every method takes `now` (seconds, any monotonic origin the caller keeps to) and jitter
as a number in [0, 1) the caller draws, so tests are deterministic.  blockd.transfer runs it on
the reactor.

- start: at once (plus up to 5 s of start jitter), whether or not a last good copy was loaded from disk;
  the copy's age counts towards expiry, so a copy older than its SOA expire is reported as
  expired from the first moment.
- success: next check after `refresh`, up to 10% earlier by jitter (never later, as Knot's
  refresh-jitter), and the expiry clock restarts.
- failure: next check after `retry`, up to 10% later by jitter, but never after the moment the
  copy expires (Unbound puts a timer exactly on expiry, to try once more then).  Before there
  is any copy there are no SOA timers: the wait grows as Knot's bootstrap does (5 s x n^2,
  at most 2 hours).
- NOTIFY: a check at once, unless one is already under way (then one more right after it, as
  the NOTIFY may announce a newer serial than the one being transferred), and at most one check
  per `notify_interval` started by NOTIFYs.
- expired: no successful check for `expire` seconds.  blockd keeps serving the last copy (an
  RPZ is policy; an old policy beats none) but must report it.

Hostile or careless SOA timers are clamped (TimerLimits): refresh to [10 s, 1 day], retry to
[5 s, 1 day], expire to at least the refresh interval (and at most 365 days).  Knot clamps the
same way (refresh-min-interval, retry-min-interval ...) with lower floors of 2 s and 1 s, meant
for test beds; an RPZ primary that asks a thousand secondaries to come every second does not
get them every second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

JITTER_SHARE = 0.1  # of the interval
BOOTSTRAP_STEP = 5.0
BOOTSTRAP_MAX = 7200.0
START_SPREAD = 5.0  # seconds: the first checks of many zones at start-up do not all go at once


@dataclass(frozen=True)
class TimerLimits:
    refresh_min: float = 10.0
    refresh_max: float = 86400.0
    retry_min: float = 5.0
    retry_max: float = 86400.0
    expire_max: float = 365 * 86400.0
    notify_interval: float = 5.0  # at most one NOTIFY-started check per this many seconds


@dataclass(frozen=True)
class Timers:
    """SOA timers after clamping."""

    refresh: float
    retry: float
    expire: float

    @classmethod
    def from_soa(cls, refresh: int, retry: int, expire: int, limits: TimerLimits = TimerLimits()) -> Timers:
        clamped_refresh = min(max(float(refresh), limits.refresh_min), limits.refresh_max)
        clamped_retry = min(max(float(retry), limits.retry_min), limits.retry_max)
        clamped_expire = min(max(float(expire), clamped_refresh), limits.expire_max)
        return cls(clamped_refresh, clamped_retry, clamped_expire)


def bootstrap_wait(failures: int) -> float:
    """The wait after the n-th failure in a row when there is no copy yet (Knot's zone_bootstrap_next)."""
    return min(BOOTSTRAP_STEP * max(failures, 1) ** 2, BOOTSTRAP_MAX)


class RefreshSchedule:
    """The refresh timers of one secondary zone.

    The caller asks next_check(now) when to run, calls begin(now) when it starts a check and
    on_success/on_failure when it ends; on_notify(now) when a primary sends NOTIFY.
    """

    def __init__(self, limits: TimerLimits = TimerLimits()):
        self.limits = limits
        self.timers: Timers | None = None  # of the copy being served, when there is one
        self.last_success: float | None = None  # when the copy was last confirmed current
        self.failures = 0  # in a row
        self.in_progress = False
        self.last_begin: float | None = None
        self._due = math.inf
        self._notified = False  # a NOTIFY came during a check: check again right after it
        self._last_notify_check: float | None = None

    @property
    def has_copy(self) -> bool:
        return self.last_success is not None

    def start(
        self, now: float, copy_age: float | None = None, timers: Timers | None = None, jitter: float = 0.0
    ) -> None:
        """Start the schedule; copy_age and timers describe a last good copy loaded from disk.

        copy_age is how long ago that copy was last confirmed current (its refresh time).
        """
        if copy_age is not None:
            self.last_success = now - max(copy_age, 0.0)
            self.timers = timers
        # With a copy, spread the first checks of many zones; without one the zone blocks
        # nothing until it arrives: fetch it at once.
        self._due = now + (START_SPREAD * _fraction(jitter) if copy_age is not None else 0.0)

    def begin(self, now: float) -> None:
        """A check starts now."""
        self.in_progress = True
        self.last_begin = now
        self._due = math.inf

    def on_success(self, refresh: int, retry: int, expire: int, now: float, jitter: float = 0.0) -> None:
        """A check ended with the zone current (transferred, or up to date), with the SOA's timers."""
        self.timers = Timers.from_soa(refresh, retry, expire, self.limits)
        self.last_success = now
        self.failures = 0
        self._end()
        self._due = now + self.timers.refresh * (1.0 - JITTER_SHARE * _fraction(jitter))
        self._pending_notify(now)

    def on_failure(self, now: float, jitter: float = 0.0) -> None:
        """A check ended with every primary failing."""
        self.failures += 1
        self._end()
        if self.timers is None or self.last_success is None:
            wait = bootstrap_wait(self.failures)
            self._due = now + wait * (1.0 + JITTER_SHARE * _fraction(jitter))
        else:
            due = now + self.timers.retry * (1.0 + JITTER_SHARE * _fraction(jitter))
            expires_at = self.last_success + self.timers.expire
            self._due = min(due, expires_at) if expires_at > now else due
        self._pending_notify(now)

    def on_notify(self, now: float) -> bool:
        """A primary sent NOTIFY: check at once (rate-limited); False when it changed nothing."""
        if self.in_progress:
            self._notified = True
            return True
        due = now
        if self._last_notify_check is not None:
            due = max(due, self._last_notify_check + self.limits.notify_interval)
        if due >= self._due:
            return False  # a check is already due as soon or sooner
        self._due = due
        self._last_notify_check = due
        return True

    def next_check(self, now: float) -> float:
        """When the next check is due (not before now); infinity while one is under way."""
        return max(self._due, now)

    def expired(self, now: float) -> bool:
        """The copy has gone `expire` seconds without a successful check (False with no copy)."""
        if self.last_success is None or self.timers is None:
            return False
        return now - self.last_success >= self.timers.expire

    def _end(self) -> None:
        self.in_progress = False

    def _pending_notify(self, now: float) -> None:
        if self._notified:
            self._notified = False
            self.on_notify(now)


def _fraction(jitter: float) -> float:
    return min(max(jitter, 0.0), 1.0)
