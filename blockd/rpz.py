"""Response Policy Zones (RPZ): the data model, the master-file parser and renderer, and the
record-level add/delete that zone transfers (AXFR/IXFR) apply.

Owns what a policy zone *means* to a forwarder; loading files, transfers and answering are
elsewhere (blockd.sources, blockd.zone_store, blockd.policy, blockd.wire).  Pure: no sockets, no
clock, no files (the caller hands lines in).  No config keys and no metrics of its own.

Semantics (draft-vixie-dnsop-dns-rpz, read as Unbound services/rpz.c and BIND lib/dns/rpz.c do).
A trigger is the owner name with the zone origin removed:
  name                        QNAME trigger, exactly that name       -> PolicyZone.exact["name"]
  *.name                      QNAME trigger, names strictly below it -> PolicyZone.below["name"]
  32.4.3.2.1.rpz-ip           answer address in 1.2.3.4/32           -> PolicyZone.ip[network]
  128.1.zz.db8.2001.rpz-ip    answer address in 2001:db8::1/128 ("zz" is the "::" run)
  ...rpz-client-ip, ...rpz-nsdname, ...rpz-nsip
                              not applicable to a forwarder: counted in PolicyZone.ignored (their
                              records kept aside only to be re-published), never an error
The action is read from the RDATA:
  CNAME .              NXDOMAIN_RULE          CNAME rpz-passthru.  PASSTHRU_RULE
  CNAME *.             NODATA_RULE            CNAME rpz-drop.      DROP_RULE
  CNAME rpz-tcp-only.  TCP_ONLY_RULE          CNAME <the trigger name itself>.  PASSTHRU_RULE (legacy)
  any other CNAME      local-data: one CNAME record (a walled garden); a target "*.garden.example."
                       keeps its "*" label: the answer replaces it with the query name (BIND)
  any other type       local-data, the records of one owner accumulated (several A, TXT, ...)
Other CNAME targets under a "rpz-" top-level label, other "rpz-" trigger labels, a "*" trigger
for every name, DNAME, NS or SOA below the apex, and a CNAME next to other data at one owner are
errors.  DNSSEC records (RRSIG, NSEC, ...; a signed zone) and NS at the apex are skipped.
Identical records at one owner count once (an RRset).  Rules without records (the five
singletons) keep no TTL: records() and the renderer give them the SOA's.

Names become keys as on the query path (blockd.names): case folded, IDNs to A-labels, and the
bytes a key cannot hold verbatim (a "." inside a label, "\\DDD" escapes) escaped by
key_from_wire_labels, so a trigger matches exactly the wire names it names.

Master files: $ORIGIN (absolute or relative), $TTL, ";" comments (not inside quoted strings),
parentheses across lines, a blank owner for the previous one, "@", relative and absolute
owners, an optional TTL (BIND units: 1h30m, 2d, 1w) and class (IN only) in either order, type
names and TYPEnnn, "\\# n hex" generic RDATA.  $INCLUDE and $GENERATE are refused.  Every error
is collected with file:line (the first blockd.lists.MAX_LINE_ERRORS, then a count), quoting at most
100 characters of the file's text; a zone with any error is refused as a whole.

Fast: the shapes a big zone is made of ("name CNAME .", "*.name 300 IN CNAME rpz-drop.", ...)
are recognised by one precompiled regex and stored with a dict setdefault: no tokenizer, no
dnspython, no object per trigger but its key string (the rules are five shared singletons).
Everything else takes the general path, which uses dnspython only for the RDATA of types
other than CNAME and SOA.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeAlias

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from blockd.excerpt import clip, excerpt
from blockd.lists import LineError, LineErrors, undecodable_byte
from blockd.names import key_from_wire_labels

RPZ_ACTIONS = ("nxdomain", "nodata", "passthru", "drop", "tcp-only", "local-data")
LOCAL_DATA = "local-data"

TYPE_NS = 2
TYPE_CNAME = 5
TYPE_SOA = 6
TYPE_DNAME = 39
TYPE_OPT = 41
# DS RRSIG NSEC DNSKEY NSEC3 NSEC3PARAM CDS CDNSKEY ZONEMD: they sign or describe the zone, they
# are not policy (Unbound skips them too).
_SKIPPED_TYPES = frozenset({43, 46, 47, 48, 50, 51, 59, 60, 63})
IGNORED_TRIGGERS = ("rpz-client-ip", "rpz-nsdname", "rpz-nsip")

MAX_TTL = 2**31 - 1  # RFC 2181 8
_MAX_U32 = 2**32 - 1
_MAX_WIRE_NAME = 255

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class LocalRecord:
    rtype: int
    ttl: int
    rdata: bytes  # wire-format RDATA, every name uncompressed (copied as is into any answer)


@dataclass(frozen=True, slots=True)
class Rule:
    action: str  # one of RPZ_ACTIONS
    records: tuple[LocalRecord, ...] = ()  # local-data only

    def __post_init__(self) -> None:
        if self.action not in RPZ_ACTIONS:
            raise ValueError(f"unknown RPZ action {self.action!r}")
        if (self.action == LOCAL_DATA) != bool(self.records):
            raise ValueError("local-data rules, and only they, carry records")


NXDOMAIN_RULE = Rule("nxdomain")
NODATA_RULE = Rule("nodata")
PASSTHRU_RULE = Rule("passthru")
DROP_RULE = Rule("drop")
TCP_ONLY_RULE = Rule("tcp-only")


@dataclass(frozen=True, slots=True)
class Soa:
    ttl: int
    mname: str  # key form
    rname: str  # key form
    serial: int
    refresh: int
    retry: int
    expire: int
    minimum: int


_NO_SOA = Soa(0, "", "", 0, 0, 0, 0, 0)  # while a file is read, until its SOA line


class PolicyZone:
    """One policy zone: its triggers by kind, each with its rule.

    ignored counts the distinct records of the triggers a forwarder does not apply, per label;
    ignored_records keeps those records ((owner relative to the origin, type, RDATA) -> TTL) so
    that records() and the rendered file still carry them.
    """

    __slots__ = ("below", "exact", "ignored", "ignored_records", "ip", "origin", "soa")
    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(
        self,
        origin: str,
        soa: Soa,
        exact: dict[str, Rule] | None = None,
        below: dict[str, Rule] | None = None,
        ip: dict[IPNetwork, tuple[str, Rule]] | None = None,
        ignored: dict[str, int] | None = None,
        ignored_records: dict[tuple[str, int, bytes], int] | None = None,
    ) -> None:
        self.origin = origin  # key form, e.g. "rpz.gov.example"
        self.soa = soa
        self.exact: dict[str, Rule] = {} if exact is None else exact
        self.below: dict[str, Rule] = {} if below is None else below
        self.ip: dict[IPNetwork, tuple[str, Rule]] = {} if ip is None else ip
        self.ignored: dict[str, int] = {} if ignored is None else ignored
        self.ignored_records: dict[tuple[str, int, bytes], int] = {} if ignored_records is None else ignored_records

    def __len__(self) -> int:
        return len(self.exact) + len(self.below) + len(self.ip)

    def copy(self) -> PolicyZone:
        """New dicts, the same Rule objects: change the copy while the original keeps serving."""
        return PolicyZone(
            self.origin,
            self.soa,
            dict(self.exact),
            dict(self.below),
            dict(self.ip),
            dict(self.ignored),
            dict(self.ignored_records),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PolicyZone):
            return NotImplemented
        mine = (self.origin, self.soa, self.exact, self.below, self.ip, self.ignored, self.ignored_records)
        return mine == (
            other.origin,
            other.soa,
            other.exact,
            other.below,
            other.ip,
            other.ignored,
            other.ignored_records,
        )

    def __repr__(self) -> str:
        return f"PolicyZone({self.origin!r}, serial={self.soa.serial}, triggers={len(self)})"


def new_zone(origin: str, soa: Soa) -> PolicyZone:
    """An empty zone (a transfer fills it with add_record)."""
    return PolicyZone(_origin_key(origin), soa)


class _Problem(Exception):
    """What is wrong with one record (the message of a LineError or of add/delete_record)."""


# --- names ------------------------------------------------------------------------------------

# One piece of a presentation-format name: \DDD, \X, a label separator, a run of plain characters,
# or a broken escape (a backslash with fewer than three digits).
_NAME_PIECE = re.compile(r"\\(\d{3})|\\([^0-9])|(\.)|([^.\\]+)|(\\\d{0,2})", re.DOTALL)


def _unescape(text: str) -> tuple[list[bytes], bool]:
    labels: list[bytes] = []
    label = bytearray()
    dot_last = False
    for match in _NAME_PIECE.finditer(text):
        digits, char, dot, run, broken = match.groups()
        dot_last = dot is not None
        if broken is not None:
            raise _Problem(f"bad escape in {excerpt(text)}: use \\DDD (three decimal digits) or \\ and one character")
        if dot_last:
            labels.append(bytes(label))
            label = bytearray()
        elif digits is not None:
            if int(digits) > 255:
                raise _Problem(f"bad escape in {excerpt(text)}: \\{digits} is above 255")
            label.append(int(digits))
        else:
            label += (char or run).encode("ascii")
    if not dot_last:
        labels.append(bytes(label))
    return labels, dot_last


def _split_name(text: str) -> tuple[list[bytes], bool]:
    """(labels, absolute) of a name in a master file; "." alone is the root."""
    if text == ".":
        return [], True
    if "\\" in text:
        if not text.isascii():
            raise _Problem(f"escapes in an internationalised name are not supported: {excerpt(text)}")
        labels, absolute = _unescape(text)
    else:
        absolute = text.endswith(".")
        body = text[:-1] if absolute else text
        try:
            encoded = body.encode("ascii") if body.isascii() else body.lower().encode("idna")
        except UnicodeError as exc:
            raise _Problem(f"invalid internationalised name {excerpt(text)}: {clip(str(exc))}") from None
        labels = encoded.split(b".")
    for label in labels:
        if not label:
            raise _Problem(f"empty label in {excerpt(text)}")
        if len(label) > 63:
            raise _Problem(f"label longer than 63 octets in {excerpt(text)}")
    return labels, absolute


def _check_length(labels: list[bytes], text: str) -> list[bytes]:
    if sum(len(label) + 1 for label in labels) + 1 > _MAX_WIRE_NAME:
        raise _Problem(f"name longer than 255 octets: {excerpt(text)}")
    return labels


def _key_labels(key: str) -> list[bytes]:
    """The labels a key stands for (keys escape unusual bytes as \\DDD)."""
    if not key:
        return []
    if "\\" not in key:
        return [label.encode("ascii") for label in key.split(".")]
    return [re.sub(rb"\\(\d{3})", lambda m: bytes((int(m[1]),)), label.encode("ascii")) for label in key.split(".")]


def _labels_wire(labels: list[bytes]) -> bytes:
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\0"


def _wire_labels(data: bytes, at: int) -> tuple[list[bytes], int]:
    """The labels of the uncompressed name at data[at:] and the offset after it."""
    labels: list[bytes] = []
    while True:
        if at >= len(data):
            raise _Problem("name in RDATA runs past its end")
        length = data[at]
        if length == 0:
            return labels, at + 1
        if length > 63:
            raise _Problem("compressed or malformed name in RDATA (names must be uncompressed)")
        labels.append(data[at + 1 : at + 1 + length])
        at += 1 + length
        if at > len(data):
            raise _Problem("name in RDATA runs past its end")


# Bytes that must be escaped in a rendered name; keys already escape "." "\" and non-printables.
_RENDER_SPECIAL = re.compile(r'[;()"$@]')
_PLAIN_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_*")


def _key_text(key: str) -> str:
    """A key as a master-file name (without the trailing dot)."""
    if _RENDER_SPECIAL.search(key) is None:
        return key
    return _RENDER_SPECIAL.sub(lambda m: f"\\{ord(m[0]):03d}", key)


def _wire_text(wire: bytes) -> str:
    """An uncompressed wire name as an absolute master-file name, case kept."""
    labels, _ = _wire_labels(wire, 0)
    if not labels:
        return "."
    out = []
    for label in labels:
        out.append("".join(chr(b) if b in _PLAIN_BYTES else f"\\{b:03d}" for b in label))
    return ".".join(out) + "."


def _origin_key(text: str) -> str:
    name = text if text.endswith(".") else text + "."
    labels, _ = _split_name(name)
    if not labels:
        raise ValueError("a policy zone cannot be the root zone")
    return key_from_wire_labels(_check_length(labels, text))


def _relative(origin: str, owner: str) -> str:
    """owner (absolute key) with the origin removed; "" for the apex."""
    if owner == origin:
        return ""
    if owner.endswith(origin) and owner[-len(origin) - 1] == ".":
        return owner[: -len(origin) - 1]
    raise _Problem(f"{owner}. is outside the zone {origin}.")


# --- triggers and actions ---------------------------------------------------------------------

_SPECIAL_TARGETS: dict[str, Rule] = {
    "": NXDOMAIN_RULE,
    "*": NODATA_RULE,
    "rpz-passthru": PASSTHRU_RULE,
    "rpz-drop": DROP_RULE,
    "rpz-tcp-only": TCP_ONLY_RULE,
}
_RULE_WIRE: dict[str, bytes] = {rule.action: _labels_wire(_key_labels(key)) for key, rule in _SPECIAL_TARGETS.items()}
_WIRE_SPECIALS: dict[bytes, Rule] = {_RULE_WIRE[rule.action]: rule for rule in _SPECIAL_TARGETS.values()}


def rule_wire(action: str) -> bytes:
    """The CNAME target (wire format) of a policy action without records, e.g. b"\\0" for nxdomain."""
    return _RULE_WIRE[action]
_FAST_TARGETS: dict[str, Rule] = {(key + "." if key else "."): rule for key, rule in _SPECIAL_TARGETS.items()}

_EXACT = "exact"
_BELOW = "below"
_IP = "ip"
_IGNORED = "ignored"


def _trigger(rel: str) -> tuple[str, str | IPNetwork]:
    """(kind, key) of a non-apex owner: exact/below name, ip network, or ignored trigger label."""
    last = rel.rpartition(".")[2]
    if last.startswith("rpz-"):
        if last in IGNORED_TRIGGERS:
            return _IGNORED, last
        if last == "rpz-ip":
            return _IP, _ip_network(rel)
        raise _Problem(f"unknown RPZ trigger {excerpt(last)} in {rel} (known: rpz-ip, {', '.join(IGNORED_TRIGGERS)})")
    if rel == "*":
        raise _Problem("a trigger for every name (*) is not supported")
    if rel.startswith("*."):
        return _BELOW, rel[2:]
    return _EXACT, rel


_DECIMAL = re.compile(r"0|[1-9][0-9]{0,2}")
_HEXTET = re.compile(r"[0-9a-f]{1,4}")


def _ip_network(rel: str) -> IPNetwork:
    labels = rel.split(".")[:-1]
    if len(labels) < 2 or not _DECIMAL.fullmatch(labels[0]):
        raise _Problem(f"bad rpz-ip trigger {rel}: expected <prefix length>.<reversed address>.rpz-ip")
    prefix = int(labels[0])
    address = labels[:0:-1]  # most significant first
    if len(address) == 4 and all(_DECIMAL.fullmatch(part) and int(part) < 256 for part in address):
        value, bits = int.from_bytes(bytes(int(part) for part in address), "big"), 32
    else:
        value, bits = _ipv6_value(address, rel), 128
    if prefix > bits:
        raise _Problem(f"bad rpz-ip trigger {rel}: prefix length {prefix} is longer than {bits}")
    network: IPNetwork
    try:
        if bits == 32:
            network = ipaddress.IPv4Network((value, prefix))
        else:
            network = ipaddress.IPv6Network((value, prefix))
    except ValueError:
        given = ipaddress.IPv4Address(value) if bits == 32 else ipaddress.IPv6Address(value)
        whole = ipaddress.ip_network((given, prefix), strict=False)
        raise _Problem(
            f"bad rpz-ip trigger {rel}: host bits set in {given}/{prefix} (the network is {whole})"
        ) from None
    return network


def _ipv6_value(groups: list[str], rel: str) -> int:
    bad = _Problem(f"bad rpz-ip trigger {rel}: the address is neither 4 decimal bytes nor IPv6 groups (zz for ::)")
    if groups.count("zz") > 1 or not all(part == "zz" or _HEXTET.fullmatch(part) for part in groups):
        raise bad
    if "zz" in groups:
        at = groups.index("zz")
        missing = 8 - (len(groups) - 1)
        if missing < 1:
            raise bad
        groups = groups[:at] + ["0"] * missing + groups[at + 1 :]
    if len(groups) != 8:
        raise bad
    value = 0
    for part in groups:
        value = (value << 16) | int(part, 16)
    return value


def ip_trigger_owner(network: IPNetwork) -> str:
    """The canonical rpz-ip owner (relative to the origin) of a network, e.g. "24.0.2.0.192.rpz-ip"."""
    if network.version == 4:
        parts = str(network.network_address).split(".")
    else:
        parts = [format(int(group, 16), "x") for group in network.network_address.exploded.split(":")]
        # "zz" stands for the longest run of two or more zero groups, the first of equals (RFC 5952).
        best_at, best_length, at = 0, 1, 0
        while at < 8:
            length = 0
            while at + length < 8 and parts[at + length] == "0":
                length += 1
            if length > best_length:
                best_at, best_length = at, length
            at += max(length, 1)
        if best_length > 1:
            parts[best_at : best_at + best_length] = ["zz"]
    return ".".join([str(network.prefixlen), *reversed(parts), "rpz-ip"])


def _cname_rule(target: str, rel: str, kind: str) -> Rule | None:
    """The policy a CNAME target names, or None for a plain CNAME (local data)."""
    special = _SPECIAL_TARGETS.get(target)
    if special is not None:
        return special
    if not target.startswith("*") and (target == rel or (kind == _IP and target == rel[: -len(".rpz-ip")])):
        return PASSTHRU_RULE  # the legacy PASSTHRU: a CNAME to the trigger name itself
    if target.rpartition(".")[2].startswith("rpz-"):
        raise _Problem(f"CNAME {target}. is not an RPZ action (names under rpz-* are reserved)")
    return None


def _check_type(rtype: int, rel: str) -> None:
    """Refuse what cannot be policy data at a (non-apex) trigger."""
    if rtype == TYPE_SOA:
        raise _Problem(f"SOA record at {rel}: the only SOA belongs at the zone origin")
    if rtype == TYPE_NS:
        raise _Problem(f"NS record at {rel}: delegations are not supported in a policy zone")
    if rtype == TYPE_DNAME:
        raise _Problem(f"DNAME record at {rel}: DNAME is not an RPZ action")
    if rtype in (0, TYPE_OPT) or 128 <= rtype <= 255:
        raise _Problem(f"{_type_text(rtype)} at {rel} is a meta type, not data")


def _type_text(rtype: int) -> str:
    return dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rtype))


def _is_cname(rule: Rule) -> bool:
    return rule.action != LOCAL_DATA or rule.records[0].rtype == TYPE_CNAME


def _same_record(a: LocalRecord, b: LocalRecord) -> bool:
    if a.rtype != b.rtype:
        return False
    # A name's length bytes are below 64, so lower() folds only the letters of a CNAME target.
    return a.rdata == b.rdata or (a.rtype == TYPE_CNAME and a.rdata.lower() == b.rdata.lower())


def _merge(old: Rule | None, new: Rule, owner: str) -> Rule:
    """The rule of an owner after one more record (new: a singleton or one local record)."""
    if old is None:
        return new
    if _is_cname(old) or _is_cname(new):
        if old == new or (old.action == new.action == LOCAL_DATA and _same_record(old.records[0], new.records[0])):
            return old  # the same record again: one RRset
        if _is_cname(old) and _is_cname(new):
            raise _Problem(f"more than one CNAME at {owner}")
        raise _Problem(f"CNAME and other data at {owner}")
    record = new.records[0]
    if any(_same_record(record, have) for have in old.records):
        return old
    return Rule(LOCAL_DATA, (*old.records, record))


def _without(old: Rule | None, gone: Rule, owner: str, rtype: int) -> Rule | None:
    """The rule of an owner after deleting one record; None when nothing is left."""
    missing = _Problem(f"cannot delete: no such {_type_text(rtype)} record at {owner}")
    if old is None:
        raise missing
    if old.action != LOCAL_DATA or gone.action != LOCAL_DATA:
        if old == gone:
            return None
        raise missing
    keep = tuple(have for have in old.records if not _same_record(have, gone.records[0]))
    if len(keep) == len(old.records):
        raise missing
    return Rule(LOCAL_DATA, keep) if keep else None


def _store(zone: PolicyZone, kind: str, key: str | IPNetwork, rel: str, rule: Rule) -> None:
    if isinstance(key, str):
        table = zone.exact if kind == _EXACT else zone.below
        table[key] = _merge(table.get(key), rule, rel)
        return
    old = zone.ip.get(key)
    if old is None:
        zone.ip[key] = (rel, rule)
    else:
        zone.ip[key] = (old[0], _merge(old[1], rule, rel))  # another spelling of the same network shares it


def _remove(zone: PolicyZone, kind: str, key: str | IPNetwork, rel: str, rtype: int, rule: Rule) -> None:
    if isinstance(key, str):
        table = zone.exact if kind == _EXACT else zone.below
        left = _without(table.get(key), rule, rel, rtype)
        if left is None:
            del table[key]
        else:
            table[key] = left
        return
    old = zone.ip.get(key)
    left = _without(old[1] if old else None, rule, rel, rtype)
    if left is None:
        del zone.ip[key]
    elif old is not None:
        zone.ip[key] = (old[0], left)


_Place: TypeAlias = tuple[str, str | IPNetwork]


def _place(zone: PolicyZone, rel: str, rtype: int) -> _Place | None:
    """(kind, key) of where a non-SOA record goes, or None when it is skipped."""
    if rtype in _SKIPPED_TYPES:
        return None
    if not rel:
        if rtype == TYPE_NS:
            return None
        raise _Problem(f"{_type_text(rtype)} record at the zone apex {zone.origin}.: only SOA and NS belong there")
    kind, key = _trigger(rel)
    if kind != _IGNORED:
        _check_type(rtype, rel)
    return kind, key


_SharedRules: TypeAlias = dict[tuple[int, int, bytes], Rule]


def _apply(
    zone: PolicyZone,
    place: _Place,
    rel: str,
    rtype: int,
    ttl: int,
    rdata: bytes,
    target: str | None,
    shared: _SharedRules | None = None,
) -> None:
    """Add one record at its place; target: the key of a CNAME's target.

    shared: single-record rules met so far, so that owners with the same one record (a zone of
    "name A 0.0.0.0" lines) share one Rule instead of a Rule, a tuple and a LocalRecord each.
    """
    kind, key = place
    if not isinstance(key, str) or kind != _IGNORED:
        rule = _record_rule(kind, rel, rtype, ttl, rdata, target)
        if shared is not None and rule.action == LOCAL_DATA:
            if len(shared) >= 65536:  # a memo for repeats, not an index of every record
                shared.clear()
            rule = shared.setdefault((rtype, ttl, rdata), rule)
        _store(zone, kind, key, rel, rule)
        return
    record = (rel, rtype, rdata)
    if record not in zone.ignored_records:  # the same record again is one RRset member, counted once
        zone.ignored_records[record] = ttl
        zone.ignored[key] = zone.ignored.get(key, 0) + 1


def _unapply(zone: PolicyZone, place: _Place, rel: str, rtype: int, rdata: bytes, target: str | None) -> None:
    """Delete one record from its place; the trigger goes with its last record."""
    kind, key = place
    if not isinstance(key, str) or kind != _IGNORED:
        _remove(zone, kind, key, rel, rtype, _record_rule(kind, rel, rtype, 0, rdata, target))
        return
    if zone.ignored_records.pop((rel, rtype, rdata), None) is None:
        raise _Problem(f"cannot delete: no such {_type_text(rtype)} record at {rel}")
    left = zone.ignored[key] - 1
    if left:
        zone.ignored[key] = left
    else:
        del zone.ignored[key]


def _record_rule(kind: str, rel: str, rtype: int, ttl: int, rdata: bytes, target: str | None) -> Rule:
    """The rule one record stands for; target: the key of a CNAME's target."""
    if target is not None:
        special = _cname_rule(target, rel, kind)
        if special is not None:
            return special
    return Rule(LOCAL_DATA, (LocalRecord(rtype, ttl, rdata),))


