"""Where a list's entries come from: a domain-list file, an RPZ zone file, or a zone transfer.

Config: [lists.X] path + format ("list" | "rpz", detected from the file's first lines when not
set) + match ("subtree" | "exact", for list files), or zone + primaries (+ tsig) for a zone
transferred from primaries (blockd.transfer); the transferred content reaches this module as a
PolicyZone the daemon holds (the last good copy from the state directory at start, then every
applied transfer).
Every source becomes a DomainList: subtree entries (plain lists), exact entries (match = "exact",
RPZ "name"), below-only entries (RPZ "*.name"), and for RPZ its zone, whose rules say each
trigger's action.  Pure: reads files, no sockets, no clock.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path

from blockd.config import ListConfig
from blockd.lists import DomainList, LineError, ListLoadError, file_signature, load_list
from blockd.rpz import PolicyZone, looks_like_zone_file, parse_zone_file

_HEAD_LINES = 50


def zone_list(name: str, shown: str, zone: PolicyZone | None, signature: tuple[int, ...] | None = None) -> DomainList:
    """The DomainList of an RPZ zone: its triggers, keyed without copying them."""
    if zone is None:  # a transferred zone not received yet: no triggers until the first transfer
        return DomainList(name, shown, frozenset(), signature, rpz=True)
    return DomainList(
        name, shown, frozenset(), signature, exact=zone.exact.keys(), below=zone.below.keys(), zone=zone, rpz=True
    )


def load_source(
    config: ListConfig, previous: DomainList | None = None, transferred: Mapping[str, PolicyZone] | None = None
) -> DomainList:
    """One configured list; raises ListLoadError naming file:line for every problem."""
    if config.zone is not None:
        zone = (transferred or {}).get(config.name)
        if zone is None and previous is not None:
            zone = previous.zone  # a reload keeps the content the last transfer brought
        return zone_list(config.name, f"zone {config.zone}", zone)
    assert config.path is not None  # config.py: a list has a path or a zone
    path = config.path
    list_format = config.format or _detect_format(path)
    if list_format == "rpz":
        return _load_zone_file(config, path, previous)
    if config.action == "zone":
        raise ListLoadError([LineError(str(path), 0, "action = 'zone' needs an RPZ zone file, and this is a list")])
    loaded = load_list(config.name, path, previous=previous if previous is None or not previous.rpz else None)
    if config.match == "exact":
        return DomainList(loaded.name, loaded.path, frozenset(), loaded.signature, exact=loaded.domains)
    return loaded


# The origin of an RPZ file that names none: published feeds leave it to the server's zone
# statement, and a trigger is the same whatever the origin.  A name that is never queried.
IMPLIED_ORIGIN = "rpz.invalid"


def _load_zone_file(config: ListConfig, path: Path, previous: DomainList | None) -> DomainList:
    shown = str(path)
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            signature = file_signature(handle.fileno())
            if previous is not None and previous.signature == signature and previous.path == shown and previous.rpz:
                return previous
            head = [line for _, line in zip(range(_HEAD_LINES), handle, strict=False)]
            origin = IMPLIED_ORIGIN if _names_no_origin(head) else None
            zone, errors = parse_zone_file(itertools.chain(head, handle), shown, origin)
    except OSError as exc:
        raise ListLoadError([LineError(shown, 0, f"cannot read zone file: {exc.strerror or exc}")]) from None
    if errors or zone is None:
        raise ListLoadError(errors or [LineError(shown, 0, "no zone")])
    return zone_list(config.name, shown, zone, signature)


def _names_no_origin(head: list[str]) -> bool:
    """No $ORIGIN, and the first record's owner is relative ("@", or no trailing dot)."""
    for line in head:
        fields = line.split(";", 1)[0].split()
        if not fields or line[0] in " \t":
            continue
        if fields[0].upper() == "$ORIGIN":
            return False
        if fields[0].startswith("$"):
            continue
        return fields[0] == "@" or not fields[0].endswith(".")
    return True


def _detect_format(path: Path) -> str:
    """ "rpz" when the file starts like a zone file ($ORIGIN or an SOA record), else "list"."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            head = [line for _, line in zip(range(_HEAD_LINES), handle, strict=False)]
    except OSError:
        return "list"  # the list loader reports the unreadable file
    return "rpz" if looks_like_zone_file(head) else "list"
