"""Internal errors on the query path, reported without letting a packet flood the log.

A bug that one crafted packet triggers must not turn into a traceback per packet (a disk-filling
DoS): the query gets SERVFAIL or FORMERR from the server, the error is counted, and the log
gets the traceback once per distinct error (exception type and where it was raised, at most
`max_kinds` of them) and after that one summary line per `interval` with the count.
Pure but for the clock passed in; the caller logs what `report` returns.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

DEFAULT_INTERVAL = 60.0
DEFAULT_MAX_KINDS = 100


@dataclass(frozen=True)
class Report:
    """What to log for one error: the message, and whether to include the traceback."""

    message: str
    with_traceback: bool


def error_kind(exc: BaseException) -> str:
    """The exception's type and the innermost frame it was raised in: one bug, one kind."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    return f"{type(exc).__name__} at {where}"


class ErrorReporter:
    def __init__(self, interval: float = DEFAULT_INTERVAL, max_kinds: int = DEFAULT_MAX_KINDS):
        self.interval = interval
        self.max_kinds = max_kinds
        self._seen: set[str] = set()
        self._suppressed = 0
        self._last_summary: float | None = None

    def report(self, exc: BaseException, client: str, now: float) -> Report | None:
        """What to log for this error now, or None (counted into the next summary)."""
        kind = error_kind(exc)
        if kind not in self._seen and len(self._seen) < self.max_kinds:
            self._seen.add(kind)
            self._last_summary = now if self._last_summary is None else self._last_summary
            return Report(f"query from {client} failed ({kind}): {_short(exc)}", True)
        self._suppressed += 1
        if self._last_summary is not None and now - self._last_summary < self.interval:
            return None
        count, self._suppressed = self._suppressed, 0
        self._last_summary = now
        return Report(
            f"{count} queries failed with errors already reported in the last {self.interval:g} s;"
            f" latest from {client} ({kind}): {_short(exc)}",
            False,
        )


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "…"