# --- records from the wire (zone transfers) ---------------------------------------------------


def _wire_target(rdata: bytes) -> str:
    labels, end = _wire_labels(rdata, 0)
    if end != len(rdata):
        raise _Problem("CNAME RDATA longer than its name")
    return key_from_wire_labels(labels)


def _check_wire_rdata(rtype: int, rdata: bytes) -> None:
    try:
        dns.rdata.from_wire(dns.rdataclass.IN, dns.rdatatype.RdataType.make(rtype), rdata, 0, len(rdata))
    except (dns.exception.DNSException, ValueError, IndexError, UnicodeError, struct.error) as exc:
        raise _Problem(f"bad {_type_text(rtype)} RDATA: {clip(str(exc))}") from None


def _soa_from_wire(ttl: int, rdata: bytes) -> Soa:
    mname, at = _wire_labels(rdata, 0)
    rname, at = _wire_labels(rdata, at)
    if len(rdata) - at != 20:
        raise _Problem("SOA RDATA has the wrong length")
    serial, refresh, retry, expire, minimum = struct.unpack_from("!IIIII", rdata, at)
    return Soa(ttl, key_from_wire_labels(mname), key_from_wire_labels(rname), serial, refresh, retry, expire, minimum)


def soa_wire(soa: Soa) -> bytes:
    return (
        _labels_wire(_key_labels(soa.mname))
        + _labels_wire(_key_labels(soa.rname))
        + struct.pack("!IIIII", soa.serial, soa.refresh, soa.retry, soa.expire, soa.minimum)
    )


