"""Matching query names against many lists at once: subtree, exact and below-only entries.

An entry is one of three kinds:
  subtree  the name and every name below it (the plain list formats: "tiktok.com", "||x^", "*.x")
  exact    the name only (RPZ "name", and lists with match = "exact", e.g. hosts files)
  below    only names strictly below it (RPZ "*.name", stored under "name")
One dict per kind maps every entry to a bitmask of the lists holding it, so a million names
across several lists and groups are stored once.  A lookup probes the query name (exact and
subtree) and then each ancestor (subtree and below): a few dict probes per query, independent
of list size, and the dicts a configuration does not use are never probed.

Which entry wins, as the RPZ specification orders policy zones: the first list in the group's
order that matches at all; within that list the most specific entry (so an exact entry beats a
wildcard above it).  A list's own exceptions ("@@||name^") take the name out of that list only:
the next list in the group's order may still match it.

Wildcards inside a label ("p16-tiktok-*.ibyteimg.com", a subtree entry) are indexed by their
fixed suffix ("ibyteimg.com"): when the walk over a query's ancestors reaches that suffix, the
one label to its left is matched against the compiled patterns under that suffix.  A query
under no such suffix costs one more dict probe per ancestor, and only when a list has one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import NamedTuple

from blockd.lists import DomainList

SUBTREE = "subtree"
EXACT = "exact"
BELOW = "below"


class Match(NamedTuple):  # a tuple: created on every blocked query, so it must be cheap
    list_name: str
    domain: str  # the entry that matched: the listed name (an ancestor of, or equal to, the query name)
    kind: str = SUBTREE  # SUBTREE, EXACT or BELOW

    @property
    def trigger(self) -> str:
        """The entry as written in a zone: "*.name" for a below-only entry."""
        return f"*.{self.domain}" if self.kind == BELOW else self.domain


def _masks(lists: Sequence[DomainList], names_of: str) -> dict[str, int]:
    """name -> bitmask of the lists whose `names_of` attribute holds it."""
    sizes = [len(getattr(lst, names_of)) for lst in lists]
    masks: dict[str, int] = {}
    if not any(sizes):
        return masks
    # Start from the largest list in C-level calls (a million names in ~0.1 s instead of ~0.5 s),
    # in chunks: one call over a million names would hold the GIL (and stall the reactor during
    # a reload) for over 100 ms.  Then merge the others name by name.
    largest = max(range(len(lists)), key=sizes.__getitem__)
    names = iter(getattr(lists[largest], names_of))
    bit = 1 << largest
    while chunk := dict.fromkeys(islice(names, 20_000), bit):
        masks.update(chunk)
    get = masks.get
    for index, lst in enumerate(lists):
        if index == largest:
            continue
        bit = 1 << index
        for domain in getattr(lst, names_of):
            masks[domain] = get(domain, 0) | bit
    return masks


LabelPattern = Callable[[str], object]  # re.Pattern.fullmatch: a match or None


def _wildcards(lists: Sequence[DomainList]) -> dict[str, dict[str, tuple[LabelPattern, int]]]:
    """suffix -> {entry: (its first label's pattern, bitmask of the lists holding it)}."""
    wild: dict[str, dict[str, tuple[LabelPattern, int]]] = {}
    for index, lst in enumerate(lists):
        for entry in lst.wildcards:
            label, _, suffix = entry.partition(".")
            patterns = wild.setdefault(suffix, {})
            if entry in patterns:
                matches, bits = patterns[entry]
                patterns[entry] = (matches, bits | 1 << index)
            else:  # "*" stands for any run of label characters, within this one label
                regex = "[a-z0-9_-]*".join(re.escape(part) for part in label.split("*"))
                patterns[entry] = (re.compile(regex).fullmatch, 1 << index)
    return wild


class DomainIndex:
    """Every list's entries, indexed for lookups by name and ancestors."""

    def __init__(self, lists: Sequence[DomainList]):
        self.list_names: list[str] = [lst.name for lst in lists]
        self.bit_of: dict[str, int] = {lst.name: 1 << index for index, lst in enumerate(lists)}
        self._masks = _masks(lists, "domains")
        self._exact = _masks(lists, "exact")
        self._below = _masks(lists, "below")
        self._wild = _wildcards(lists)
        # Lists with exceptions: index -> the exempt subtrees; their bits, to skip the check otherwise.
        self._exceptions = {index: SuffixSet(set(lst.exceptions)) for index, lst in enumerate(lists) if lst.exceptions}
        self._excepting = sum(1 << index for index in self._exceptions)

    def masks_at(self, key: str) -> tuple[int, int, int]:
        """The lists holding key as a subtree, an exact and a below-only entry (bitmasks)."""
        return self._masks.get(key, 0), self._exact.get(key, 0), self._below.get(key, 0)

    @property
    def wildcard_suffixes(self) -> frozenset[str]:
        """The names under which wildcard-inside-a-label entries are matched."""
        return frozenset(self._wild)

    def mask_for(self, list_names: Iterable[str]) -> int:
        mask = 0
        for name in list_names:
            mask |= self.bit_of[name]
        return mask

    def lookup(self, key: str, mask: int, order: Sequence[int]) -> Match | None:
        """The entry that decides for key among the lists in mask, or None.

        order: the list indices in the group's priority order.
        """
        hits = self._hits(key, mask)
        if not hits:
            return None
        excepting = self._excepting & mask
        if len(hits) == 1 and not excepting:  # the common case: one entry of one list
            name, kind, found = hits[0]
            for index in order:
                if found >> index & 1:
                    return Match(self.list_names[index], name, kind)
            return None
        for index in order:
            if excepting >> index & 1 and self._exceptions[index].contains(key):
                continue  # exempt from this list's entries, not from the next list's
            for name, kind, found in hits:  # most specific first
                if found >> index & 1:
                    return Match(self.list_names[index], name, kind)
        return None

    def _hits(self, key: str, mask: int) -> list[tuple[str, str, int]]:
        """(entry, kind, lists of mask holding it) for key and its ancestors, most specific first."""
        hits = []
        subtree, exact, below, wild = self._masks, self._exact, self._below, self._wild
        if exact:
            found = exact.get(key, 0) & mask
            if found:
                hits.append((key, EXACT, found))
        name = key
        while True:
            found = subtree.get(name, 0) & mask
            if found:
                hits.append((name, SUBTREE, found))
            dot = name.find(".")
            if dot < 0:
                return hits
            if wild:
                patterns = wild.get(name[dot + 1 :])
                if patterns is not None:
                    label = name[:dot]
                    for entry, (matches, lists) in patterns.items():
                        found = lists & mask
                        if found and matches(label) is not None:
                            hits.append((entry, SUBTREE, found))
            name = name[dot + 1 :]
            if below:
                found = below.get(name, 0) & mask
                if found:
                    hits.append((name, BELOW, found))

    def __len__(self) -> int:
        return len(self._masks) + len(self._exact) + len(self._below)


class SuffixSet:
    """A plain set of keys matched by ancestor (for allowlists)."""

    def __init__(self, keys: frozenset[str] | set[str]):
        self._keys = frozenset(keys)

    @property
    def keys(self) -> frozenset[str]:
        return self._keys

    def contains(self, key: str) -> bool:
        if not self._keys:
            return False
        keys = self._keys
        name = key
        while True:
            if name in keys:
                return True
            dot = name.find(".")
            if dot < 0:
                return False
            name = name[dot + 1 :]
