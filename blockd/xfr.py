"""Zone transfers, client side: AXFR (RFC 5936) and IXFR (RFC 1995) messages, TSIG (RFC 8945).

Pure: builds the query, reads response messages from bytes, checks their TSIG chain and
assembles one transfer's messages into its result; the connection is blockd.transfer's.

  transfer_query    the AXFR query (no serial) or IXFR query (our SOA serial in the authority
                    section), TSIG-signed with dnspython when a key is given.
  read_message      a byte-level reader of one response message: dnspython would build an
                    object per record (seconds for a big RPZ); this yields plain tuples
                    (owner key, type, class, TTL, RDATA) with every embedded name decompressed.
  TsigVerifier      the TSIG chain of one transfer: the first and last message must be signed;
                    between them a client "MUST accept up to 99 intermediary messages without a
                    TSIG" (RFC 8945 5.3.1; Knot checks the same, older NSD signs every 96th),
                    each covered by the next signed message's MAC, so none goes unverified.
  TransferAssembler the messages of one transfer in order -> UpToDate, FullZone or Incremental,
                    or XfrError (Refused for rcodes that say "not this query", TsigError for
                    authentication failures).

With no key configured, a TSIG on an answer is not verified (as Knot does): we did not ask for
authentication, so the TSIG proves nothing we rely on.  A TSIG error the primary reports is an
error in both cases.  Records owned outside the zone are dropped and counted (as Knot does).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

import dns.exception
import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TSIG
import dns.rrset
import dns.tsig

from blockd.names import key_from_wire_labels
from blockd.tsig_key import TsigKey, to_dnspython

TYPE_SOA = 6
TYPE_OPT = 41
TYPE_TSIG = 250
TYPE_IXFR = 251
TYPE_AXFR = 252
CLASS_IN = 1
CLASS_ANY = 255
FLAG_QR = 0x8000
FLAG_TC = 0x0200
OPCODE_MASK = 0x7800

RCODE_NAMES = {
    0: "NOERROR",
    1: "FORMERR",
    2: "SERVFAIL",
    3: "NXDOMAIN",
    4: "NOTIMP",
    5: "REFUSED",
    6: "YXDOMAIN",
    7: "YXRRSET",
    8: "NXRRSET",
    9: "NOTAUTH",
    10: "NOTZONE",
    16: "BADVERS",
}
# The primary will not answer this query (or not from us): the caller may try AXFR or another primary.
REFUSED_RCODES = frozenset({1, 4, 5, 9})  # FORMERR, NOTIMP, REFUSED, NOTAUTH
TSIG_ERRORS = {
    16: "bad signature (BADSIG)",
    17: "unknown key (BADKEY)",
    18: "clock skew (BADTIME)",
    19: "bad mode (BADMODE)",
    20: "bad name (BADNAME)",
    21: "bad algorithm (BADALG)",
    22: "bad truncation (BADTRUNC)",
}
MAX_UNSIGNED = 99  # RFC 8945 5.3.1: the server signs at least every 100th message

Record = tuple[str, int, int, int, bytes]  # owner key, type, class, TTL, RDATA (names decompressed)

_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
_TYPE_CLASS = struct.Struct("!HH")
_SOA_TAIL = struct.Struct("!IIIII")
_MAX_POINTER_HOPS = 128  # one label per hop at least, 127 labels at most
_NAPTR = -1
_UNSAFE_KEY_BYTE = re.compile(rb"[^a-z0-9_*.-]")  # as blockd.names: bytes a key never holds unescaped

# RDATA layouts whose names are decompressed: (fixed octets before the names, names, fixed octets
# after).  RFC 3597 section 4: the RFC 1035 types, and those some implementations compress (RP,
# AFSDB, RT, PX, NAPTR, SRV); DNAME (RFC 6672).  SVCB/HTTPS target names are never compressed.
_ONE_NAME = (0, 1, 0)
_LAYOUTS: dict[int, tuple[int, int, int]] = {
    2: _ONE_NAME,  # NS
    3: _ONE_NAME,  # MD
    4: _ONE_NAME,  # MF
    5: _ONE_NAME,  # CNAME
    6: (0, 2, 20),  # SOA
    7: _ONE_NAME,  # MB
    8: _ONE_NAME,  # MG
    9: _ONE_NAME,  # MR
    12: _ONE_NAME,  # PTR
    14: (0, 2, 0),  # MINFO
    15: (2, 1, 0),  # MX
    17: (0, 2, 0),  # RP
    18: (2, 1, 0),  # AFSDB
    21: (2, 1, 0),  # RT
    26: (2, 2, 0),  # PX
    33: (6, 1, 0),  # SRV
    35: (_NAPTR, 1, 0),  # NAPTR: order, preference, three character-strings, then the name
    39: _ONE_NAME,  # DNAME
}

_Name = tuple[list[bytes], bytes, int]  # labels, uncompressed wire form, offset after the name


class XfrError(Exception):
    """A transfer that cannot be used; reason says why in words for a log line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Refused(XfrError):
    """The primary answered with an rcode that refuses this query (REFUSED, NOTAUTH, NOTIMP, FORMERR)."""

    def __init__(self, rcode: int):
        super().__init__(f"primary answered {rcode_name(rcode)}")
        self.rcode = rcode