def _fast_add(zone: PolicyZone, owner: str, rule: Rule) -> bool:
    """A policy CNAME at a plain name, the bulk of a transfer: True when stored."""
    cut = len(owner) - len(zone.origin) - 1
    rel = owner[:cut]
    if cut <= 0 or owner[cut] != "." or not owner.endswith(zone.origin) or "rpz-" in rel or rel == "*":
        return False
    table, key = (zone.below, rel[2:]) if rel.startswith("*.") else (zone.exact, rel)
    return table.setdefault(key, rule) == rule


def add_record(zone: PolicyZone, owner: str, rtype: int, ttl: int, rdata: bytes) -> str | None:
    """Apply one RR of an AXFR/IXFR to zone; an error message, or None.

    owner: the absolute name in key form.  rdata: its RDATA with every name uncompressed.  The
    SOA at the apex replaces zone.soa; NS at the apex and DNSSEC records are skipped.
    """
    special = _WIRE_SPECIALS.get(rdata) if rtype == TYPE_CNAME else None
    if special is not None and _fast_add(zone, owner, special):
        return None
    try:
        rel = _relative(zone.origin, owner)
        if not rel and rtype == TYPE_SOA:
            zone.soa = _soa_from_wire(ttl, rdata)
            return None
        place = _place(zone, rel, rtype)
        if place is None:
            return None
        target = _wire_target(rdata) if rtype == TYPE_CNAME else None
        if target is None:
            _check_wire_rdata(rtype, rdata)
        _apply(zone, place, rel, rtype, ttl, rdata, target)
    except _Problem as exc:
        return str(exc)
    return None


