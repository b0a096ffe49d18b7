"""DNS wire format on the hot path: read header, question and EDNS straight from bytes, and
build the answers blockd itself gives (blocked, refused, servfail, truncated) as bytes.

Anything unusual (compression in the question, escaped label bytes, a class other than IN,
extra records, EDNS version != 0) is left to blockd.slowpath, which does the same with
dnslib; tests prove both give identical bytes for every query the fast path accepts.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from blockd.names import key_from_wire_labels

# Types and codes used by name here and elsewhere.
TYPE_A = 1
TYPE_NS = 2
TYPE_CNAME = 5
TYPE_SOA = 6
TYPE_MX = 15
TYPE_TXT = 16
TYPE_AAAA = 28
TYPE_SRV = 33
TYPE_DNAME = 39
TYPE_OPT = 41
TYPE_SVCB = 64
TYPE_HTTPS = 65
TYPE_ANY = 255
CLASS_IN = 1

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5

EDNS_OPTION_ECS = 8
EDNS_OPTION_EDE = 15
EDE_OTHER = 0
EDE_BLOCKED = 15
EDE_PROHIBITED = 18
EDE_NO_REACHABLE_AUTHORITY = 22

FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
FLAG_AD = 0x0020
FLAG_CD = 0x0010
OPCODE_MASK = 0x7800

# What blockd advertises and the most it will ever send over UDP (RFC 9715 / DNS flag day 2020).
SERVER_UDP_PAYLOAD = 1232
PLAIN_UDP_LIMIT = 512

# The SOA blockd puts in negative answers (RFC 2308).  The owner is the query name, as
# AdGuard Home does, so the client caches the negative answer for exactly what it asked.
SOA_MNAME = b"\x06blockd\x07invalid\x00"
SOA_RNAME_LABEL = b"\x0ahostmaster"
SOA_SERIAL = 1
SOA_REFRESH = 3600
SOA_RETRY = 600
SOA_EXPIRE = 86400

_HEADER = struct.Struct("!HHHHHH")
_TYPE_CLASS = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHHIH")  # pointer, type, class, ttl, rdlength
_RR_TAIL = struct.Struct("!HHIH")  # type, class, ttl, rdlength (after the owner name)
_OPT_FIXED = struct.Struct("!BHHIH")  # root name, type, udp size, ext-rcode/version/flags, rdlength


class Drop(Exception):
    """A packet that gets no answer at all (too short to carry an ID, or a response)."""


class HeaderOnlyError(Exception):
    """The header is readable but the rest is not: answer with this rcode and no question."""

    def __init__(self, query_id: int, flags: int, rcode: int, reason: str):
        super().__init__(reason)
        self.query_id = query_id
        self.flags = flags
        self.rcode = rcode


class Query:
    """What blockd needs to know about a query, read from its wire bytes.

    Callers never ask which parser read it: the query builds its own blocked answer and its
    upstream message.  This class is the byte-level fast path's; blockd.slowpath.SlowQuery is
    the same interface over a dnslib record.
    """

    __slots__ = (
        "raw",
        "id",
        "flags",
        "key",
        "qtype",
        "qclass",
        "question",
        "edns",
        "udp_size",
        "dnssec_ok",
        "options",
        "opt_offset",
    )

    # A fast-path query's answer depends only on its bytes (after the ID) and the policy, so it
    # may be remembered for repeats (blockd.repeats); a slow-path one is rare and not worth it.
    memoizable = True

    def __init__(self) -> None:
        self.raw = b""
        self.id = 0
        self.flags = 0
        self.key = ""
        self.qtype = 0
        self.qclass = 0
        self.question = b""  # the question section exactly as the client sent it
        self.edns = False
        self.udp_size = PLAIN_UDP_LIMIT
        self.dnssec_ok = False
        self.options: list[tuple[int, bytes]] = []
        self.opt_offset = -1  # where the OPT record starts in raw, -1 without EDNS

    @property
    def response_limit(self) -> int:
        """The largest UDP answer this client accepts (RFC 6891 6.2.5)."""
        if not self.edns:
            return PLAIN_UDP_LIMIT
        return max(PLAIN_UDP_LIMIT, min(self.udp_size, 65535))

    def blocked_response(self, action: str, ttl: int, sinkhole_a: bytes, sinkhole_aaaa: bytes, ede_text: str) -> bytes:
        """The local answer for this blocked query (see blocked_response)."""
        return blocked_response(self, action, ttl, sinkhole_a, sinkhole_aaaa, ede_text)

    def upstream_message(self, forward_ecs: bool) -> bytes:
        """This query as sent upstream (see upstream_message)."""
        return upstream_message(self, forward_ecs)

    def local_data_response(self, records: Sequence[LocalData], ttl: int, ede_text: str) -> bytes:
        """An RPZ local-data answer (see local_data_response); the same bytes for either parser."""
        return local_data_response(self, records, ttl, ede_text)


def read_header(data: bytes) -> tuple[int, int, int, int, int, int]:
    """Header fields, or Drop for packets that must not be answered."""
    if len(data) < 12:
        raise Drop("shorter than a DNS header")
    fields: tuple[int, int, int, int, int, int] = _HEADER.unpack_from(data)
    if fields[1] & FLAG_QR:
        raise Drop("a response, not a query")
    return fields


def check_query_header(query_id: int, flags: int, qdcount: int) -> None:
    """Raise HeaderOnlyError for what is answered from the header alone (both parsers share it)."""
    if flags & OPCODE_MASK:
        raise HeaderOnlyError(query_id, flags, RCODE_NOTIMP, "opcode is not QUERY")
    if qdcount != 1:
        raise HeaderOnlyError(query_id, flags, RCODE_FORMERR, f"QDCOUNT is {qdcount}, not 1")


def read_options(data: bytes, start: int, end: int) -> list[tuple[int, bytes]]:
    """The EDNS options in data[start:end] (an OPT record's RDATA).  Raises ValueError.

    Both parsers use this walk, so they agree on every trailing or truncated option.
    """
    options = []
    at = start
    while at < end:
        if at + 4 > end:
            raise ValueError("EDNS option truncated")
        code, length = _TYPE_CLASS.unpack_from(data, at)
        at += 4
        if at + length > end:
            raise ValueError("EDNS option truncated")
        options.append((code, data[at : at + length]))
        at += length
    return options


def _question_labels(data: bytes, query_id: int, flags: int) -> tuple[list[bytes], int] | None:
    """The question name's labels and the offset after it; None for a pointer or label type."""
    size = len(data)
    pos = 12
    labels: list[bytes] = []
    while True:
        if pos >= size:
            raise HeaderOnlyError(query_id, flags, RCODE_FORMERR, "question name runs past the end")
        length = data[pos]
        if length == 0:
            return labels, pos + 1
        if length > 63:
            return None  # compression pointer or reserved label type: let dnslib judge
        end = pos + 1 + length
        labels.append(data[pos + 1 : end])
        pos = end


def _read_opt(data: bytes, pos: int, query: Query) -> bool:
    """Fill query's EDNS fields from the OPT record at pos; False when the slow path must judge."""
    if pos + 11 > len(data) or data[pos] != 0:
        return False
    _root, rtype, udp_size, ttl, rdlength = _OPT_FIXED.unpack_from(data, pos)
    if rtype != TYPE_OPT or (ttl >> 16) & 0xFF != 0:
        return False  # not OPT, or EDNS version != 0 (BADVERS is the slow path's job)
    options_start = pos + 11
    options_end = options_start + rdlength
    if options_end > len(data):
        raise HeaderOnlyError(query.id, query.flags, RCODE_FORMERR, "OPT record truncated")
    try:
        query.options = read_options(data, options_start, options_end)
    except ValueError as exc:
        raise HeaderOnlyError(query.id, query.flags, RCODE_FORMERR, str(exc)) from None
    query.edns = True
    query.udp_size = udp_size
    query.dnssec_ok = bool(ttl & 0x8000)
    query.opt_offset = pos
    return True


def parse_query(data: bytes) -> Query | None:
    """Parse a query on the fast path.

    Returns None when the query is valid-looking but unusual (the caller uses the dnslib slow
    path), raises Drop or HeaderOnlyError for packets that get no answer or FORMERR/NOTIMP.
    """
    query_id, flags, qdcount, ancount, nscount, arcount = read_header(data)
    check_query_header(query_id, flags, qdcount)
    if ancount or nscount or arcount > 1:
        return None
    read = _question_labels(data, query_id, flags)
    if read is None:
        return None
    labels, pos = read
    if pos + 4 > len(data):
        raise HeaderOnlyError(query_id, flags, RCODE_FORMERR, "question truncated")
    if pos - 12 > 255:
        raise HeaderOnlyError(query_id, flags, RCODE_FORMERR, "question name longer than 255 octets")
    qtype, qclass = _TYPE_CLASS.unpack_from(data, pos)
    # The root (dnslib writes its one-byte owner name, not the 0xC00C pointer used here) and
    # classes other than IN go to the slow path.
    if qclass != CLASS_IN or not labels:
        return None
    key = key_from_wire_labels(labels)
    if "\\" in key or key.endswith("invalid"):
        # Escaped bytes, or a name whose suffix could be compressed against the SOA's names.
        return None
    query = Query()
    query.raw = data
    query.id = query_id
    query.flags = flags
    query.key = key
    query.qtype = qtype
    query.qclass = qclass
    query.question = data[12 : pos + 4]
    if arcount and not _read_opt(data, pos + 4, query):
        return None
    return query


def _response_flags(query_flags: int, rcode: int) -> int:
    # QR, the query's opcode, RD and CD copied (RFC 1035 4.1.1, RFC 4035 3.2.2), RA set.
    return FLAG_QR | (query_flags & (OPCODE_MASK | FLAG_RD | FLAG_CD)) | FLAG_RA | rcode


def opt_record(dnssec_ok: bool, ede_code: int | None = None, ede_text: str = "") -> bytes:
    """An OPT pseudo-record advertising blockd's UDP size, with an optional Extended DNS Error."""
    rdata = b""
    if ede_code is not None:
        text = ede_text.encode("utf-8")
        rdata = struct.pack("!HHH", EDNS_OPTION_EDE, 2 + len(text), ede_code) + text
    return _OPT_FIXED.pack(0, TYPE_OPT, SERVER_UDP_PAYLOAD, 0x8000 if dnssec_ok else 0, len(rdata)) + rdata


def soa_record(ttl: int, question_length: int) -> bytes:
    """The SOA of a negative answer whose answer section is empty, owned by the query name.

    Names are compressed exactly as dnslib compresses them, so the fast and slow paths agree
    byte for byte: the owner points at the question (offset 12) and the RNAME's
    "blockd.invalid" points at the MNAME, which follows this RR's 12 fixed bytes.
    """
    mname_offset = 12 + question_length + 12
    rdata = (
        SOA_MNAME
        + SOA_RNAME_LABEL
        + struct.pack("!HIIIII", 0xC000 | mname_offset, SOA_SERIAL, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, ttl)
    )
    return _RR_FIXED.pack(0xC00C, TYPE_SOA, CLASS_IN, ttl, len(rdata)) + rdata


def blocked_response(
    query: Query, action: str, ttl: int, sinkhole_a: bytes, sinkhole_aaaa: bytes, ede_text: str
) -> bytes:
    """The local answer for a blocked name (actions sinkhole, nxdomain, nodata, refused).

    Every query type is answered here: sinkhole gives an address for A/AAAA and NODATA for
    everything else (HTTPS, SVCB, TXT, MX, ANY, ...), so nothing of the upstream's reaches
    the client.
    """
    answer = b""
    authority = b""
    rcode = RCODE_NOERROR
    if action == "refused":
        rcode = RCODE_REFUSED
    elif action == "sinkhole" and query.qtype == TYPE_A:
        answer = _RR_FIXED.pack(0xC00C, TYPE_A, CLASS_IN, ttl, 4) + sinkhole_a
    elif action == "sinkhole" and query.qtype == TYPE_AAAA:
        answer = _RR_FIXED.pack(0xC00C, TYPE_AAAA, CLASS_IN, ttl, 16) + sinkhole_aaaa
    else:
        if action == "nxdomain":
            rcode = RCODE_NXDOMAIN
        authority = soa_record(ttl, len(query.question))
    opt = opt_record(query.dnssec_ok, EDE_BLOCKED, ede_text) if query.edns else b""
    header = _HEADER.pack(
        query.id,
        _response_flags(query.flags, rcode),
        1,
        1 if answer else 0,
        1 if authority else 0,
        1 if opt else 0,
    )
    return header + query.question + answer + authority + opt


class LocalData(Protocol):
    """One record of RPZ local data (blockd.rpz.LocalRecord)."""

    @property
    def rtype(self) -> int: ...

    @property
    def ttl(self) -> int: ...

    @property
    def rdata(self) -> bytes: ...


def local_data_response(query: Query, records: Sequence[LocalData], ttl: int, ede_text: str) -> bytes:
    """Exactly the zone's data for the query name: the records of the query's type (every one for
    ANY, and a CNAME whatever the type), owned by the query name as RPZ wildcards require; NODATA
    with the SOA (TTL `ttl`) when the zone has none of that type.  Names in the records' RDATA
    are uncompressed, so they can be copied as they are.
    """
    wanted = [r for r in records if r.rtype in (query.qtype, TYPE_CNAME) or query.qtype == TYPE_ANY]
    answer = b"".join(_RR_FIXED.pack(0xC00C, r.rtype, CLASS_IN, r.ttl, len(r.rdata)) + r.rdata for r in wanted)
    authority = b"" if wanted else soa_record(ttl, len(query.question))
    opt = opt_record(query.dnssec_ok, EDE_BLOCKED, ede_text) if query.edns else b""
    header = _HEADER.pack(
        query.id,
        _response_flags(query.flags, RCODE_NOERROR),
        1,
        len(wanted),
        1 if authority else 0,
        1 if opt else 0,
    )
    return header + query.question + answer + authority + opt


def error_response(query: Query, rcode: int, ede_code: int | None = None, ede_text: str = "", flags: int = 0) -> bytes:
    """Header + the question as asked, no records, an OPT when the client used EDNS."""
    opt = opt_record(query.dnssec_ok, ede_code, ede_text) if query.edns else b""
    header = _HEADER.pack(query.id, _response_flags(query.flags, rcode) | flags, 1, 0, 0, 1 if opt else 0)
    return header + query.question + opt


def header_only_response(query_id: int, query_flags: int, rcode: int) -> bytes:
    """FORMERR, NOTIMP: not an answer from the resolver, so RA clear (as BIND 9.18 and Unbound 1.17)."""
    return _HEADER.pack(query_id, _response_flags(query_flags, rcode) & ~FLAG_RA, 0, 0, 0, 0)


def question_end(data: bytes) -> int:
    """Where the first question of a raw query ends (after its type and class), or -1."""
    pos = 12
    try:
        while True:
            length = data[pos]
            if length == 0:
                end = pos + 5
                return end if end <= len(data) else -1
            if length > 63:  # compression or an extended label type: not in a query's question
                return -1
            pos += 1 + length
    except IndexError:
        return -1


def raw_response(data: bytes, rcode: int, flags: int = 0) -> bytes | None:
    """A question-only answer built from a query's raw bytes, for when it was never parsed
    (a rate-limited query's TC=1, an internal error's SERVFAIL): None for a packet that must not
    be answered; FORMERR without the question when none can be found."""
    if len(data) < 12:
        return None
    query_id, query_flags, qdcount = struct.unpack_from("!HHH", data)
    if query_flags & FLAG_QR:
        return None
    end = question_end(data) if qdcount == 1 else -1
    if end < 0:
        return header_only_response(query_id, query_flags, RCODE_FORMERR)
    return _HEADER.pack(query_id, _response_flags(query_flags, rcode) | flags, 1, 0, 0, 0) + data[12:end]


TYPE_HINFO = 13
RFC8482_TTL = 3600


def minimal_any_response(query: Query) -> bytes:
    """RFC 8482 4.2: ANY over UDP answered with one synthesized HINFO ("RFC8482", ""): small,
    so ANY cannot be used to amplify, while a client that really wants everything asks over TCP."""
    rdata = b"\x07RFC8482\x00"
    record = b"\xc0\x0c" + _RR_TAIL.pack(TYPE_HINFO, query.qclass, RFC8482_TTL, len(rdata)) + rdata
    opt = opt_record(query.dnssec_ok) if query.edns else b""
    header = _HEADER.pack(query.id, _response_flags(query.flags, RCODE_NOERROR), 1, 1, 0, 1 if opt else 0)
    return header + query.question + record + opt


CLASS_CH = 3
EDNS_OPTION_NSID = 3
CHAOS_VERSION_NAMES = frozenset({"version.bind", "version.server"})
CHAOS_IDENTITY_NAMES = frozenset({"hostname.bind", "id.server"})


@dataclass(frozen=True)
class ServerIdentity:
    """What blockd says of itself: NSID (RFC 5001), and CH TXT version.bind / hostname.bind."""

    nsid: bytes = b""
    version: str = ""
    identity: str = ""

    def chaos_text(self, key: str) -> str:
        """The CH TXT string for a name ("": none, REFUSED)."""
        if key in CHAOS_VERSION_NAMES:
            return self.version
        if key in CHAOS_IDENTITY_NAMES:
            return self.identity
        return ""


def chaos_response(query: Query, text: str) -> bytes:
    """A CH-class TXT answer with one string (version.bind and kin), TTL 0, from the resolver."""
    value = text.encode("ascii")
    rdata = bytes((len(value),)) + value
    record = _RR_FIXED.pack(0xC00C, TYPE_TXT, CLASS_CH, 0, len(rdata)) + rdata
    opt = opt_record(query.dnssec_ok) if query.edns else b""
    header = _HEADER.pack(query.id, _response_flags(query.flags, RCODE_NOERROR), 1, 1, 0, 1 if opt else 0)
    return header + query.question + record + opt


def asks_nsid(query: Query) -> bool:
    return query.edns and any(code == EDNS_OPTION_NSID for code, _ in query.options)


def with_nsid(answer: bytes, nsid: bytes) -> bytes:
    """The answer with an NSID option (RFC 5001) in its OPT record: appended when the OPT is the
    message's last record (as blockd and every common resolver place it), or an OPT added when
    there is none.  An answer whose OPT is elsewhere is returned as it is."""
    option = struct.pack("!HH", EDNS_OPTION_NSID, len(nsid)) + nsid
    opt_at = _last_opt(answer)
    if opt_at is None:
        arcount = struct.unpack_from("!H", answer, 10)[0]
        head = answer[:10] + struct.pack("!H", arcount + 1) + answer[12:]
        return head + _OPT_FIXED.pack(0, TYPE_OPT, SERVER_UDP_PAYLOAD, 0, len(option)) + option
    if opt_at < 0:
        return answer
    rdlength = struct.unpack_from("!H", answer, opt_at + 9)[0]
    return answer[: opt_at + 9] + struct.pack("!H", rdlength + len(option)) + answer[opt_at + 11 :] + option


def _last_opt(answer: bytes) -> int | None:
    """Where the answer's OPT record starts when it is the last record; -1 when it is elsewhere;
    None when there is none.  Walks the records (names may be compressed)."""
    try:
        qdcount, ancount, nscount, arcount = struct.unpack_from("!HHHH", answer, 4)
        pos = 12
        for _ in range(qdcount):
            pos = _skip_name(answer, pos) + 4
        found: int | None = None
        start = pos
        for _ in range(ancount + nscount + arcount):
            start = pos
            pos = _skip_name(answer, pos)
            rtype, _class, _ttl, rdlength = _RR_TAIL.unpack_from(answer, pos)
            pos += 10 + rdlength
            if rtype == TYPE_OPT:
                found = start
        if found is None:
            return None
        return found if found == start and pos == len(answer) and answer[found] == 0 else -1
    except (struct.error, IndexError):
        return -1


def _skip_name(data: bytes, pos: int) -> int:
    while True:
        length = data[pos]
        if length & 0xC0 == 0xC0:
            return pos + 2
        if length == 0:
            return pos + 1
        pos += 1 + length


def truncated_response(answer: bytes, query: Query, query_id: int) -> bytes:
    """An answer too big for the client's UDP size, cut to header + question (+ OPT) with TC."""
    flags = struct.unpack_from("!H", answer, 2)[0]
    opt = opt_record(query.dnssec_ok) if query.edns else b""
    return _HEADER.pack(query_id, flags | FLAG_TC, 1, 0, 0, 1 if opt else 0) + query.question + opt


EDNS_OPTION_COOKIE = 10
# Options that belong to one hop (RFC 6891 6.1.1: OPT is hop-by-hop): a forwarder must not
# pass the client's cookie upstream (RFC 7873), and ECS is sent only when configured.
# NSID too (RFC 5001 2.3: it identifies the server the client talks to, so it is not forwarded).
_HOP_BY_HOP = frozenset({EDNS_OPTION_COOKIE, EDNS_OPTION_NSID})


def parse_ecs(data: bytes) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The client subnet of an EDNS Client Subnet option (RFC 7871), or None if malformed."""
    if len(data) < 4:
        return None
    family, source_prefix = struct.unpack_from("!HB", data)
    address = data[4:]
    if family == 1 and source_prefix <= 32 and len(address) <= 4:
        try:
            return ipaddress.IPv4Network((int.from_bytes(address.ljust(4, b"\0"), "big"), source_prefix), strict=False)
        except ValueError:
            return None
    if family == 2 and source_prefix <= 128 and len(address) <= 16:
        try:
            return ipaddress.IPv6Network((int.from_bytes(address.ljust(16, b"\0"), "big"), source_prefix), strict=False)
        except ValueError:
            return None
    return None


def ecs_option(query: Query) -> bytes | None:
    for code, data in query.options:
        if code == EDNS_OPTION_ECS:
            return data
    return None


def upstream_message(query: Query, forward_ecs: bool) -> bytes:
    """The query as sent upstream: the client's bytes, less the hop-by-hop EDNS options."""
    if query.opt_offset < 0 or not query.options:
        return query.raw
    kept = [
        (code, data)
        for code, data in query.options
        if code not in _HOP_BY_HOP and (forward_ecs or code != EDNS_OPTION_ECS)
    ]
    if len(kept) == len(query.options):
        return query.raw
    rdata = b"".join(struct.pack("!HH", code, len(data)) + data for code, data in kept)
    fixed = query.raw[query.opt_offset : query.opt_offset + 9]  # root name, type, class, TTL
    return query.raw[: query.opt_offset] + fixed + struct.pack("!H", len(rdata)) + rdata


def lookup_message(key: str, qtype: int, query_id: int) -> tuple[bytes, bytes]:
    """(message, question) of a recursive IN query for a lookup key, as blockd itself asks.

    Raises ValueError for keys that are not plain host names (escaped labels): those were
    never on a list, only below an entry, and are not worth a lookup of their own.
    """
    labels = key.split(".")
    if "\\" in key or not all(0 < len(label) < 64 for label in labels):
        raise ValueError(f"not a plain host name: {key!r}")
    question = b"".join(bytes((len(label),)) + label.encode("ascii") for label in labels) + b"\0"
    question += _TYPE_CLASS.pack(qtype, CLASS_IN)
    return _HEADER.pack(query_id, FLAG_RD, 1, 0, 0, 0) + question, question
