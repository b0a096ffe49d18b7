"""The versions of one published zone: its serial, and a bounded journal of changes for IXFR.

Pure: the caller renders and diffs (blockd.publish_zone) and passes the time.

- The serial changes when the content does, and only then.  A new serial is the Unix time when
  that is later than the old serial (RFC 1982 arithmetic), else the old serial plus one: Knot's
  `serial-policy: unixtime`.  Serials so stay ahead of any earlier run's even when the state
  file is lost, and an operator can read from the serial when the policy last changed.
- The journal keeps the last `depth` changes (Knot's journal-max-depth) and no more records than
  the zone holds: an IXFR larger than the zone is worse than an AXFR (BIND's max-ixfr-ratio of
  100 %), so it answers with the whole zone instead.
- Across restarts the serial survives in a small state file with a digest of the content, so a
  restart with the same policy keeps its serial (secondaries see nothing to transfer), and one
  with a changed policy moves it forward.  The digest is order-independent (zone_digest): set
  iteration order differs between runs.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections import deque
from dataclasses import dataclass

from blockd.publish_wire import Change, wire_serial_newer
from blockd.publish_zone import Record, ZoneContent, difference
from blockd.rpz import PolicyZone, Rule

_MASK = 2**64 - 1


def zone_digest(zone: PolicyZone) -> tuple[int, int]:
    """(digest, policy records) of a zone's content, independent of order.

    The owners under one rule are summed as CRC-32 and Adler-32 (C-level maps over the keys,
    about 0.5 s for 2,000,000 owners, where a hash per encoded record took 5 s), and each sum is
    mixed with a hash of the rule and its table, so moving an owner to another rule shows.
    """
    total = count = 0
    ttl = zone.soa.ttl
    tables = (("exact", zone.exact), ("below", zone.below), ("ip", {o: r for o, r in zone.ip.values()}))
    for label, table in tables:
        by_rule: dict[Rule, list[str]] = {}
        for key, rule in table.items():
            keys = by_rule.get(rule)
            if keys is None:
                keys = by_rule[rule] = []
            keys.append(key)
        for rule, keys in by_rule.items():
            encoded = [key.encode("utf-8", "surrogateescape") for key in keys]
            crc = sum(map(zlib.crc32, encoded))
            adler = sum(map(zlib.adler32, encoded))
            seed = zlib.crc32(repr((label, rule, ttl, len(keys))).encode())
            total += (seed * 0x9E3779B97F4A7C15 + crc * 0xFF51AFD7ED558CCD + adler) & _MASK
            count += len(keys) * (len(rule.records) or 1)
    return total & _MASK, count


def next_serial(old: int, now: int) -> int:
    now &= 0xFFFFFFFF
    return now if wire_serial_newer(now, old) else (old + 1) & 0xFFFFFFFF


@dataclass(frozen=True)
class SavedState:
    """What the state file keeps of a zone across restarts."""

    serial: int
    digest: int

    def to_json(self) -> str:
        return json.dumps({"serial": self.serial, "digest": self.digest})

    @staticmethod
    def from_json(text: str) -> SavedState | None:
        try:
            data = json.loads(text)
            serial, digest = data["serial"], data["digest"]
        except (ValueError, KeyError, TypeError, RecursionError):
            return None
        numbers = all(isinstance(value, int) and not isinstance(value, bool) for value in (serial, digest))
        if not numbers or not 0 <= serial < 2**32:
            return None
        return SavedState(serial, digest)


@dataclass(frozen=True)
class Rendered:
    """A new rendering of a zone, measured against the serving version (off the event loop)."""

    content: ZoneContent
    removed: list[Record]
    added: list[Record]
    digest: int  # of the whole new content
    records: int  # policy records in it


class ZoneVersions:
    """The serving version of one zone and the changes that led to it."""

    def __init__(self, name: str, depth: int):
        self.name = name
        self.depth = depth
        self.zone: PolicyZone | None = None
        self.digest = 0
        self.records = 0  # policy records in the serving version
        self.unpublishable = 0
        self.journal: deque[Change] = deque()

    def measure(self, content: ZoneContent) -> Rendered:
        """Compare a rendering with the serving version (pure; run it in a worker thread while
        nothing installs: it reads the serving version)."""
        digest, count = zone_digest(content.zone)
        if self.zone is None:
            return Rendered(content, [], [], digest, count)
        removed, added = difference(self.zone, content.zone)
        return Rendered(content, removed, added, digest, count)

    def install(self, rendered: Rendered, saved: SavedState | None, now: int) -> Change | None:
        """Serve a measured rendering: the change, or None when nothing changed (the serial
        stays).  The first version keeps the saved serial when its digest matches."""
        self.unpublishable = rendered.content.unpublishable
        if self.zone is None:
            if saved is not None and saved.digest == rendered.digest:
                serial = saved.serial
            else:
                serial = next_serial(saved.serial, now) if saved is not None else now & 0xFFFFFFFF
            self._serve(rendered, serial)
            return None
        if not rendered.removed and not rendered.added:
            return None
        old = self.zone.soa
        self._serve(rendered, next_serial(old.serial, now))
        change = Change(old, self.zone.soa, rendered.removed, rendered.added)
        self.journal.append(change)
        self._trim()
        return change

    def _serve(self, rendered: Rendered, serial: int) -> None:
        zone = rendered.content.zone
        zone.soa = dataclasses.replace(zone.soa, serial=serial)
        self.zone = zone
        self.digest = rendered.digest
        self.records = rendered.records

    def _trim(self) -> None:
        total = sum(change.size for change in self.journal)
        while self.journal and (len(self.journal) > self.depth or total > max(self.records, 1)):
            total -= self.journal.popleft().size

    def changes_since(self, serial: int) -> list[Change] | None:
        """The changes from serial to now, or None when the journal does not start there."""
        for at, change in enumerate(self.journal):
            if change.old.serial == serial:
                return list(self.journal)[at:]
        return None

    def saved(self) -> SavedState | None:
        return SavedState(self.zone.soa.serial, self.digest) if self.zone is not None else None