def delete_record(zone: PolicyZone, owner: str, rtype: int, rdata: bytes) -> str | None:
    """Apply one IXFR deletion; an error message (the record is not in the zone), or None.

    Deleting the last record of a trigger removes the trigger.  The apex SOA and NS, and DNSSEC
    records, are skipped (the IXFR's new SOA is added after its deletions).
    """
    try:
        rel = _relative(zone.origin, owner)
        if not rel and rtype == TYPE_SOA:
            return None
        place = _place(zone, rel, rtype)
        if place is None:
            return None
        _unapply(zone, place, rel, rtype, rdata, _wire_target(rdata) if rtype == TYPE_CNAME else None)
    except _Problem as exc:
        return str(exc)
    return None


def records(zone: PolicyZone) -> Iterator[tuple[str, int, int, bytes]]:
    """(absolute owner key, rtype, ttl, rdata) of every RR, the SOA first.

    Rules without records are their policy CNAME with the SOA's TTL; the records of ignored
    triggers come last.
    """
    origin = zone.origin
    ttl = zone.soa.ttl
    yield origin, TYPE_SOA, ttl, soa_wire(zone.soa)
    rule_wire = _RULE_WIRE
    for prefix, table in (("", zone.exact), ("*.", zone.below)):
        for key, rule in table.items():
            owner = f"{prefix}{key}.{origin}"
            if rule.action != LOCAL_DATA:
                yield owner, TYPE_CNAME, ttl, rule_wire[rule.action]
            else:
                for record in rule.records:
                    yield owner, record.rtype, record.ttl, record.rdata
    for rel, rule in zone.ip.values():
        owner = f"{rel}.{origin}"
        if rule.action != LOCAL_DATA:
            yield owner, TYPE_CNAME, ttl, rule_wire[rule.action]
        else:
            for record in rule.records:
                yield owner, record.rtype, record.ttl, record.rdata
    for (rel, rtype, rdata), record_ttl in zone.ignored_records.items():
        yield f"{rel}.{origin}", rtype, record_ttl, rdata


