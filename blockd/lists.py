"""Domain list files: parse every supported line format into a set of lookup keys.

Formats (one entry per line, mixable in one file):
  plain           tiktok.com
  hosts file      0.0.0.0 tiktok.com tiktokv.com     (any IP address first; several names allowed)
  adblock         ||tiktok.com^
  wildcard        *.tiktok.com
Lines starting with "#" or "!" are comments, as is " #..." after an entry; "[Adblock Plus 2.0]"
style headers are ignored.  Every entry blocks itself and all its subdomains, so "*.name" and
"name" mean the same.  Every invalid line is reported with file:line (the first MAX_LINE_ERRORS of
them, then how many more), quoting at most 100 characters of it; a list with any error is refused
as a whole.  Files are read through blockd.bounded_read: only regular files, within the list's
max_bytes and max_line_bytes.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from blockd.bounded_read import FileRefused, ReadLimits, open_text
from blockd.excerpt import excerpt
from blockd.names import InvalidNameError, normalize

if TYPE_CHECKING:  # blockd.rpz imports this module (LineError)
    from blockd.rpz import PolicyZone

# Names found in stock hosts files that must never become block entries.
_HOSTS_BOILERPLATE = frozenset(
    {
        "localhost",
        "localhost.localdomain",
        "local",
        "broadcasthost",
        "ip6-localhost",
        "ip6-loopback",
        "ip6-localnet",
        "ip6-mcastprefix",
        "ip6-allnodes",
        "ip6-allrouters",
        "ip6-allhosts",
        "0.0.0.0",
    }
)


@dataclass(frozen=True)
class LineError:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        if self.line <= 0:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"


@dataclass(frozen=True)
class DomainList:
    name: str
    path: str
    domains: AbstractSet[str]  # subtree entries: a set built once and never changed (a frozenset copy costs)
    # (device, inode, size, mtime_ns, ctime_ns) when read: an unchanged file is not parsed again on reload.
    signature: tuple[int, ...] | None = None
    exact: AbstractSet[str] = frozenset()  # entries for the name only (match = "exact", RPZ "name")
    below: AbstractSet[str] = frozenset()  # entries for names strictly below (RPZ "*.name")
    zone: PolicyZone | None = None  # an RPZ list's zone: each trigger's rule (blockd.rpz)
    rpz: bool = False  # an RPZ list (its zone may not have arrived yet)

    def __len__(self) -> int:
        return len(self.domains) + len(self.exact) + len(self.below)

    def ignored_note(self) -> str:
        """RPZ triggers a forwarder cannot apply, counted ("" when none): reported, never an error."""
        if self.zone is None:
            return ""
        counts = [f"{kind} {count}" for kind, count in sorted(self.zone.ignored.items()) if count]
        return f"ignored (not applicable to a forwarder): {', '.join(counts)}" if counts else ""


class ListLoadError(Exception):
    def __init__(self, errors: list[LineError]):
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


def parse_line(text: str) -> list[str]:
    """The keys named by one line (empty for comments/blank lines).  Raises InvalidNameError."""
    line = text.strip()
    if not line or line[0] in "#!":
        return []
    if line.startswith("[") and line.endswith("]"):
        return []
    hash_at = line.find(" #")
    if hash_at < 0:
        hash_at = line.find("\t#")
    if hash_at >= 0:
        line = line[:hash_at].rstrip()
    if line.startswith("@@"):
        raise InvalidNameError("exception rules (@@) are not supported in a block list; use a group's 'allow'")
    if line.startswith("||"):
        body = line[2:]
        if "$" in body:
            raise InvalidNameError(f"adblock modifiers are not supported: {excerpt(line)}")
        if not body.endswith("^"):
            raise InvalidNameError(f"adblock rule must end with '^': {excerpt(line)}")
        return [_entry(body[:-1])]
    fields = line.split()
    if len(fields) > 1:
        try:
            ipaddress.ip_address(fields[0])
        except ValueError:
            raise InvalidNameError(f"expected one domain per line or a hosts-file line, got {excerpt(line)}") from None
        return [_entry(name) for name in fields[1:] if name.lower() not in _HOSTS_BOILERPLATE]
    return [_entry(fields[0])]


def _entry(raw: str) -> str:
    if raw.startswith("*."):
        raw = raw[2:]
    if "*" in raw:
        raise InvalidNameError(f"wildcards are only supported as a leading '*.': {excerpt(raw)}")
    key = normalize(raw)
    if "." not in key:
        raise InvalidNameError(f"refusing to block the whole top-level domain {excerpt(key)}")
    return key


_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
# A bare name: 2+ labels, the last not all digits, at most 253 characters, then the line end.
_PLAIN_NAME = re.compile(rf"(?=[^\r\n]{{1,253}}\r?\n?\Z)(?:{_LABEL}\.)+(?![0-9]+\r?\n?\Z){_LABEL}\r?\n?\Z")


# A file of the wrong format has an error on every line: the report (and its memory) stays bounded.
MAX_LINE_ERRORS = 100


class LineErrors(list[LineError]):
    """A file's errors: the first MAX_LINE_ERRORS kept, the rest counted into one last error."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.more = 0

    def add(self, line: int, message: str) -> None:
        if len(self) < MAX_LINE_ERRORS:
            self.append(LineError(self.path, line, message))
        else:
            self.more += 1

    def done(self) -> list[LineError]:
        """Every error kept, and how many were not (as an error of the file)."""
        more = [LineError(self.path, 0, f"... and {self.more} more errors")] if self.more else []
        return [*self, *more]


