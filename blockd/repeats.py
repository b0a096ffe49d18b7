"""Repeated queries: the answer given to the same query bytes, remembered while it holds.

Most queries repeat: the same device asks the same name again and again.  A remembered answer
skips parsing, classification and the policy walk; it is keyed by (group, the query's bytes
after its ID) and valid while the policy snapshot is the same object (a reload or an interface
change replaces it, and the memo empties).
- A blocked answer depends only on those bytes and the group's policy: the memo holds the
  answer's bytes after the ID, and everything counted and logged for it, precomputed.
- A cache hit depends also on the cache entry: the memo holds which entry it was, and the
  caller serves it only while the cache still holds that entry (blockd.cache.hit_if_current).
Bounded: at most `max_entries` and `max_bytes` of keys and answers (emptied whole when full: a
flood of unique queries cannot grow it), and only queries of at most `max_query_bytes` are
remembered, so trailing junk cannot make keys large.  Only fast-path queries from clients that
are not trusted forwarders are remembered (a forwarder's answer depends on its ECS option, which
the key does not read).
Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockd.cache import CacheEntry, CacheKey
from blockd.policy import Group, Policy, Verdict
from blockd.wire import Query

DEFAULT_MAX_ENTRIES = 50_000
DEFAULT_MAX_QUERY_BYTES = 512
DEFAULT_MAX_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True, eq=False)  # identity: each is one memo entry (and a dict key for dnstap)
class BlockedRepeat:
    answer_tail: bytes  # the blocked answer after its two ID bytes
    verdict: Verdict
    name: str  # the query name (egress follow-up lookups want it)
    log_tails: tuple[str, str]  # the query-log line after the client, for UDP and TCP (querylog.line_tail)
    counters: tuple[list[int], list[int]]  # one-slot counters for UDP and TCP (Metrics.repeat_cell)
    query_tail: bytes = b""  # the query after its ID: what the memo keys on (dnstap rebuilds the query)


@dataclass(frozen=True, slots=True)
class CachedRepeat:
    cache_key: CacheKey
    entry: CacheEntry  # the cache entry served last time: valid only while the cache holds it
    query: Query  # the query as first read (its question spelling, EDNS and UDP size)
    verdict: Verdict | None  # a monitor verdict counted with every repeat


Repeat = BlockedRepeat | CachedRepeat


class RepeatMemo:
    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_query_bytes: int = DEFAULT_MAX_QUERY_BYTES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ):
        self.max_entries = max_entries
        self.max_query_bytes = max_query_bytes
        self.max_bytes = max_bytes
        self.bytes = 0  # of keys and remembered blocked answers
        self.clears = 0  # times the memo was emptied because it was full
        self._entries: dict[tuple[Group | None, bytes], Repeat] = {}
        self._policy: Policy | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, policy: Policy, group: Group | None, data: bytes) -> Repeat | None:
        """What was answered to these bytes under this policy, or None."""
        if policy is not self._policy:  # decisions taken under an older snapshot go
            self._entries.clear()
            self.bytes = 0
            self._policy = policy
            return None
        if len(data) > self.max_query_bytes:
            return None
        return self._entries.get((group, data[2:]))

    def remember(self, policy: Policy, group: Group | None, data: bytes, repeat: Repeat) -> None:
        """Keep an answer given under `policy` (ignored when that is no longer the memo's)."""
        if policy is not self._policy or len(data) > self.max_query_bytes:
            return
        size = len(data) + (len(repeat.answer_tail) if isinstance(repeat, BlockedRepeat) else 0)
        if len(self._entries) >= self.max_entries or self.bytes + size > self.max_bytes:
            self._entries.clear()
            self.bytes = 0
            self.clears += 1
        self._entries[(group, data[2:])] = repeat
        self.bytes += size

    def may_remember(self, query: Query, trusted: bool) -> bool:
        return query.memoizable and not trusted
