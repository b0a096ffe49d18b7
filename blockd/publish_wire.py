"""Zone transfers, server side: the answers to SOA, AXFR and IXFR queries for published zones.

Pure: bytes in, messages out (no sockets; the time is passed in).  The records of a published
zone are encoded here by hand: every owner is its labels plus one compression pointer to the
zone's name in the question (offset 12), so a message is a join of small byte strings, and a
rule's type, class, TTL and RDATA are encoded once (_trigger_records: 2,000,000 records in 2.1 s,
where encoding record by record took 11.2 s; bench/RESULTS.md "RPZ out").  The query is read with
dnspython, which also checks its TSIG; responses are signed with dnspython's HMAC chain (RFC 8945
5.3.1: every message).  Responses to EDNS queries carry an OPT record; EDNS versions above 0 get
BADVERS.  A message with QR set is never answered (two servers must not answer each other forever).

  answer(query wire, client, zones, access, now, clock, full_transfers) -> Answer: what to send,
  and why (for metrics).  Messages for a transfer are produced lazily (a generator), so a big
  AXFR is encoded as the connection drains, never held whole in memory.

Access (checked in this order, as BIND's allow-transfer and Knot's ACLs): the client address in
`allow`, else REFUSED; with a key configured, a transfer must be signed with it (an unsigned one
is REFUSED, an unknown key or bad signature NOTAUTH with the TSIG error in an unsigned record,
as RFC 8945 5.3.2 says, a bad time NOTAUTH signed with the server's time).  SOA
queries need only the address (resolvers such as Unbound poll the serial unsigned); when signed,
their answer is signed.  AXFR over UDP is FORMERR; IXFR over UDP gets the current SOA alone,
the signal to come back over TCP (RFC 1995 2), unless the client is up to date.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import dns.exception
import dns.message
import dns.name
import dns.opcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TSIG
import dns.rrset
import dns.tsig

from blockd import wire
from blockd.names import key_from_wire_labels, key_to_wire
from blockd.prefix_table import IPAddress, IPNetwork, PrefixTable
from blockd.publish_zone import Record, rule_records
from blockd.rpz import PolicyZone, Rule, Soa, soa_wire

TYPE_SOA = 6
TYPE_NS = 2
TYPE_IXFR = 251
TYPE_AXFR = 252
TYPE_TSIG = 250
CLASS_IN = 1
CLASS_ANY = 255
RCODE_NOTAUTH = 9
TSIG_BADSIG = 16
TSIG_BADKEY = 17
TSIG_BADTIME = 18
FUDGE = 300
# Transfer messages stay below 16 KiB (as BIND's), well under the 64 KiB a TCP message may be.
MESSAGE_BUDGET = 16_000
NS_RDATA = key_to_wire("localhost")  # a policy zone needs an apex NS to load; nothing resolves it

# Outcomes, for blockd_publish_requests_total{type,result}
RESULTS = (
    "ok", "up_to_date", "refused", "notauth", "formerr", "notimp", "not_loaded", "unknown_zone", "badvers", "busy",
)  # fmt: skip
RCODE_BADVERS = 16  # an extended rcode: 0 in the header, 1 in OPT's extended-rcode byte
EDNS_PAYLOAD = 1232  # what blockd's OPT advertises (as limits.max_udp_size)
REQUEST_TYPES = ("soa", "axfr", "ixfr", "other")


@dataclass(frozen=True)
class Change:
    """One journal entry: the zone went from old to new SOA by removing and adding records."""

    old: Soa
    new: Soa
    removed: list[Record]
    added: list[Record]

    @property
    def size(self) -> int:
        return len(self.removed) + len(self.added)


@dataclass
class ZoneView:
    """What a published zone offers a transfer: its serving version and the journal since."""

    zone: PolicyZone | None  # None until the first rendering is done
    changes_since: Callable[[int], list[Change] | None]  # None: the journal does not reach back


@dataclass(frozen=True)
class Access:
    allow: PrefixTable[bool]
    key: dns.tsig.Key | None


def access_for(networks: Iterable[IPNetwork], key: dns.tsig.Key | None) -> Access:
    return Access(PrefixTable((network, True) for network in networks), key)


@dataclass
class Answer:
    request: str  # one of REQUEST_TYPES
    result: str  # one of RESULTS
    zone: str | None  # key form, when the question names a published zone
    messages: Iterator[bytes] = field(default_factory=lambda: iter(()))
    serial: int | None = None  # the client's serial (IXFR), for the log
    full: bool = False  # the whole zone (AXFR, or an IXFR beyond the journal): counted against the quota


def answer(
    data: bytes,
    client: IPAddress,
    udp: bool,
    zones: Mapping[str, ZoneView],
    access: Access,
    now: int,
    clock: Callable[[], int] | None = None,
    full_transfers: bool = True,
) -> Answer:
    """The response messages to one query on the publish listener.

    now: the time the query arrived (TSIG checks); clock: the time each signed message is made
    (a long transfer's last message is signed when it is sent); full_transfers: False when the
    quota of whole-zone transfers is taken (answered SERVFAIL: the secondary retries later).
    """
    if len(data) < 12 or data[2] & 0x80:
        return Answer("other", "formerr", None)  # a response is never answered: no loops between servers
    if access.allow.lookup(client) is None:
        return Answer("other", "refused", None, iter([_header_only(data, wire.RCODE_REFUSED)]))
    clock = clock or (lambda: now)
    query = _read_query(data, access, clock)
    if isinstance(query, Answer):
        return query
    question = query.question[0]
    request = _request_type(int(question.rdtype))
    key = key_from_wire_labels(list(question.name.labels[:-1]))
    view = zones.get(key)
    signer = _Signer(access.key, query.mac or b"", clock) if query.had_tsig and access.key is not None else None
    if query.edns > 0:  # RFC 6891 6.1.3: only version 0 exists
        return Answer(request, "badvers", key, iter([_empty(query, RCODE_BADVERS, signer)]))
    if view is None or int(question.rdclass) != CLASS_IN:
        return Answer(request, "unknown_zone", key, iter([_empty(query, wire.RCODE_REFUSED, signer)]))
    if request == "other":
        # Only the transfer protocol is served here: names in the zone are the resolvers' to answer.
        return Answer(request, "refused", key, iter([_empty(query, wire.RCODE_REFUSED, signer)]))
    if request != "soa" and access.key is not None and signer is None:
        return Answer(request, "refused", key, iter([_empty(query, wire.RCODE_REFUSED, signer)]))
    if view.zone is None:
        return Answer(request, "not_loaded", key, iter([_empty(query, wire.RCODE_SERVFAIL, signer)]))
    result = _transfer(query, request, key, view, view.zone, udp, signer)
    if result.full and not full_transfers:
        return Answer(request, "busy", key, iter([_empty(query, wire.RCODE_SERVFAIL, signer)]), result.serial)
    return result


def _read_query(data: bytes, access: Access, clock: Callable[[], int]) -> dns.message.Message | Answer:
    """The query, its TSIG checked against our key; or the answer that refuses it."""
    keyring = {access.key.name: access.key} if access.key is not None else None
    try:
        query = dns.message.from_wire(data, keyring=keyring, ignore_trailing=False)
    except (dns.message.UnknownTSIGKey, dns.tsig.BadAlgorithm):  # RFC 8945 5.2.1: both are BADKEY
        return _tsig_failure(data, TSIG_BADKEY)
    except dns.tsig.BadSignature:
        return _tsig_failure(data, TSIG_BADSIG)
    except dns.tsig.BadTime:
        return _tsig_failure(data, TSIG_BADTIME, access.key, clock)
    except (dns.exception.DNSException, ValueError, struct.error):
        return Answer("other", "formerr", None, iter([_header_only(data, wire.RCODE_FORMERR)]))
    if query.opcode() != dns.opcode.QUERY:
        return Answer("other", "notimp", None, iter([_header_only(data, wire.RCODE_NOTIMP)]))
    if len(query.question) != 1:
        return Answer("other", "formerr", None, iter([_header_only(data, wire.RCODE_FORMERR)]))
    return query


def _request_type(rdtype: int) -> str:
    return {TYPE_SOA: "soa", TYPE_AXFR: "axfr", TYPE_IXFR: "ixfr"}.get(rdtype, "other")


def _transfer(
    query: dns.message.Message,
    request: str,
    key: str,
    view: ZoneView,
    zone: PolicyZone,
    udp: bool,
    signer: _Signer | None,
) -> Answer:
    writer = _Writer(query, signer)
    if request == "soa":
        return Answer(request, "ok", key, writer.messages([_soa_record(zone.soa)], authority=[_ns_record(zone)]))
    if request == "axfr":
        if udp:  # a transfer needs TCP (RFC 5936 4.2)
            return Answer(request, "formerr", key, iter([_empty(query, wire.RCODE_FORMERR, signer)]))
        return Answer(request, "ok", key, writer.encoded(_full(zone)), full=True)
    serial = _client_serial(query)
    if serial is None:
        return Answer(request, "formerr", key, iter([_empty(query, wire.RCODE_FORMERR, signer)]))
    current = zone.soa.serial
    if serial == current or wire_serial_newer(serial, current):
        return Answer(request, "up_to_date", key, writer.messages([_soa_record(zone.soa)]), serial)
    if udp:
        return Answer(request, "ok", key, writer.messages([_soa_record(zone.soa)]), serial)
    changes = view.changes_since(serial)
    if changes is None:  # beyond the journal: the whole zone, as an IXFR answer may be (RFC 1995 4)
        return Answer(request, "ok", key, writer.encoded(_full(zone)), serial, full=True)
    return Answer(request, "ok", key, writer.messages(_incremental(zone.soa, changes)), serial)


def wire_serial_newer(a: int, b: int) -> bool:
    """RFC 1982: serial a is after b."""
    return a != b and ((a - b) % 2**32) < 2**31


def _client_serial(query: dns.message.Message) -> int | None:
    for rrset in query.authority:
        if rrset.rdtype == TYPE_SOA and len(rrset):
            return int(rrset[0].serial)
    return None


# --- records ---------------------------------------------------------------------------------

_FIXED = struct.Struct("!HHIH")
_APEX = b"\xc0\x0c"  # a pointer to the question's name: the zone's origin


def owner_wire(relative: str) -> bytes:
    """An owner relative to the origin, as labels plus the pointer to the origin."""
    if not relative:
        return _APEX
    if "\\" in relative:
        return key_to_wire(relative)[:-1] + _APEX
    return b"".join(bytes((len(label),)) + label.encode("ascii") for label in relative.split(".")) + _APEX


def record_wire(record: Record) -> bytes:
    owner, rtype, ttl, rdata = record
    return owner_wire(owner) + _FIXED.pack(rtype, CLASS_IN, ttl, len(rdata)) + rdata


def _soa_record(soa: Soa) -> Record:
    return ("", TYPE_SOA, soa.ttl, soa_wire(soa))


def _ns_record(zone: PolicyZone) -> Record:
    return ("", TYPE_NS, zone.soa.ttl, NS_RDATA)


def _full(zone: PolicyZone) -> Iterator[bytes]:
    """AXFR (RFC 5936 2.2): SOA, every record, SOA; encoded."""
    soa = record_wire(_soa_record(zone.soa))
    yield soa
    yield record_wire(_ns_record(zone))
    yield from _trigger_records(zone)
    for owner, rule in zone.ip.values():
        yield from map(record_wire, rule_records(owner, rule, zone.soa.ttl))
    yield soa


def _trigger_records(zone: PolicyZone) -> Iterator[bytes]:
    """The QNAME triggers' records, encoded: the same records as record_wire(records(zone)), in a
    third of the time (2,000,000 records in under 3 s, not 11): a rule's type, class, TTL and
    RDATA are encoded once, an owner's parent once for all its children, and `name` and `*.name`
    share one encoding (the order of records in a transfer carries no meaning)."""
    ttl = zone.soa.ttl
    tails: dict[Rule, tuple[bytes, ...]] = {}
    parents: dict[str, bytes] = {}
    length = _LENGTH

    def parent_wire(parent: str) -> bytes:
        dot = parent.find(".")
        if dot < 0 or "\\" in parent:
            found = owner_wire(parent)
        else:
            above = parent[dot + 1 :]
            found = length[dot] + parent[:dot].encode("ascii") + (parents.get(above) or parent_wire(above))
        parents[parent] = found
        return found

    def tail(rule: Rule) -> tuple[bytes, ...]:
        found = tails[rule] = tuple(
            _FIXED.pack(rtype, CLASS_IN, record_ttl, len(rdata)) + rdata
            for _, rtype, record_ttl, rdata in rule_records("", rule, ttl)
        )
        return found

    below = zone.below
    for key, rule in zone.exact.items():  # the hot loop: a million names
        dot = key.find(".")
        if dot > 0 and "\\" not in key:
            parent = key[dot + 1 :]
            name = length[dot] + key[:dot].encode("ascii") + (parents.get(parent) or parent_wire(parent))
        else:
            name = owner_wire(key)
        for part in tails.get(rule) or tail(rule):
            yield name + part
        under = below.get(key)
        if under is not None:
            name = b"\x01*" + name
            for part in tails.get(under) or tail(under):
                yield name + part
    for key in below.keys() - zone.exact.keys():
        name = b"\x01*" + owner_wire(key)
        rule = below[key]
        for part in tails.get(rule) or tail(rule):
            yield name + part


_LENGTH = [bytes((size,)) for size in range(256)]


def _incremental(current: Soa, changes: list[Change]) -> Iterator[Record]:
    """IXFR (RFC 1995 4): the new SOA, then per version the old SOA, deletions, its new SOA,
    additions; then the new SOA again."""
    yield _soa_record(current)
    for change in changes:
        yield _soa_record(change.old)
        yield from change.removed
        yield _soa_record(change.new)
        yield from change.added
    yield _soa_record(current)


# --- messages ----------------------------------------------------------------------------------


# dnspython leaves these unannotated: one typed name for each, so the strict configuration passes.
_tsig_rdata: Callable[..., Any] = dns.rdtypes.ANY.TSIG.TSIG
_tsig_sign: Callable[..., tuple[Any, object]] = dns.tsig.sign


class _Signer:
    """TSIG on every response message of one exchange, each MAC covering the previous one, each
    stamped when it is made (a secondary checks every message's time against its fudge)."""

    def __init__(self, key: dns.tsig.Key, request_mac: bytes, clock: Callable[[], int]):
        self.key = key
        self.request_mac = request_mac
        self.clock = clock
        self.ctx: object = None
        self.owner = _name_wire(key.name)

    def sign(self, message: bytes, error: int = 0, other: bytes = b"") -> bytes:
        query_id = struct.unpack_from("!H", message)[0]
        now = self.clock()
        template = _tsig_rdata(
            dns.rdataclass.ANY, dns.rdatatype.TSIG, self.key.algorithm, now, FUDGE, b"", query_id, error, other
        )
        tsig, self.ctx = _tsig_sign(message, self.key, template, now, self.request_mac, self.ctx, True)
        fixed = self.owner + struct.pack("!HHI", TYPE_TSIG, CLASS_ANY, 0)
        return _with_additional(message, fixed, cast(bytes, tsig.to_wire()))


def _name_wire(name: dns.name.Name) -> bytes:
    return cast(bytes, name.to_wire())


def _question_wire(question: dns.rrset.RRset) -> bytes:
    return _name_wire(question.name) + struct.pack("!HH", int(question.rdtype), int(question.rdclass))


def _with_additional(message: bytes, fixed: bytes, rdata: bytes) -> bytes:
    arcount = struct.unpack_from("!H", message, 10)[0] + 1
    return message[:10] + struct.pack("!H", arcount) + message[12:] + fixed + struct.pack("!H", len(rdata)) + rdata


class _Writer:
    def __init__(self, query: dns.message.Message, signer: _Signer | None):
        self.query = query
        self.signer = signer
        # The client's spelling of the zone name, which every owner points at.
        self.question = _question_wire(query.question[0])
        # QR and AA, RD copied (RFC 5936 2.2.1), opcode QUERY.
        self.flags = wire.FLAG_QR | wire.FLAG_AA | (query.flags & wire.FLAG_RD)
        self.opt = _opt(query, 0)

    def messages(self, answers: Iterable[Record], authority: Iterable[Record] = ()) -> Iterator[bytes]:
        """Answer records packed into messages of at most MESSAGE_BUDGET bytes (authority records
        only fit a one-message answer)."""
        return self.encoded(map(record_wire, answers), [record_wire(record) for record in authority])

    def encoded(self, answers: Iterable[bytes], authority: list[bytes] | None = None) -> Iterator[bytes]:
        """Encoded answer records packed into messages (see messages)."""
        parts: list[bytes] = []
        size = count = 0
        budget = MESSAGE_BUDGET - len(self.question) - 12
        for encoded in answers:
            if count and size + len(encoded) > budget:
                yield self._message(parts, count)
                parts, size, count = [], 0, 0
            parts.append(encoded)
            size += len(encoded)
            count += 1
        extra = authority or []
        yield self._message(parts + extra, count, len(extra))

    def _message(self, parts: list[bytes], answers: int, authority: int = 0) -> bytes:
        header = struct.pack("!HHHHHH", self.query.id, self.flags, 1, answers, authority, 1 if self.opt else 0)
        message = header + self.question + b"".join(parts) + self.opt
        return self.signer.sign(message) if self.signer is not None else message


def _opt(query: dns.message.Message, rcode: int) -> bytes:
    """The OPT record a response to an EDNS query must carry (RFC 6891 7), with the upper bits of
    an extended rcode; b"" for a query without EDNS."""
    if query.edns < 0:
        return b""
    return b"\x00" + struct.pack("!HHIH", 41, EDNS_PAYLOAD, (rcode >> 4) << 24, 0)


def _empty(query: dns.message.Message, rcode: int, signer: _Signer | None) -> bytes:
    question = query.question[0] if query.question else None
    body = _question_wire(question) if question is not None else b""
    flags = wire.FLAG_QR | (query.flags & wire.FLAG_RD) | (query.opcode() << 11) | (rcode & 0xF)
    opt = _opt(query, rcode)
    counts = (1 if question is not None else 0, 0, 0, 1 if opt else 0)
    message = struct.pack("!HHHHHH", query.id, flags, *counts) + body + opt
    return signer.sign(message) if signer is not None else message


def _header_only(data: bytes, rcode: int) -> bytes:
    query_id, flags = struct.unpack_from("!HH", data)
    return wire.header_only_response(query_id, flags, rcode)


def _tsig_failure(
    data: bytes, error: int, key: dns.tsig.Key | None = None, clock: Callable[[], int] | None = None
) -> Answer:
    """NOTAUTH with the TSIG error, the question kept: in an unsigned TSIG record for a key or MAC
    the server cannot trust (RFC 8945 5.3.2); signed, with the server's time in Other Data, for
    a time outside the fudge (5.2.3), so the client can trust it and see the skew."""
    query_id, flags = struct.unpack_from("!HH", data)
    try:
        query = dns.message.from_wire(data, keyring=False)  # read it without checking the signature
    except dns.exception.DNSException:
        return Answer("other", "notauth", None, iter([wire.header_only_response(query_id, flags, RCODE_NOTAUTH)]))
    question = query.question[0] if query.question else None
    request = _request_type(int(question.rdtype)) if question is not None else "other"
    body = _question_wire(question) if question is not None else b""
    response_flags = wire.FLAG_QR | (flags & (wire.OPCODE_MASK | wire.FLAG_RD)) | RCODE_NOTAUTH
    message = struct.pack("!HHHHHH", query_id, response_flags, 1 if question is not None else 0, 0, 0, 0) + body
    tsig = query.tsig[0] if query.tsig else None
    zone = key_from_wire_labels(list(question.name.labels[:-1])) if question is not None else None
    if error == TSIG_BADTIME and key is not None and clock is not None and tsig is not None:
        now = clock()
        signed = _Signer(key, tsig.mac, clock).sign(message, error, struct.pack("!Q", now)[2:])
        return Answer(request, "notauth", zone, iter([signed]))
    if tsig is not None and query.keyname is not None:
        rdata = _tsig_rdata(
            dns.rdataclass.ANY, dns.rdatatype.TSIG, tsig.algorithm, tsig.time_signed, tsig.fudge, b"", query_id,
            error, b"",
        )  # fmt: skip
        fixed = _name_wire(query.keyname) + struct.pack("!HHI", TYPE_TSIG, CLASS_ANY, 0)
        message = _with_additional(message, fixed, cast(bytes, rdata.to_wire()))
    return Answer(request, "notauth", zone, iter([message]))