class TsigError(XfrError):
    """The transfer failed authentication: ours of the primary's messages, or the primary's of our query."""


def rcode_name(rcode: int) -> str:
    return RCODE_NAMES.get(rcode, f"rcode {rcode}")


def serial_newer(a: int, b: int) -> bool:
    """a is a later SOA serial than b (RFC 1982 serial number arithmetic)."""
    return a != b and (a - b) & 0xFFFFFFFF < 0x80000000


def soa_serial(record: Record) -> int:
    serial: int = _SOA_TAIL.unpack_from(record[4], len(record[4]) - 20)[0]
    return serial


def soa_timers(record: Record) -> tuple[int, int, int]:
    """An SOA record's (refresh, retry, expire)."""
    _serial, refresh, retry, expire, _minimum = _SOA_TAIL.unpack_from(record[4], len(record[4]) - 20)
    return refresh, retry, expire


# --- the query ---------------------------------------------------------------------------------


def transfer_query(zone: str, serial: int | None, key: TsigKey | None, query_id: int) -> tuple[bytes, bytes | None]:
    """The AXFR (serial None) or IXFR query for zone, and the request MAC when signed.

    The IXFR query's SOA carries only our serial (root names, zero timers, as Unbound sends it):
    a primary reads nothing else of it.
    """
    name = dns.name.from_text(zone.rstrip(".") + ".")
    rdtype = dns.rdatatype.AXFR if serial is None else dns.rdatatype.IXFR
    query = dns.message.make_query(name, rdtype, flags=0, id=query_id)
    if serial is not None:
        soa = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.SOA, f". . {serial} 0 0 0 0")
        query.authority.append(dns.rrset.from_rdata(name, 0, soa))
    if key is None:
        return query.to_wire(), None
    query.use_tsig(to_dnspython(key))
    return query.to_wire(), query.mac


# --- reading one message -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Question:
    name: str  # key form
    qtype: int
    qclass: int


@dataclass(frozen=True, slots=True)
class TsigRecord:
    owner: dns.name.Name
    rdata: dns.rdtypes.ANY.TSIG.TSIG
    offset: int  # where the TSIG record starts in the message (dns.tsig.validate's tsig_start)

    @property
    def error(self) -> int:
        return int(self.rdata.error)


@dataclass(frozen=True, slots=True)
class XfrMessage:
    wire: bytes
    id: int
    flags: int
    rcode: int  # with the EDNS extended bits
    question: Question | None
    answers: list[Record]
    tsig: TsigRecord | None

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11


