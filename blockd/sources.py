"""Where a list's entries come from: a domain-list file, an RPZ zone file, or a zone transfer.

Config: [lists.X] path + format ("list" | "rpz", detected from the file's first lines when not
set) + match ("subtree" | "exact", for list files) + invalid_lines ("reject" | "skip": a
third-party list keeps the lines it understood and counts the rest, blockd_list_invalid_lines),
or zone + primaries (+ tsig) for a zone
transferred from primaries (blockd.transfer); the transferred content reaches this module as a
PolicyZone the daemon holds (the last good copy from the state directory at start, then every
applied transfer).
Every source becomes a DomainList: subtree entries (plain lists), exact entries (match = "exact",
RPZ "name"), below-only entries (RPZ "*.name"), and for RPZ its zone, whose rules say each
trigger's action.  Files are read once each (format detection included) through
blockd.bounded_read: only regular files, within [lists.X] max_bytes and max_line_bytes.
Pure: reads files, no sockets, no clock.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

from blockd.bounded_read import FileRefused, ReadLimits, open_text
from blockd.config import ListConfig
from blockd.lists import DomainList, LineError, ListLoadError, file_signature, list_of, parse_list, read_error
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
    shown = str(config.path)
    # One open for the format's detection and the parse: a file replaced in between is never half read.
    try:
        with open_text(config.path, read_limits(config)) as handle:
            signature = file_signature(handle.fileno())
            if previous is not None and _unchanged(config, previous, shown, signature):
                return previous
            head = [line for _, line in zip(range(_HEAD_LINES), handle, strict=False)]
            list_format = config.format or ("rpz" if looks_like_zone_file(head) else "list")
            lines = itertools.chain(head, handle)
            if list_format == "rpz":
                return _parse_zone_file(config, shown, head, lines, signature)
            if config.action == "zone":
                raise ListLoadError([LineError(shown, 0, "action = 'zone' needs an RPZ zone file, and this is a list")])
            parsed = parse_list(lines, shown)
    except (OSError, FileRefused) as exc:
        if config.url is not None and isinstance(exc, FileNotFoundError):
            # A list from a URL with no copy yet (blockd.url_lists): empty until its first download.
            return DomainList(config.name, shown, frozenset())
        raise read_error(shown, exc, "zone file" if config.format == "rpz" else "list") from None
    return list_of(config.name, shown, parsed, signature, config.match, config.invalid_lines == "skip")


def read_limits(config: ListConfig) -> ReadLimits:
    return ReadLimits(max_bytes=config.max_bytes, max_line_bytes=config.max_line_bytes)


def _unchanged(config: ListConfig, previous: DomainList, shown: str, signature: tuple[int, ...]) -> bool:
    """The file is the one `previous` was read from, and the config reads it the same way."""
    if previous.signature != signature or previous.path != shown:
        return False
    if previous.rpz:
        return config.format != "list"
    if previous.invalid_lines and config.invalid_lines != "skip":
        return False  # now strict: the file's invalid lines must refuse it
    # An empty list reads the same either way; otherwise its entries sit where its match put them.
    # (A subtree list may hold exact "|name^" entries too: only one with no subtree entry is ambiguous.)
    same_match = not previous.domains if config.match == "exact" else bool(previous.domains) or not previous.exact
    return config.format != "rpz" and config.action != "zone" and same_match


# The origin of an RPZ file that names none: published feeds leave it to the server's zone
# statement, and a trigger is the same whatever the origin.  A name that is never queried.
IMPLIED_ORIGIN = "rpz.invalid"


def _parse_zone_file(
    config: ListConfig, shown: str, head: list[str], lines: Iterable[str], signature: tuple[int, ...]
) -> DomainList:
    origin = IMPLIED_ORIGIN if _names_no_origin(head) else None
    zone, errors = parse_zone_file(lines, shown, origin)
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