# --- rendering --------------------------------------------------------------------------------

_CNAME_TEXT = {wire: _wire_text(wire) for wire in _WIRE_SPECIALS}


def _rdata_text(rtype: int, rdata: bytes) -> str:
    if rtype == TYPE_CNAME:
        return _CNAME_TEXT.get(rdata) or _wire_text(rdata)
    parsed = dns.rdata.from_wire(dns.rdataclass.IN, dns.rdatatype.RdataType.make(rtype), rdata, 0, len(rdata))
    return parsed.to_text()


def _absolute_text(key: str) -> str:
    return _key_text(key) + "." if key else "."


def render_zone_file(zone: PolicyZone) -> str:
    """The zone as a master file that parse_zone_file reads back as an equal zone.

    Owners are relative to the origin, every record has its TTL and every name in RDATA is
    absolute.
    """
    origin = zone.origin
    soa = zone.soa
    out = [
        f"$ORIGIN {_absolute_text(origin)}\n",
        f"@ {soa.ttl} IN SOA {_absolute_text(soa.mname)} {_absolute_text(soa.rname)} "
        f"{soa.serial} {soa.refresh} {soa.retry} {soa.expire} {soa.minimum}\n",
    ]
    cut = len(origin) + 1
    types = {TYPE_CNAME: "CNAME"}
    for owner, rtype, ttl, rdata in records(zone):
        if rtype == TYPE_SOA:
            continue
        type_text = types.get(rtype) or types.setdefault(rtype, _type_text(rtype))
        out.append(f"{_key_text(owner[:-cut])} {ttl} IN {type_text} {_rdata_text(rtype, rdata)}\n")
    return "".join(out)


