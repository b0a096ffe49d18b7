"""Domain list files: parse every supported line format into a set of lookup keys.

Formats (one entry per line, mixable in one file):
  plain           tiktok.com
  hosts file      0.0.0.0 tiktok.com tiktokv.com     (any IP address first; several names allowed)
  adblock         ||tiktok.com^   ||tiktok.com^$important   |host.tiktok.com^ (the name only)
  exception       @@||api.tiktok.com^                (beats this list's own entries, no other list's)
  wildcard        *.tiktok.com   p16-tiktok-*.ibyteimg.com   (a "*" inside the first label)
  dnsmasq         local=/tiktok.com/   address=/tiktok.com/[addr]   server=/tiktok.com/
Lines starting with "#" or "!" are comments, as is "#..." after an entry (but "##", "#@#", ...
are cosmetic rules, invalid); "[Adblock Plus 2.0]" style headers are ignored.  Every entry blocks
itself and all its subdomains, so "*.name" and "name" mean the same, except "|name^" (AdGuard's
hosts-file semantics: the name only).  Adblock modifiers that do not change a DNS block
($important, $all, $document, $third-party, $popup, ...) are dropped; others ($denyallow,
$client, $dnstype, $dnsrewrite, $ctag, $badfilter, any unknown) make the line invalid, as does
server=/x/ADDRESS (forwarding, not a block).  A wildcard inside a label matches within that one
label, and is looked up only for names under its fixed suffix (blockd.matcher).
Every invalid line is reported with file:line (the first MAX_LINE_ERRORS of them, then how many
more), quoting at most 100 characters of it; a list with any error is refused as a whole, unless
its config says invalid_lines = "skip" (blockd.sources): then the list keeps what it understood
and counts the rest.  Files are read through blockd.bounded_read: only regular files, within the
list's max_bytes and max_line_bytes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
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
    exceptions: AbstractSet[str] = frozenset()  # "@@||name^": the name and below are not this list's
    wildcards: AbstractSet[str] = frozenset()  # subtree entries with a "*" inside their first label
    invalid_lines: int = 0  # lines skipped (invalid_lines = "skip"); exported as blockd_list_invalid_lines
    invalid_sample: tuple[LineError, ...] = ()  # the first few of them, for the log and `blockd check`

    def __len__(self) -> int:
        return len(self.domains) + len(self.exact) + len(self.below) + len(self.wildcards)

    def ignored_note(self) -> str:
        """What was loaded but not applied ("" when nothing): RPZ triggers a forwarder cannot apply,
        counted, and a lenient list's skipped lines, counted with the first few.  Never an error."""
        notes = []
        if self.zone is not None:
            counts = [f"{kind} {count}" for kind, count in sorted(self.zone.ignored.items()) if count]
            if counts:
                notes.append(f"ignored (not applicable to a forwarder): {', '.join(counts)}")
        if self.invalid_lines:
            shown = "; ".join(str(error) for error in self.invalid_sample)
            more = self.invalid_lines - len(self.invalid_sample)
            notes.append(
                f"skipped {self.invalid_lines} invalid lines (invalid_lines = 'skip'): {shown}"
                + (f"; and {more} more" if more > 0 else "")
            )
        return "; ".join(notes)


class ListLoadError(Exception):
    def __init__(self, errors: list[LineError]):
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


# The kinds of entry a line names (blockd.matcher indexes each).
SUBTREE_ENTRY = "subtree"
EXACT_ENTRY = "exact"
EXCEPTION_ENTRY = "exception"
WILDCARD_ENTRY = "wildcard"

# Adblock modifiers that narrow a rule to some browser requests or raise its priority: a DNS
# block of the name is the same with or without them (AdGuard Home applies such rules as well).
_NEUTRAL_MODIFIERS = frozenset(
    {"important", "all", "document", "doc", "popup", "third-party", "3p", "first-party", "1p", "~third-party", "~3p"}
)
# Modifiers that change what a DNS block is: for some clients, types or answers only, or undoing
# another rule.  Applying the rule without them would block what the list's author did not.
_CHANGING_MODIFIERS = frozenset({"denyallow", "client", "dnstype", "dnsrewrite", "ctag", "badfilter", "domain"})
# Element-hiding and scriptlet rules: "example.com##.ad" is not "example.com" with a comment.
_COSMETIC = re.compile(r"#[@$?%]{0,2}#")
_DNSMASQ = re.compile(r"(local|address|server)=/(.*)/([^/]*)\Z")
_WILDCARD_LABEL = re.compile(r"[a-z0-9_*-]{1,63}\Z")
_WILDCARD_ONLY = "wildcards are only supported as a leading '*.' or inside the first label"