def _read_name(data: bytes, pos: int, memo: dict[int, _Name], hops: int = 0) -> _Name:
    """The name at pos, decompressed; memo maps offsets already read to their names.

    A pointer must point before the name it ends (so every chain ends) and past the header.
    Running off the end raises IndexError, which read_message reports as truncation.
    """
    hit = memo.get(pos)
    if hit is not None:
        return hit
    start = pos
    labels: list[bytes] = []
    while True:
        length = data[pos]
        if length == 0:
            name = (labels, data[start : pos + 1], pos + 1)
            break
        if length < 64:
            end = pos + 1 + length
            labels.append(data[pos + 1 : end])
            pos = end
            continue
        if length < 0xC0:
            raise XfrError("unknown label type in a name")
        target = (length & 0x3F) << 8 | data[pos + 1]
        if target >= start or target < 12 or hops >= _MAX_POINTER_HOPS:
            raise XfrError("bad compression pointer")
        suffix = _read_name(data, target, memo, hops + 1)
        name = (labels + suffix[0], data[start:pos] + suffix[1], pos + 2)
        break
    if len(name[1]) > 255:
        raise XfrError("name longer than 255 octets")
    memo[start] = name
    return name


def _owner(data: bytes, pos: int, memo: dict[int, _Name], suffixes: dict[int, tuple[str, int]]) -> tuple[str, int]:
    """The key of the owner name at pos and the offset after it.

    The fast path is the usual owner of a transfer: plain labels, then a pointer to a name read
    before (the apex, mostly), whose key and length suffixes remembers.  Anything else is read
    by _read_name.
    """
    start = pos
    labels: list[bytes] = []
    length = data[pos]
    while 0 < length < 64:
        end = pos + 1 + length
        labels.append(data[pos + 1 : end])
        pos = end
        length = data[pos]
    if length >= 0xC0:
        target = (length & 0x3F) << 8 | data[pos + 1]
        suffix = suffixes.get(target)
        if suffix is not None and target < start and pos - start + suffix[1] <= 255:
            if not labels:
                return suffix[0], pos + 2
            # key_from_wire_labels' own fast path, inline: this runs once per record.
            joined = labels[0].lower() if len(labels) == 1 else b".".join(labels).lower()
            if _UNSAFE_KEY_BYTE.search(joined) is None and joined.count(b".") == len(labels) - 1:
                prefix = joined.decode("ascii")
            else:
                prefix = key_from_wire_labels(labels)
            return (prefix + "." + suffix[0] if suffix[0] else prefix), pos + 2
        if 12 <= target < start:
            suffix_labels, suffix_wire, _end = _read_name(data, target, memo)
            suffixes[target] = (key_from_wire_labels(suffix_labels), len(suffix_wire))
    all_labels, _wire, end = _read_name(data, start, memo)
    return key_from_wire_labels(all_labels), end


def _one_name(data: bytes, start: int, end: int, memo: dict[int, _Name]) -> bytes:
    """RDATA that is one name (CNAME, NS, PTR, DNAME...), decompressed."""
    pos = start
    while pos < end:
        length = data[pos]
        if length == 0:
            if pos + 1 != end or end - start > 255:
                break
            return data[start:end]  # not compressed: the RDATA as it is
        if length >= 64:
            break
        pos += 1 + length
    name = _read_name(data, start, memo)
    if name[2] != end:
        raise XfrError("RDATA length does not match its name")
    return name[1]


def _naptr_prefix(data: bytes, start: int) -> int:
    pos = start + 4
    for _ in range(3):
        pos += 1 + data[pos]
    return pos - start


def _decompress(data: bytes, start: int, end: int, layout: tuple[int, int, int], memo: dict[int, _Name]) -> bytes:
    """RDATA in data[start:end] with its names written out in full."""
    if layout is _ONE_NAME:
        return _one_name(data, start, end, memo)
    before, names, after = layout
    if before == _NAPTR:
        before = _naptr_prefix(data, start)
    pos = start + before
    parts = [data[start:pos]]
    for _ in range(names):
        name = _read_name(data, pos, memo)
        parts.append(name[1])
        pos = name[2]
    if pos + after != end:
        raise XfrError("RDATA length does not match its fields")
    parts.append(data[pos:end])
    return b"".join(parts)