# --- master files -----------------------------------------------------------------------------

# The lines a big policy zone is made of: a plain owner (relative, or absolute with a trailing
# dot), an optional TTL and class in either order, CNAME, and one of the five policy targets.
# Case-sensitive with explicit classes and possessive runs: a third faster than IGNORECASE.  Mixed
# case keywords and upper-case targets are rare and take the general path; so do labels longer
# than 63 octets, which the fast path checks for only in names longer than that.
_FAST_LINE = re.compile(
    r"(\*\.)?([A-Za-z0-9_-]++(?:\.[A-Za-z0-9_-]++)*+)(\.)?[ \t]++"
    r"(?:([0-9]{1,9})[ \t]++(?:IN[ \t]++|in[ \t]++)?|(?:IN|in)[ \t]++(?:([0-9]{1,9})[ \t]++)?)?"
    r"(?:CNAME|cname)[ \t]++(\.|\*\.|rpz-passthru\.|rpz-drop\.|rpz-tcp-only\.)[ \t]*+(?:;[^\r\n]*+)?\r?\n?\Z"
)
# A token (quoted strings and escapes kept as written, for dnspython), a parenthesis, a comment,
# or a stray character (an unterminated quote, a lone backslash at the end of the line).
_TOKEN = re.compile(r'((?:"(?:[^"\\]|\\.)*"|[^\s"();\\]|\\.)+)|([()])|(;)|(\S)', re.DOTALL)
_TTL_TEXT = re.compile(r"(?:[0-9]+[wdhms])+[0-9]*|[0-9]+", re.IGNORECASE)
_TTL_PART = re.compile(r"([0-9]+)([wdhms]?)", re.IGNORECASE)
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_OTHER_CLASS = re.compile(r"CH|CS|HS|NONE|ANY|CLASS[0-9]+", re.IGNORECASE)
_COMMON_TYPES = {"CNAME": TYPE_CNAME, "A": 1, "AAAA": 28, "TXT": 16, "SOA": TYPE_SOA, "NS": TYPE_NS}


def _line_tokens(line: str, depth: int) -> tuple[list[str], int]:
    """The tokens of one physical line and the parenthesis depth after it."""
    if '"' not in line and "\\" not in line and "(" not in line and ")" not in line:
        return line.split(";", 1)[0].split(), depth
    tokens: list[str] = []
    for match in _TOKEN.finditer(line):
        token, paren, comment, stray = match.groups()
        if token is not None:
            tokens.append(token)
        elif paren is not None:
            depth += 1 if paren == "(" else -1
            if depth < 0:
                raise _Problem("')' without '('")
        elif comment is not None:
            break
        else:
            raise _Problem("unterminated quoted string" if stray == '"' else f"unexpected {excerpt(stray)}")
    return tokens, depth


def _ttl_value(token: str, what: str = "TTL") -> int:
    if not _TTL_TEXT.fullmatch(token):
        raise _Problem(f"bad {what} {excerpt(token)}: a number of seconds, or with units like 1h30m, 2d, 1w")
    if token.isdigit():
        value = int(token)
    else:
        value = sum(int(number) * _TTL_UNITS[unit.lower()] for number, unit in _TTL_PART.findall(token))
    if value > MAX_TTL:
        raise _Problem(f"{what} {clip(token)} is above {MAX_TTL}")
    return value


def _type_value(token: str) -> int:
    common = _COMMON_TYPES.get(token.upper())
    if common is not None:
        return common
    try:
        return int(dns.rdatatype.from_text(token))
    except (dns.exception.DNSException, ValueError):
        raise _Problem(f"unknown record type {excerpt(token)}") from None


def _fields(tokens: list[str]) -> tuple[int | None, int, list[str]]:
    """(TTL or None, type, RDATA tokens) of a record after its owner."""
    ttl: int | None = None
    seen_class = False
    at = 0
    while at < min(len(tokens), 2):
        token = tokens[at]
        if ttl is None and _TTL_TEXT.fullmatch(token):
            ttl = _ttl_value(token)
        elif not seen_class and (token.upper() in ("IN", "CLASS1") or _OTHER_CLASS.fullmatch(token)):
            if token.upper() not in ("IN", "CLASS1"):
                raise _Problem(f"class {clip(token)} is not supported: a policy zone is class IN")
            seen_class = True
        else:
            break
        at += 1
    if at >= len(tokens):
        raise _Problem("record without a type")
    return ttl, _type_value(tokens[at]), tokens[at + 1 :]


