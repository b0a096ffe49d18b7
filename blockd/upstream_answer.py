"""Reading upstream answers: what a blocking policy must inspect, and where the TTLs are.

One walk over the wire bytes (names decompressed, bounded) yields:
  names      CNAME/DNAME targets, HTTPS/SVCB target names and the owners in the answer
             section, as lookup keys: a listed name anywhere in the chain is CNAME cloaking;
  addresses  A/AAAA in the answer section, and ipv4hint/ipv6hint of HTTPS/SVCB records;
  ttl_fields the offset and value of every TTL (OPT excluded), so a cached answer is aged by
             patching bytes instead of parsing and packing it again;
  lifetime   how long the answer may be cached: the smallest TTL, or for NXDOMAIN/NODATA the
             SOA's min(TTL, MINIMUM) (RFC 2308); None when it must not be cached.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from blockd.names import key_from_wire_labels
from blockd.prefix_table import IPAddress
from blockd.wire import (
    FLAG_TC,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    TYPE_DNAME,
    TYPE_HTTPS,
    TYPE_OPT,
    TYPE_SOA,
    TYPE_SVCB,
)

_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
SVC_PARAM_IPV4HINT = 4
SVC_PARAM_IPV6HINT = 6


class MalformedAnswer(Exception):
    pass


@dataclass(frozen=True, slots=True)
class AnswerInfo:
    rcode: int
    names: tuple[str, ...]
    addresses: tuple[IPAddress, ...]
    hint_addresses: tuple[IPAddress, ...]
    ttl_fields: tuple[tuple[int, int], ...]
    lifetime: int | None


def read_name(data: bytes, pos: int) -> tuple[list[bytes], int]:
    """Labels of the (possibly compressed) name at pos, and the offset just after it."""
    labels: list[bytes] = []
    end = -1
    jumps = 0
    length_total = 0
    size = len(data)
    while True:
        if pos >= size:
            raise MalformedAnswer("name runs past the end")
        length = data[pos]
        if length & 0xC0 == 0xC0:
            if pos + 1 >= size:
                raise MalformedAnswer("truncated pointer")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if end < 0:
                end = pos + 2
            jumps += 1
            if jumps > 32 or target >= pos:
                raise MalformedAnswer("compression loop or forward pointer")
            pos = target
            continue
        if length & 0xC0:
            raise MalformedAnswer("unknown label type")
        if length == 0:
            return labels, (end if end >= 0 else pos + 1)
        length_total += length + 1
        if length_total > 254:  # 255 octets on the wire, counting the root's zero byte
            raise MalformedAnswer("name too long")
        if pos + 1 + length > size:
            raise MalformedAnswer("label runs past the end")
        labels.append(data[pos + 1 : pos + 1 + length])
        pos += 1 + length


def _svcb(data: bytes, start: int, end: int, names: list[str], hints: list[IPAddress]) -> None:
    if start + 2 > end:
        raise MalformedAnswer("short SVCB")
    labels, pos = read_name(data, start + 2)
    if labels:
        names.append(key_from_wire_labels(labels))
    while pos + 4 <= end:
        key, length = struct.unpack_from("!HH", data, pos)
        pos += 4
        value = data[pos : pos + length]
        pos += length
        if key == SVC_PARAM_IPV4HINT:
            hints.extend(ipaddress.IPv4Address(value[i : i + 4]) for i in range(0, len(value) - 3, 4))
        elif key == SVC_PARAM_IPV6HINT:
            hints.extend(ipaddress.IPv6Address(value[i : i + 16]) for i in range(0, len(value) - 15, 16))


class _Walk:
    """What one walk over an answer's records collects."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.addresses: list[IPAddress] = []
        self.hints: list[IPAddress] = []
        self.ttl_fields: list[tuple[int, int]] = []
        self.negative_ttl: int | None = None

    def answer_record(self, data: bytes, owner: list[bytes], rtype: int, rdata: int, end: int) -> None:
        """An answer-section record: its owner, CNAME/DNAME/SVCB targets and addresses."""
        self.names.append(key_from_wire_labels(owner))
        if rtype in (TYPE_CNAME, TYPE_DNAME):
            self.names.append(key_from_wire_labels(read_name(data, rdata)[0]))
        elif rtype == TYPE_A and end - rdata == 4:
            self.addresses.append(ipaddress.IPv4Address(data[rdata:end]))
        elif rtype == TYPE_AAAA and end - rdata == 16:
            self.addresses.append(ipaddress.IPv6Address(data[rdata:end]))
        elif rtype in (TYPE_HTTPS, TYPE_SVCB):
            _svcb(data, rdata, end, self.names, self.hints)

    def authority_soa(self, data: bytes, ttl: int, rdata: int, end: int) -> None:
        """The SOA of a negative answer: caching time min(TTL, MINIMUM) (RFC 2308 section 5)."""
        _mname, at = read_name(data, rdata)
        _rname, at = read_name(data, at)
        if at + 20 > end:
            raise MalformedAnswer("SOA truncated")
        minimum = struct.unpack_from("!I", data, at + 16)[0]
        self.negative_ttl = min(ttl, minimum)

    def lifetime(self, flags: int, ancount: int) -> int | None:
        """How long the answer may be cached; None when it must not be (truncated, an error)."""
        rcode = flags & 0x0F
        if flags & FLAG_TC:
            return None
        if rcode == RCODE_NOERROR and ancount:
            return min(ttl for _, ttl in self.ttl_fields) if self.ttl_fields else None
        if rcode in (RCODE_NOERROR, RCODE_NXDOMAIN):
            return self.negative_ttl
        return None


def _skip_questions(data: bytes, count: int) -> int:
    pos = 12
    for _ in range(count):
        _labels, pos = read_name(data, pos)
        pos += 4
        if pos > len(data):
            raise MalformedAnswer("question truncated")
    return pos


def analyze(answer: bytes) -> AnswerInfo:
    """Everything blockd needs from an upstream answer.  Raises MalformedAnswer."""
    answer = bytes(answer)
    if len(answer) < 12:
        raise MalformedAnswer("shorter than a header")
    _id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(answer)
    pos = _skip_questions(answer, qdcount)
    walk = _Walk()
    size = len(answer)
    for section, count in ((1, ancount), (2, nscount), (3, arcount)):
        for _ in range(count):
            owner, pos = read_name(answer, pos)
            if pos + 10 > size:
                raise MalformedAnswer("record header truncated")
            rtype, _rclass, ttl, rdlength = _RR.unpack_from(answer, pos)
            if ttl & 0x80000000:
                ttl = 0  # RFC 2181 section 8: a TTL with the top bit set counts as zero
            rdata = pos + 10
            end = rdata + rdlength
            if end > size:
                raise MalformedAnswer("rdata truncated")
            if rtype != TYPE_OPT:
                walk.ttl_fields.append((pos + 4, ttl))
            if section == 1:
                walk.answer_record(answer, owner, rtype, rdata, end)
            elif section == 2 and rtype == TYPE_SOA:
                walk.authority_soa(answer, ttl, rdata, end)
            pos = end
    return AnswerInfo(
        flags & 0x0F,
        tuple(dict.fromkeys(walk.names)),
        tuple(walk.addresses),
        tuple(walk.hints),
        tuple(walk.ttl_fields),
        walk.lifetime(flags, ancount),
    )
