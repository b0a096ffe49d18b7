"""The answer cache: upstream answers stored as wire bytes, served by patching bytes.

Config: [cache] size (entries, default 100,000; 0 turns caching off), min_ttl, max_ttl.
Metrics (read by blockd.metrics): blockd_cache_requests_total, blockd_cache_hits_total,
blockd_cache_evictions_total, blockd_cache_entries.

- Bounded by entry count, least recently used evicted first; expiry is lazy, checked against
  the `now` the caller passes (no timer per entry).
- The key is everything that changes the upstream's answer: name (case-folded), type, class,
  the DO and CD bits, and whether the client used EDNS.  The client's group is not in the key
  because the cache holds upstream answers *before* policy: the policy (question, CNAME chain,
  answer addresses) is applied to every answer, cached or not, with the policy serving at that
  moment.  So a name listed by a reload is blocked on its next query, and one group's view is
  never served to another.
- A hit keeps the client's ID, RD bit and exact question spelling, and every TTL is aged
  (a 300 s record served 10 s later says 290), all by patching bytes: no parse, no pack.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass

from blockd.upstream_answer import AnswerInfo
from blockd.wire import FLAG_AA, FLAG_CD, FLAG_RA, FLAG_RD, Query

CacheKey = tuple[str, int, int, bool, bool, bool]
_TTL = struct.Struct("!I")


def cache_key(query: Query) -> CacheKey:
    return (query.key, query.qtype, query.qclass, query.dnssec_ok, bool(query.flags & FLAG_CD), query.edns)


@dataclass(slots=True)
class CacheEntry:
    answer: bytes
    info: AnswerInfo
    stored: float
    expires: float
    ttl_fields: tuple[tuple[int, int], ...]  # (offset, clamped TTL)


def render(entry: CacheEntry, query: Query, now: float, query_id: int | None = None) -> bytes:
    """The cached answer for this client: its ID, RD bit and question spelling, TTLs aged.

    query_id: the ID to answer with, when query is a remembered query with the same bytes.
    """
    out = bytearray(entry.answer)
    struct.pack_into("!H", out, 0, query.id if query_id is None else query_id)
    # The client's RD; AA cleared and RA set: blockd answers as a recursive service, whatever
    # flags its upstream (an authoritative server, say) answered with.
    out[2] = (out[2] & ~((FLAG_RD | FLAG_AA) >> 8)) | ((query.flags & FLAG_RD) >> 8)
    out[3] |= FLAG_RA
    question = query.question
    out[12 : 12 + len(question)] = question  # same length: the names are equal ignoring case
    age = int(now - entry.stored)
    if age > 0:
        for offset, ttl in entry.ttl_fields:
            _TTL.pack_into(out, offset, ttl - age if ttl > age else 0)
    return bytes(out)


class AnswerCache:
    def __init__(self, size: int = 100_000, min_ttl: int = 0, max_ttl: int = 86400):
        self._entries: OrderedDict[CacheKey, CacheEntry] = OrderedDict()
        self.requests = 0
        self.hits = 0
        self.evictions = 0
        self.size = size
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, size: int) -> None:
        # A reload may shrink the cache (or set 0 to turn it off): trim now, not at the next put,
        # so that entries beyond the new size are never served.
        self._size = size
        self._trim()

    def _trim(self) -> None:
        entries = self._entries
        while len(entries) > max(self._size, 0):
            entries.popitem(last=False)
            self.evictions += 1

    def get(self, key: CacheKey, now: float) -> CacheEntry | None:
        self.requests += 1
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def holds(self, key: CacheKey, entry: CacheEntry) -> bool:
        """Whether entry is what the cache keeps for key (no counting, no recency change)."""
        return self._entries.get(key) is entry

    def hit_if_current(self, key: CacheKey, entry: CacheEntry, now: float) -> bool:
        """get() for a caller that remembers which entry it last got: True (counted as a hit)
        when that entry is still the live one for key."""
        if self._entries.get(key) is not entry or entry.expires <= now:
            return False
        self.requests += 1
        self.hits += 1
        self._entries.move_to_end(key)
        return True

    def entry_for(self, answer: bytes, info: AnswerInfo, now: float) -> CacheEntry:
        """A cache entry for a fresh answer (also used to render it for coalesced waiters)."""
        lifetime = info.lifetime if info.lifetime is not None else 0
        lifetime = min(max(lifetime, self.min_ttl), self.max_ttl)
        fields = tuple((offset, min(max(ttl, self.min_ttl), self.max_ttl)) for offset, ttl in info.ttl_fields)
        if fields != info.ttl_fields:
            patched = bytearray(answer)
            for offset, ttl in fields:
                _TTL.pack_into(patched, offset, ttl)
            answer = bytes(patched)
        return CacheEntry(answer, info, now, now + lifetime, fields)

    def put(self, key: CacheKey, entry: CacheEntry) -> None:
        if self.size <= 0 or entry.info.lifetime is None or entry.expires <= entry.stored:
            return
        entries = self._entries
        entries[key] = entry
        entries.move_to_end(key)
        self._trim()

    def clear(self) -> None:
        self._entries.clear()