class _ZoneParser:
    """The state of reading one master file: origin, default TTL, previous owner, open parentheses."""

    def __init__(self, path: str, origin: str | None) -> None:
        self.path = path
        self.errors = LineErrors(path)  # the first MAX_LINE_ERRORS, then a count
        self.zone: PolicyZone | None = None
        self.origin_key: str | None = None  # the current $ORIGIN
        self.origin_labels: list[bytes] | None = None
        self.dns_origin: dns.name.Name | None = None
        self.default_ttl: int | None = None  # $TTL
        self.last_ttl: int | None = None  # the previous record's, used without $TTL
        self.last_owner: str | None = None  # absolute key
        self.soa_line = 0
        self.pending: list[str] | None = None  # tokens of a record whose parentheses are still open
        self.pending_line = 0
        self.pending_blank = False
        self.depth = 0
        # dnspython costs tens of microseconds a record: the same RDATA text (a sinkhole zone's
        # "A 0.0.0.0") is parsed once, and single-record rules are shared.
        self.rdata_memo: dict[tuple[int, str, str | None], bytes] = {}
        self.shared_rules: _SharedRules = {}
        if origin is not None:
            key = _origin_key(origin)
            self.zone = PolicyZone(key, _NO_SOA)
            self._set_origin(key)

    # The fast path reads these (see parse): (usable, suffix, absolute suffix, limit, exact, below).
    def fast_state(self) -> tuple[bool, str, str, int, dict[str, Rule], dict[str, Rule]]:
        zone = self.zone
        if zone is None or self.origin_key is None or self.pending is not None:
            return False, "", "", 0, {}, {}
        try:
            rel = _relative(zone.origin, self.origin_key)
        except _Problem:
            return False, "", "", 0, {}, {}
        has_ttl = self.default_ttl is not None or self.last_ttl is not None
        usable = has_ttl and "rpz-" not in rel and not rel.startswith("*") and "\\" not in rel
        # Keys up to this length are certainly within 255 octets on the wire, "*." included.
        limit = 250 - len(zone.origin)
        return usable, "." + rel if rel else "", "." + zone.origin, limit, zone.exact, zone.below

    def catch_up(self, fast_line: re.Match[str] | None, fast_ttl: str | None) -> None:
        """Take over what the fast path saw since the last general line: the owner, the TTL."""
        if fast_ttl is not None:
            self.last_ttl = int(fast_ttl)
        if fast_line is not None:
            star, name, absolute = fast_line.group(1, 2, 3)
            key = name.lower() if absolute else f"{name.lower()}.{self.origin_key}"
            self.last_owner = "*." + key if star else key

    def line(self, number: int, text: str) -> None:
        try:
            bad = undecodable_byte(text)
            if bad is not None:
                raise _Problem(f"not UTF-8 text: invalid byte 0x{bad:02x}")
            line = text.rstrip("\r\n")
            if number == 1:
                line = line.removeprefix("\ufeff")
            tokens, self.depth = _line_tokens(line, self.depth)
        except _Problem as exc:
            self.errors.add(number, str(exc))
            self.pending, self.depth = None, 0
            return
        if self.pending is None:
            self.pending_line, self.pending_blank = number, line[:1] in (" ", "\t")
            self.pending = tokens
        else:
            self.pending.extend(tokens)
        if self.depth == 0:
            tokens, self.pending = self.pending, None
            self.logical(self.pending_line, tokens, self.pending_blank)

    def finish(self) -> tuple[PolicyZone | None, list[LineError]]:
        if self.pending is not None:
            self.errors.add(self.pending_line, "'(' not closed by the end of the file")
        if self.zone is None or not self.soa_line:
            self.errors.add(0, "no SOA record: a zone needs exactly one SOA at its origin")
        if self.errors:
            return None, self.errors.done()
        return self.zone, []

    def logical(self, number: int, tokens: list[str], blank: bool) -> None:
        if not tokens:
            return
        try:
            if not blank and tokens[0].startswith("$"):
                self.directive(tokens)
            else:
                self.record(number, tokens, blank)
        except _Problem as exc:
            self.errors.add(number, str(exc))

    def directive(self, tokens: list[str]) -> None:
        name = tokens[0].upper()
        if name == "$INCLUDE":
            raise _Problem("$INCLUDE is not supported: put the records in this file")
        if name == "$GENERATE":
            raise _Problem("$GENERATE is not supported: write the records out in this file")
        if name not in ("$ORIGIN", "$TTL"):
            raise _Problem(f"unknown directive {clip(tokens[0])}")
        if len(tokens) != 2:
            raise _Problem(f"{name} takes one value")
        if name == "$TTL":
            self.default_ttl = _ttl_value(tokens[1])
            return
        labels = self.resolve(tokens[1])
        if not labels:
            raise _Problem("$ORIGIN cannot be the root")
        self._set_origin(key_from_wire_labels(labels), labels)

    def _set_origin(self, key: str, labels: list[bytes] | None = None) -> None:
        self.origin_key = key
        self.origin_labels = labels if labels is not None else _key_labels(key)
        self.dns_origin = None

    def resolve(self, text: str) -> list[bytes]:
        """The absolute labels of a name in the file ("@", relative or absolute)."""
        labels: list[bytes]
        if text == "@":
            labels, absolute = [], False
        else:
            labels, absolute = _split_name(text)
        if not absolute:
            if self.origin_labels is None:
                raise _Problem(
                    f"relative name {excerpt(text)} and no $ORIGIN (write it with a trailing dot, or set $ORIGIN)"
                )
            labels = labels + self.origin_labels
        return _check_length(labels, text)

    def record(self, number: int, tokens: list[str], blank: bool) -> None:
        if blank:
            if self.last_owner is None:
                raise _Problem("the first record has no owner name (the line starts with a blank)")
            owner, rest = self.last_owner, tokens
        else:
            owner, rest = key_from_wire_labels(self.resolve(tokens[0])), tokens[1:]
            self.last_owner = owner
        ttl, rtype, rdata = _fields(rest)
        zone = self.zone
        if zone is None:
            if rtype != TYPE_SOA:
                raise _Problem("the first record must be the zone's SOA (or the zone's origin must be given)")
            zone = self.zone = PolicyZone(owner, _NO_SOA)
            if self.origin_key is None:
                self._set_origin(owner)  # relative names below the SOA are relative to the zone
        if rtype == TYPE_SOA and owner != zone.origin:
            raise _Problem(f"SOA record for {owner}. is not at the zone origin {zone.origin}.")
        rel = _relative(zone.origin, owner)
        if rtype == TYPE_SOA and not rel:
            self.soa(number, zone, ttl, rdata)
            return
        ttl = self.record_ttl(ttl)
        place = _place(zone, rel, rtype)
        if place is None:
            return
        if rtype == TYPE_CNAME:
            if len(rdata) != 1:
                raise _Problem("CNAME takes exactly one target name")
            labels = self.resolve(rdata[0])
            wire, target = _labels_wire(labels), key_from_wire_labels(labels)
        else:
            wire, target = self.rdata_wire(rtype, rdata), None
        _apply(zone, place, rel, rtype, ttl, wire, target, self.shared_rules)

    def record_ttl(self, ttl: int | None) -> int:
        if ttl is None:
            ttl = self.default_ttl if self.default_ttl is not None else self.last_ttl
            if ttl is None:
                raise _Problem("record without a TTL, and no $TTL or earlier TTL to take it from")
        self.last_ttl = ttl
        return ttl

    def soa(self, number: int, zone: PolicyZone, ttl: int | None, fields: list[str]) -> None:
        if self.soa_line:
            raise _Problem(f"second SOA record (the zone's SOA is at line {self.soa_line})")
        if len(fields) != 7:
            raise _Problem("SOA takes 7 fields: mname rname serial refresh retry expire minimum")
        mname, rname = (key_from_wire_labels(self.resolve(text)) for text in fields[:2])
        if not fields[2].isdigit() or int(fields[2]) > _MAX_U32:
            raise _Problem(f"bad SOA serial {excerpt(fields[2])}: a number from 0 to {_MAX_U32}")
        names = ("refresh", "retry", "expire", "minimum")
        timers = [_ttl_value(text, what) for text, what in zip(fields[3:], names, strict=True)]
        if ttl is None and self.default_ttl is None and self.last_ttl is None:
            ttl = timers[3]  # BIND: without any TTL, the SOA's own minimum
        zone.soa = Soa(self.record_ttl(ttl), mname, rname, int(fields[2]), *timers)
        self.soa_line = number

    def rdata_wire(self, rtype: int, tokens: list[str]) -> bytes:
        text = " ".join(tokens)
        memo_key = (rtype, text, self.origin_key)
        wire = self.rdata_memo.get(memo_key)
        if wire is None:
            wire = self._dnspython_wire(rtype, text)
            if len(self.rdata_memo) >= 65536:
                self.rdata_memo.clear()
            self.rdata_memo[memo_key] = wire
        return wire

    def _dnspython_wire(self, rtype: int, text: str) -> bytes:
        if self.dns_origin is None:
            assert self.origin_labels is not None  # a record resolved its owner
            self.dns_origin = dns.name.Name([*self.origin_labels, b""])
        try:
            parsed = dns.rdata.from_text(
                dns.rdataclass.IN,
                dns.rdatatype.RdataType.make(rtype),
                text,
                origin=self.dns_origin,
                relativize=False,
            )
            wire = parsed.to_wire()
        except (dns.exception.DNSException, ValueError, UnicodeError) as exc:
            raise _Problem(f"bad {_type_text(rtype)} data {excerpt(text)}: {clip(str(exc))}") from None
        assert wire is not None
        return wire