def _answers(data: bytes, pos: int, count: int, memo: dict[int, _Name]) -> tuple[list[Record], int]:
    records: list[Record] = []
    append = records.append
    unpack = _RR.unpack_from
    layouts = _LAYOUTS
    size = len(data)
    suffixes: dict[int, tuple[str, int]] = {}
    # One object per distinct RDATA and TTL: an RPZ repeats a handful of them a million times.
    share_ttl = cast(dict[int, int], {}).setdefault
    share_rdata = cast(dict[bytes, bytes], {}).setdefault
    for _ in range(count):
        owner, pos = _owner(data, pos, memo, suffixes)
        rtype, rclass, ttl, length = unpack(data, pos)
        pos += 10
        end = pos + length
        if end > size:
            raise XfrError("record data runs past the end of the message")
        layout = layouts.get(rtype)
        if layout is None:
            rdata = data[pos:end]
        elif layout is _ONE_NAME and length == 1 and data[pos] == 0:
            rdata = b"\x00"  # the root: an RPZ's "CNAME ." (NXDOMAIN), the commonest record there is
        else:
            rdata = _decompress(data, pos, end, layout, memo)
        append((owner, rtype, rclass, share_ttl(ttl, ttl), share_rdata(rdata, rdata)))
        pos = end
    return records, pos


def _skip_records(data: bytes, pos: int, count: int, memo: dict[int, _Name]) -> int:
    for _ in range(count):
        pos = _read_name(data, pos, memo)[2] + 10
        pos += _RR.unpack_from(data, pos - 10)[3]
    if pos > len(data):
        raise XfrError("record data runs past the end of the message")
    return pos


def _tsig_record(data: bytes, start: int, labels: list[bytes], pos: int, rclass: int, length: int) -> TsigRecord:
    if rclass != CLASS_ANY:
        raise XfrError("TSIG record not of class ANY")
    try:
        owner = dns.name.Name([*labels, b""])
        rdata = dns.rdata.from_wire(dns.rdataclass.ANY, dns.rdatatype.TSIG, data, pos, length)
    except (dns.exception.DNSException, ValueError, IndexError, struct.error) as exc:
        raise XfrError(f"malformed TSIG record ({type(exc).__name__})") from None
    return TsigRecord(owner, cast(dns.rdtypes.ANY.TSIG.TSIG, rdata), start)


def _additional(data: bytes, pos: int, count: int, memo: dict[int, _Name]) -> tuple[int, TsigRecord | None, int]:
    """The offset after the section, its TSIG (which must come last) and the EDNS extended rcode bits."""
    tsig = None
    extended = 0
    for index in range(count):
        start = pos
        labels, _wire, pos = _read_name(data, pos, memo)
        rtype, rclass, ttl, length = _RR.unpack_from(data, pos)
        pos += 10
        if pos + length > len(data):
            raise XfrError("record data runs past the end of the message")
        if rtype == TYPE_TSIG:
            if index != count - 1:
                raise XfrError("TSIG record is not the last record")
            tsig = _tsig_record(data, start, labels, pos, rclass, length)
        elif rtype == TYPE_OPT:
            extended = ttl >> 24
        pos += length
    return pos, tsig, extended


def _question(data: bytes, count: int, memo: dict[int, _Name]) -> tuple[Question | None, int]:
    if count == 0:
        return None, 12
    if count > 1:
        raise XfrError(f"{count} questions in one message")
    labels, _wire, pos = _read_name(data, 12, memo)
    qtype, qclass = _TYPE_CLASS.unpack_from(data, pos)
    return Question(key_from_wire_labels(labels), qtype, qclass), pos + 4


def read_message(wire: bytes) -> XfrMessage:
    """One transfer response message, read from its bytes; XfrError when it is malformed."""
    if len(wire) < 12:
        raise XfrError("message shorter than a DNS header")
    query_id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    memo: dict[int, _Name] = {}
    try:
        question, pos = _question(wire, qdcount, memo)
        answers, pos = _answers(wire, pos, ancount, memo)
        pos = _skip_records(wire, pos, nscount, memo)
        pos, tsig, extended = _additional(wire, pos, arcount, memo)
    except (IndexError, struct.error):
        raise XfrError("message truncated") from None
    if pos != len(wire):
        raise XfrError("trailing bytes after the last record")
    return XfrMessage(wire, query_id, flags, extended << 4 | flags & 0xF, question, answers, tsig)