def parse_line(text: str) -> list[str]:
    """The keys named by one line (empty for comments/blank lines).  Raises InvalidNameError."""
    return [key for _, key in parse_entries(text)]


def parse_entries(text: str) -> list[tuple[str, str]]:
    """(kind, key) of every entry one line names (empty for comments/blank lines).

    Raises InvalidNameError, naming why the line is not a block this list can apply.
    """
    line = text.strip()
    if not line or line[0] in "#!":
        return []
    if line.startswith("[") and line.endswith("]"):
        return []
    dnsmasq = _DNSMASQ.match(line)
    if dnsmasq is not None:  # before comments: "#" is dnsmasq's "every domain"
        return _dnsmasq(line, *dnsmasq.groups())
    if _COSMETIC.search(line):
        raise InvalidNameError(f"cosmetic (element hiding) rules are not DNS rules: {excerpt(line)}")
    hash_at = line.find("#")
    if hash_at >= 0:
        line = line[:hash_at].rstrip()
    if line.startswith("@@"):
        return _exception(line)
    if line.startswith("||"):
        return _adblock(line[2:], line, SUBTREE_ENTRY)
    if line.startswith("|"):  # anchored at the start of the host: the name itself (AdGuard hosts rules)
        return _adblock(line[1:], line, EXACT_ENTRY)
    fields = line.split()
    if len(fields) > 1:
        try:
            ipaddress.ip_address(fields[0])
        except ValueError:
            raise InvalidNameError(f"expected one domain per line or a hosts-file line, got {excerpt(line)}") from None
        return [_entry(name) for name in fields[1:] if name.lower() not in _HOSTS_BOILERPLATE]
    return [_entry(fields[0])]


def _exception(line: str) -> list[tuple[str, str]]:
    """An "@@||name^" rule: the name and below are exempt from this list's entries."""
    if not line.startswith("@@||"):
        raise InvalidNameError(f"only '@@||name^' exception rules are supported: {excerpt(line)}")
    entries = _adblock(line[4:], line, SUBTREE_ENTRY)
    if any(kind == WILDCARD_ENTRY for kind, _ in entries):
        raise InvalidNameError(f"wildcards are not supported in exception rules: {excerpt(line)}")
    return [(EXCEPTION_ENTRY, key) for _, key in entries]


def _adblock(body: str, line: str, kind: str) -> list[tuple[str, str]]:
    """The entry of an adblock rule's body (after its "||", "|" or "@@||")."""
    rule, dollar, modifiers = body.partition("$")
    if dollar:
        for modifier in modifiers.split(","):
            option = modifier.strip().lower().split("=", 1)[0]
            if option in _NEUTRAL_MODIFIERS:
                continue
            if option in _CHANGING_MODIFIERS:
                raise InvalidNameError(f"adblock modifier ${option} changes the block, not supported: {excerpt(line)}")
            raise InvalidNameError(f"adblock modifier ${option} is not supported: {excerpt(line)}")
    if not rule.endswith("^"):
        raise InvalidNameError(f"adblock rule must end with '^': {excerpt(line)}")
    entry = _entry(rule[:-1])
    if kind == EXACT_ENTRY:
        if entry[0] != SUBTREE_ENTRY or rule.startswith("*."):
            raise InvalidNameError(f"wildcards are not supported in '|name^' rules: {excerpt(line)}")
        return [(EXACT_ENTRY, entry[1])]
    return [entry]


def _dnsmasq(line: str, option: str, names: str, value: str) -> list[tuple[str, str]]:
    """local=/x/, address=/x/[addr], server=/x/: x and its subdomains get no upstream answer."""
    if option == "local" and value:
        raise InvalidNameError(f"local=/name/ takes nothing after the last '/': {excerpt(line)}")
    if option == "server" and value:
        raise InvalidNameError(f"server=/name/ADDRESS forwards the name elsewhere, it is not a block: {excerpt(line)}")
    entries = []
    for name in names.split("/"):
        if name == "#":
            raise InvalidNameError(f"'#' (every domain) is not a list entry: {excerpt(line)}")
        if not name:
            raise InvalidNameError(f"empty domain in {excerpt(line)}")
        entries.append(_entry(name.removeprefix(".")))
    return entries


