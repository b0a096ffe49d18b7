"""Sampled logging: one line per client per interval for what a flood would write line by line.

Refused queries (clients outside server.allow) and rate-limited ones cost blockd almost nothing
to answer or drop, but a log line each would let a flood fill the disk.  The first one from a
client is logged; the next ones within `interval` are only counted, and the first one after it
is logged with that count ("suppressed": n).  Bounded: at most `max_clients` are tracked
(emptied whole when full; the counts lost that way are few, and the metrics count everything).
Pure: `now` is passed in.
"""

from __future__ import annotations

DEFAULT_INTERVAL = 10.0
DEFAULT_MAX_CLIENTS = 10_000


class Sampler:
    __slots__ = ("_seen", "interval", "max_clients")

    def __init__(self, interval: float = DEFAULT_INTERVAL, max_clients: int = DEFAULT_MAX_CLIENTS):
        self.interval = interval
        self.max_clients = max_clients
        self._seen: dict[str, list[float]] = {}  # client -> [when last logged, suppressed since]

    def sample(self, client: str, now: float) -> int | None:
        """None: only count this one; else log it, with the number suppressed before it."""
        seen = self._seen.get(client)
        if seen is None:
            if len(self._seen) >= self.max_clients:
                self._seen.clear()
            self._seen[client] = [now, 0]
            return 0
        if now - seen[0] < self.interval:
            seen[1] += 1
            return None
        suppressed = int(seen[1])
        seen[0], seen[1] = now, 0
        return suppressed