# --- TSIG over a transfer ----------------------------------------------------------------------


class _Digest(Protocol):
    """The part of dnspython's HMAC context (dns.tsig.HMACTSig) used here."""

    def update(self, data: bytes) -> object: ...


# dnspython leaves validate unannotated: one typed name for it, so both mypy configurations pass.
_validate: Callable[..., object] = dns.tsig.validate


def primary_tsig_error(message: XfrMessage) -> TsigError | None:
    """The error when the primary's TSIG says it rejected our query's signature."""
    if message.tsig is None or not message.tsig.error:
        return None
    error = message.tsig.error
    return TsigError(f"primary rejected our TSIG: {TSIG_ERRORS.get(error, f'TSIG error {error}')}")


class TsigVerifier:
    """Verifies the TSIG chain of one transfer's messages (RFC 8945 5.3.1) with dnspython.

    Every signed message's MAC covers the previous MAC and any unsigned messages since, so the
    chain proves the whole stream; the first and the last message must be signed.
    """

    def __init__(self, key: TsigKey, request_mac: bytes, max_unsigned: int = MAX_UNSIGNED):
        self.key = key
        self.request_mac = request_mac
        self.max_unsigned = max_unsigned
        self.unsigned = 0  # unsigned messages since the last signed one
        self._key = to_dnspython(key)
        self._ctx: object = None

    def check(self, message: XfrMessage, now: float) -> None:
        """Check one message (in order); raises TsigError."""
        tsig = message.tsig
        if tsig is None:
            self._unsigned(message)
            return
        try:
            self._ctx = _validate(
                message.wire,
                self._key,
                tsig.owner,
                tsig.rdata,
                int(now),
                self.request_mac,
                tsig.offset,
                self._ctx,
                multi=True,
            )
        except dns.tsig.PeerError:
            raise primary_tsig_error(message) or TsigError("primary reported a TSIG error") from None
        except (dns.tsig.BadKey, dns.tsig.BadAlgorithm):
            raise TsigError(self._key_mismatch(tsig)) from None
        except dns.tsig.BadSignature:
            raise TsigError("bad signature (BADSIG)") from None
        except dns.tsig.BadTime:
            skew = int(now) - int(tsig.rdata.time_signed)
            raise TsigError(
                f"clock skew (BADTIME): signed {skew:+d} s from our clock, fudge {tsig.rdata.fudge} s"
            ) from None
        except (dns.exception.DNSException, ValueError, NotImplementedError) as exc:
            raise TsigError(f"malformed TSIG ({type(exc).__name__})") from None
        self.unsigned = 0

    def _unsigned(self, message: XfrMessage) -> None:
        if self._ctx is None:
            raise TsigError("unsigned message (the first message of a signed transfer)")
        self.unsigned += 1
        if self.unsigned > self.max_unsigned:
            raise TsigError(f"unsigned message ({self.unsigned} in a row, at most {self.max_unsigned} allowed)")
        cast(_Digest, self._ctx).update(message.wire)

    def _key_mismatch(self, tsig: TsigRecord) -> str:
        owner = tsig.owner.to_text(omit_final_dot=True).lower()
        if owner != self.key.name:
            return f"unknown key {owner!r} (BADKEY): ours is {self.key.name!r}"
        algorithm = tsig.rdata.algorithm.to_text(omit_final_dot=True).lower()
        return f"algorithm {algorithm} (BADKEY): our key is {self.key.algorithm}"

    def check_complete(self) -> None:
        """At the end of the transfer: the last message must have been signed."""
        if self.unsigned:
            raise TsigError("unsigned message (the last message of the transfer)")


# --- assembling a transfer ---------------------------------------------------------------------