def _entry(raw: str) -> tuple[str, str]:
    if raw.startswith("*."):
        raw = raw[2:]
    if "*" in raw:
        return WILDCARD_ENTRY, _wildcard(raw)
    key = normalize(raw)
    if "." not in key:
        raise InvalidNameError(f"refusing to block the whole top-level domain {excerpt(key)}")
    return SUBTREE_ENTRY, key


def _wildcard(raw: str) -> str:
    """A "*" inside the first label ("p16-tiktok-*.ibyteimg.com"): indexed by the fixed suffix."""
    label, _, suffix = raw.partition(".")
    if "*" in suffix or label == "*" or not suffix:
        raise InvalidNameError(f"{_WILDCARD_ONLY}: {excerpt(raw)}")
    key = normalize(suffix)
    if "." not in key:  # every name under the TLD would need the pattern tried
        raise InvalidNameError(f"{_WILDCARD_ONLY}, not directly under a top-level domain: {excerpt(raw)}")
    label = label.lower()
    if _WILDCARD_LABEL.match(label) is None:
        raise InvalidNameError(f"invalid character in wildcard label {excerpt(label)}")
    return f"{label}.{key}"


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


@dataclass
class ParsedList:
    """Everything a list file named, by kind, and its invalid lines."""

    domains: set[str] = field(default_factory=set)
    exact: set[str] = field(default_factory=set)
    exceptions: set[str] = field(default_factory=set)
    wildcards: set[str] = field(default_factory=set)
    errors: list[LineError] = field(default_factory=list)  # the first MAX_LINE_ERRORS, then "... more"
    invalid: int = 0  # every invalid line, counted


# How many skipped lines a lenient list's summary quotes.
SAMPLE_LINES = 5


def parse_list(lines: Iterable[str], path: str) -> ParsedList:
    """Parse lines, collecting every error instead of stopping at the first."""
    parsed = ParsedList()
    errors = LineErrors(path)
    add = parsed.domains.add
    adders = {
        SUBTREE_ENTRY: add,
        EXACT_ENTRY: parsed.exact.add,
        EXCEPTION_ENTRY: parsed.exceptions.add,
        WILDCARD_ENTRY: parsed.wildcards.add,
    }
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
            for kind, key in parse_entries(text):
                adders[kind](key)
        except InvalidNameError as exc:
            errors.add(number, str(exc))
    parsed.errors = errors.done()
    parsed.invalid = len(errors) + errors.more
    return parsed


def parse_lines(lines: Iterable[str], path: str) -> tuple[set[str], list[LineError]]:
    """The subtree entries of lines and every error (exceptions, exact and wildcard entries dropped)."""
    parsed = parse_list(lines, path)
    return parsed.domains, parsed.errors


def list_of(
    name: str,
    shown: str,
    parsed: ParsedList,
    signature: tuple[int, ...] | None = None,
    match: str = "subtree",
    skip_invalid: bool = False,
) -> DomainList:
    """The DomainList of a parsed file; raises ListLoadError on any invalid line unless skip_invalid.

    match = "exact" (a hosts file naming single hosts): every plain entry is for the name only.
    """
    if parsed.errors and not skip_invalid:
        raise ListLoadError(parsed.errors)
    domains, exact = parsed.domains, parsed.exact
    if match == "exact":
        domains, exact = set(), exact | domains if exact else domains
    return DomainList(
        name,
        shown,
        domains,
        signature,
        exact=exact,
        exceptions=parsed.exceptions,
        wildcards=parsed.wildcards,
        invalid_lines=parsed.invalid if skip_invalid else 0,
        invalid_sample=tuple(e for e in parsed.errors if e.line > 0)[:SAMPLE_LINES] if skip_invalid else (),
    )


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
                return previous if previous.name == name else dataclasses.replace(previous, name=name)
            parsed = parse_list(handle, shown)
    except (OSError, FileRefused) as exc:
        raise read_error(shown, exc) from None
    return list_of(name, shown, parsed, signature)