def parse_lines(lines: Iterable[str], path: str) -> tuple[set[str], list[LineError]]:
    """Parse lines, collecting every error instead of stopping at the first."""
    domains: set[str] = set()
    errors = LineErrors(path)
    add = domains.add
    plain = _PLAIN_NAME.match
    for number, text in enumerate(lines, start=1):
        # Most lines of a big list are a bare lowercase name: accept those with one regex
        # (the same rules normalize() applies) instead of the general parser.
        if plain(text) is not None:
            add(text.rstrip("\r\n"))
            continue
        bad_byte = undecodable_byte(text)
        if bad_byte is not None:
            errors.add(number, f"not UTF-8 text: invalid byte 0x{bad_byte:02x}")
            continue
        try:
            domains.update(parse_line(text))
        except InvalidNameError as exc:
            errors.add(number, str(exc))
    return domains, errors.done()


def undecodable_byte(text: str) -> int | None:
    """The first byte a surrogateescape-decoded line could not decode, or None."""
    # load_list decodes with surrogateescape so that a bad byte costs its line, not the whole
    # file's error report; each such byte shows up as a lone surrogate U+DC80..U+DCFF.
    if text.isascii():
        return None
    for char in text:
        if 0xDC80 <= ord(char) <= 0xDCFF:
            return ord(char) - 0xDC00
    return None


def file_signature(fd: int) -> tuple[int, ...]:
    """(device, inode, size, mtime_ns, ctime_ns) of the file actually opened: an unchanged file is not
    parsed again on reload, and a rename after the open is seen next time."""
    info = os.fstat(fd)
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def read_error(shown: str, exc: OSError | FileRefused, what: str = "list") -> ListLoadError:
    """The error of a file that could not be read (refused by a bound, or an OSError)."""
    if isinstance(exc, FileRefused):
        if exc.line:
            return ListLoadError([LineError(shown, exc.line, exc.message)])
        return ListLoadError([LineError(shown, 0, f"cannot read {what}: {exc.message}")])
    return ListLoadError([LineError(shown, 0, f"cannot read {what}: {exc.strerror or exc}")])


DEFAULT_LIMITS = ReadLimits()


def load_list(
    name: str,
    path: Path,
    display_path: str | None = None,
    previous: DomainList | None = None,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> DomainList:
    """Read and parse one list file; raises ListLoadError naming file:line for every bad line.

    previous: the same list as last loaded; reused as is when the file has not changed.
    """
    shown = display_path or str(path)
    try:
        with open_text(path, limits) as handle:
            signature = file_signature(handle.fileno())
            if previous is not None and previous.signature == signature and previous.path == shown:
                return DomainList(name, shown, previous.domains, signature)
            domains, errors = parse_lines(handle, shown)
    except (OSError, FileRefused) as exc:
        raise read_error(shown, exc) from None
    if errors:
        raise ListLoadError(errors)
    return DomainList(name=name, path=shown, domains=domains, signature=signature)