@dataclass(frozen=True)
class UpToDate:
    serial: int  # the primary's
    soa: Record | None = None


@dataclass(frozen=True)
class FullZone:
    soa: Record
    records: list[Record]  # every record but the SOA, in transfer order

    @property
    def serial(self) -> int:
        return soa_serial(self.soa)


@dataclass(frozen=True)
class Incremental:
    old_serial: int
    new_serial: int
    # Each difference sequence in order, as (deleted, added), SOAs left out (RFC 1995 section 4).
    steps: list[tuple[list[Record], list[Record]]]
    soa: Record | None = None  # the new SOA


XfrResult = UpToDate | FullZone | Incremental


def _same_soa(a: Record, b: Record) -> bool:
    """Two SOA records are the same: owner, and RDATA with its names compared without case."""
    if a[0] != b[0] or a[1] != b[1]:
        return False
    return a[4] == b[4] or (a[4].lower() == b[4].lower() and a[4][-20:] == b[4][-20:])


@dataclass
class _Step:
    from_serial: int
    to_serial: int | None = None
    deleted: list[Record] = field(default_factory=list)
    added: list[Record] = field(default_factory=list)


class TransferAssembler:
    """The messages of one AXFR or IXFR, fed in order, to its result.

    zone is in key form; serial is ours (None asks for AXFR).  feed() returns the result once
    the transfer is complete, None while more messages are due.
    """

    def __init__(self, zone: str, serial: int | None, query_id: int, verifier: TsigVerifier | None = None):
        self.zone = zone.rstrip(".").lower()
        self.serial = serial
        self.qtype = TYPE_AXFR if serial is None else TYPE_IXFR
        self.query_id = query_id
        self.verifier = verifier
        self.result: XfrResult | None = None
        self.messages = 0
        self.records = 0
        self.out_of_zone = 0  # records dropped because their owner is not in the zone
        self.axfr_style = False  # an IXFR answered with the full zone
        self._dotted = "." + self.zone if self.zone else ""
        self._state = "start"
        self._soa: Record | None = None
        self._body: list[Record] = []
        self._steps: list[_Step] = []

    @property
    def complete(self) -> bool:
        return self.result is not None

    def feed(self, message: XfrMessage, now: float = 0.0) -> XfrResult | None:
        """Take the next message; now (seconds since the epoch) is for the TSIG time check."""
        if self.result is not None:
            raise XfrError("a message after the transfer was complete")
        self._check_header(message)
        if self.verifier is not None:
            self.verifier.check(message, now)
        self._check_question(message)
        self.messages += 1
        self.records += len(message.answers)
        self._take(message.answers)
        if self.result is None and self._state == "second":
            self._end_of_first_soa_message()
        if self.result is not None and self.verifier is not None:
            self.verifier.check_complete()
        return self.result

    def _check_header(self, message: XfrMessage) -> None:
        if message.id != self.query_id:
            raise XfrError(f"ID mismatch: {message.id} is not our query's {self.query_id}")
        if not message.flags & FLAG_QR or message.opcode != 0:
            raise XfrError("not a response to a query")
        error = primary_tsig_error(message)
        if error is not None:
            raise error
        if message.rcode in REFUSED_RCODES:
            raise Refused(message.rcode)
        if message.rcode:
            raise XfrError(f"primary answered {rcode_name(message.rcode)}")
        if message.flags & FLAG_TC:
            raise XfrError("truncated (TC) message")

    def _check_question(self, message: XfrMessage) -> None:
        question = message.question
        if question is None:
            return  # RFC 5936 2.2.1: messages after the first may leave it out
        if question.name != self.zone or question.qtype != self.qtype or question.qclass != CLASS_IN:
            raise XfrError(f"mismatched question {question.name!r} type {question.qtype} class {question.qclass}")

    def _in_zone(self, owner: str) -> bool:
        return owner == self.zone or owner.endswith(self._dotted)

    def _take(self, records: list[Record]) -> None:
        index = 0
        count = len(records)
        while index < count:
            if self.result is not None:
                raise XfrError("records after the end of the transfer")
            if self._state == "axfr":
                index = self._axfr_body(records, index)
                continue
            record = records[index]
            index += 1
            if self._state == "start":
                self._start(record)
            elif not self._in_zone(record[0]):
                self.out_of_zone += 1
            else:
                self._ixfr(record)

    def _start(self, record: Record) -> None:
        if record[1] != TYPE_SOA or record[0] != self.zone:
            raise XfrError("the transfer does not start with the zone's SOA")
        self._soa = record
        self._state = "axfr" if self.serial is None else "second"

    def _axfr_body(self, records: list[Record], index: int) -> int:
        """Take records up to the closing SOA; the index after what was taken."""
        count = len(records)
        end = count
        for at in range(index, count):
            if records[at][1] == TYPE_SOA:
                end = at
                break
        chunk = records[index:end]
        zone, dotted = self.zone, self._dotted
        kept = [record for record in chunk if record[0].endswith(dotted) or record[0] == zone]
        self.out_of_zone += len(chunk) - len(kept)
        self._body.extend(kept)
        if end < count:
            self._axfr_end(records[end])
            return end + 1
        return count

    def _axfr_end(self, record: Record) -> None:
        if not self._in_zone(record[0]):
            self.out_of_zone += 1
            return
        assert self._soa is not None
        if not _same_soa(record, self._soa):
            raise XfrError("the transfer does not end with the starting SOA")
        self.result = FullZone(self._soa, self._body)

    def _ixfr(self, record: Record) -> None:
        """One in-zone record of an IXFR after its first SOA."""
        assert self._soa is not None
        is_soa = record[1] == TYPE_SOA
        state = self._state
        if state == "second":
            self._second(record, is_soa)
        elif state == "deleting" and not is_soa:
            self._steps[-1].deleted.append(record)
        elif state == "adding" and not is_soa:
            self._steps[-1].added.append(record)
        elif state == "deleting":
            self._step_to(record)
        elif _same_soa(record, self._soa):
            self._ixfr_end()
        else:
            self._step_from(record)

    def _second(self, record: Record, is_soa: bool) -> None:
        assert self._soa is not None
        if not is_soa:
            # RFC 1995 section 4: a full zone in answer to IXFR ("AXFR-style").
            self.axfr_style = True
            self._state = "axfr"
            self._body.append(record)
        elif _same_soa(record, self._soa):
            self.axfr_style = True
            self.result = FullZone(self._soa, [])  # the full zone, empty
        else:
            self._step_from(record)

    def _step_from(self, record: Record) -> None:
        serial = soa_serial(record)
        if not self._steps and serial != self.serial:
            raise XfrError(f"the differences start at serial {serial}, ours is {self.serial}")
        if self._steps and serial != self._steps[-1].to_serial:
            raise XfrError(f"difference sequences do not chain: serial {self._steps[-1].to_serial}, then {serial}")
        self._steps.append(_Step(serial))
        self._state = "deleting"

    def _step_to(self, record: Record) -> None:
        step = self._steps[-1]
        serial = soa_serial(record)
        if not serial_newer(serial, step.from_serial):
            raise XfrError(f"a difference sequence goes from serial {step.from_serial} back to {serial}")
        step.to_serial = serial
        self._state = "adding"

    def _ixfr_end(self) -> None:
        assert self._soa is not None and self.serial is not None
        final = soa_serial(self._soa)
        if self._steps[-1].to_serial != final:
            raise XfrError(f"the differences end at serial {self._steps[-1].to_serial}, not {final}")
        steps = [(step.deleted, step.added) for step in self._steps]
        self.result = Incremental(self.serial, final, steps, self._soa)

    def _end_of_first_soa_message(self) -> None:
        """An IXFR whose message ended after the first SOA: one SOA not newer than ours is "up to date"."""
        assert self._soa is not None and self.serial is not None
        serial = soa_serial(self._soa)
        if not serial_newer(serial, self.serial):
            self.result = UpToDate(serial, self._soa)
        # A newer serial alone: the rest may follow in the next message (Knot waits for it too).