def _short_labels(name: str) -> bool:
    return max(map(len, name.split("."))) <= 63


def parse_zone_file(
    lines: Iterable[str], path: str, origin: str | None = None
) -> tuple[PolicyZone | None, list[LineError]]:
    """Read a policy zone from master-file lines; (zone, []) or (None, every error with file:line).

    origin: the zone's name when known (a configured or transferred zone); the file's SOA must
    then be at it.  Without it, the first record must be the SOA, whose owner names the zone.
    """
    parser = _ZoneParser(path, origin)
    match = _FAST_LINE.match
    targets = _FAST_TARGETS
    usable, suffix, absolute_suffix, limit, exact, below = parser.fast_state()
    cut = -len(absolute_suffix)
    fast_line: re.Match[str] | None = None
    fast_ttl: str | None = None
    for number, text in enumerate(lines, start=1):
        found = match(text) if usable else None
        if found is not None:
            star, name, absolute, ttl, class_ttl, target = found.groups()
            name = name.lower()
            key = (name[:cut] if name.endswith(absolute_suffix) else "") if absolute else name + suffix
            rule = targets[target]
            table = below if star else exact
            plain = key and len(key) <= limit and (len(name) < 64 or _short_labels(name)) and "rpz-" not in key
            if plain and table.setdefault(key, rule) is rule:
                fast_line = found
                fast_ttl = ttl or class_ttl or fast_ttl
                continue
        parser.catch_up(fast_line, fast_ttl)
        fast_line = fast_ttl = None
        parser.line(number, text)
        usable, suffix, absolute_suffix, limit, exact, below = parser.fast_state()
        cut = -len(absolute_suffix)
    parser.catch_up(fast_line, fast_ttl)
    return parser.finish()


def looks_like_zone_file(head: list[str]) -> bool:
    """Whether the first lines of a file read as a master file: a $ORIGIN line or an SOA record."""
    for text in head:
        tokens = text.split(";", 1)[0].split()
        if not tokens:
            continue
        if tokens[0].upper() == "$ORIGIN":
            return True
        if tokens[0][0] in "#!":  # a domain list's comment
            continue
        start = 0 if text[:1] in (" ", "\t") else 1  # past the owner
        upper = [token.upper() for token in tokens[:4]]
        if "SOA" in upper[start:]:
            after = tokens[upper.index("SOA", start) + 1 :]
            # An SOA record goes on with "(" or all seven fields (a hosts line "0.0.0.0 soa" does not).
            if "(" in "".join(after) or len(after) >= 7:
                return True
    return False
