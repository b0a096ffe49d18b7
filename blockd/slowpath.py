"""The dnslib path for queries the byte-level fast path (blockd.wire) declines.

It parses with dnslib and builds blocked answers with dnslib records.  For every query the
fast path accepts, both paths must produce the same bytes (tests/test_wire_equivalence.py),
so this module is also the executable specification of wire.blocked_response.
"""

from __future__ import annotations

import ipaddress
import struct

from dnslib import AAAA, EDNS0, QTYPE, RR, SOA, A, DNSBuffer, DNSError, DNSHeader, DNSLabelError, DNSRecord, EDNSOption

from blockd import wire
from blockd.names import key_from_wire_labels
from blockd.wire import HeaderOnlyError, Query

RCODE_BADVERS = 16


class BadVersion(Exception):
    """EDNS version other than 0: answer BADVERS (RFC 6891 6.1.3)."""

    def __init__(self, query: Query):
        super().__init__("unsupported EDNS version")
        self.query = query


class SlowQuery(Query):
    """A query only dnslib could read: the same interface as wire.Query, built with dnslib."""

    __slots__ = ("record",)
    memoizable = False

    def __init__(self, record: DNSRecord) -> None:
        super().__init__()
        self.record = record

    def blocked_response(self, action: str, ttl: int, sinkhole_a: bytes, sinkhole_aaaa: bytes, ede_text: str) -> bytes:
        return blocked_response_slow(self.record, self, action, ttl, sinkhole_a, sinkhole_aaaa, ede_text)

    def upstream_message(self, forward_ecs: bool) -> bytes:
        return upstream_message_slow(self.record, self, forward_ecs)


def parse_query_slow(data: bytes) -> SlowQuery:
    """Parse a query with dnslib.  Raises Drop, HeaderOnlyError (FORMERR/NOTIMP) or BadVersion."""
    query_id, flags, qdcount, _an, _ns, _ar = wire.read_header(data)
    wire.check_query_header(query_id, flags, qdcount)
    try:
        record = DNSRecord.parse(data)
    except (DNSError, DNSLabelError, struct.error, ValueError, IndexError, UnicodeError) as exc:
        raise HeaderOnlyError(query_id, flags, wire.RCODE_FORMERR, f"unparsable: {exc}") from None
    question = record.q
    buffer = DNSBuffer()
    try:
        buffer.encode_name_nocompress(question.qname)
    except (DNSLabelError, DNSError, UnicodeError) as exc:  # e.g. a label dnslib read as longer than 63
        raise HeaderOnlyError(query_id, flags, wire.RCODE_FORMERR, f"unusable name: {exc}") from None
    buffer.pack("!HH", question.qtype, question.qclass)
    query = SlowQuery(record)
    query.raw = data
    query.id = query_id
    query.flags = flags
    labels: list[bytes] = list(question.qname.label)
    qtype: int = question.qtype
    qclass: int = question.qclass
    query.key = key_from_wire_labels(labels)
    query.qtype = qtype
    query.qclass = qclass
    query.question = bytes(buffer.data)
    opts = [rr for rr in record.ar if rr.rtype == QTYPE.OPT]
    if len(opts) > 1:
        raise HeaderOnlyError(query_id, flags, wire.RCODE_FORMERR, "more than one OPT record (RFC 6891 6.1.1)")
    if opts:
        opt = opts[0]
        if opt.rname.label:
            raise HeaderOnlyError(query_id, flags, wire.RCODE_FORMERR, "OPT owner is not the root (RFC 6891 6.1.2)")
        udp_size: int = opt.rclass
        extended: int = opt.ttl  # extended RCODE, version, DO bit and Z (RFC 6891 6.1.3)
        query.edns = True
        query.udp_size = udp_size
        query.dnssec_ok = bool(extended & 0x8000)
        query.options = _opt_options(data, query_id, flags)
        if (extended >> 16) & 0xFF != 0:
            raise BadVersion(query)
    return query


def _opt_options(data: bytes, query_id: int, flags: int) -> list[tuple[int, bytes]]:
    """The options of the query's OPT record, read from the wire as wire.parse_query reads them.

    dnslib stops reading options when four or fewer bytes remain: it drops a trailing option
    without data (an NSID request, empty padding) and ignores a truncated one, so both paths
    would disagree.  Only called once DNSRecord.parse has accepted data.
    """
    buffer = DNSBuffer(data)
    counts: tuple[int, int, int, int, int, int] = buffer.unpack("!HHHHHH")
    _id, _flags, qdcount, ancount, nscount, arcount = counts
    for _ in range(qdcount):
        buffer.decode_name()
        buffer.get(4)
    for index in range(ancount + nscount + arcount):
        buffer.decode_name()
        fixed: tuple[int, int, int, int] = buffer.unpack("!HHIH")
        rtype, _rclass, _ttl, rdlength = fixed
        start: int = buffer.offset
        buffer.get(rdlength)
        if rtype != QTYPE.OPT or index < ancount + nscount:
            continue
        try:
            return wire.read_options(data, start, start + rdlength)
        except ValueError as exc:
            raise HeaderOnlyError(query_id, flags, wire.RCODE_FORMERR, str(exc)) from None
    return []


def badvers_response(query: Query) -> bytes:
    reply = DNSRecord(_header(query, 0), q=None)
    buffer_question = query.question
    opt = EDNS0(udp_len=wire.SERVER_UDP_PAYLOAD, ext_rcode=RCODE_BADVERS >> 4, flags="do" if query.dnssec_ok else "")
    reply.add_ar(opt)
    packed: bytearray = reply.pack()  # dnslib packs into a bytearray
    bitmap: int = reply.header.bitmap
    # Splice the question in as asked (dnslib would re-encode it).
    header = struct.pack("!HHHHHH", query.id, bitmap, 1, 0, 0, 1)
    return header + buffer_question + packed[12:]


def _header(query: Query, rcode: int) -> DNSHeader:
    return DNSHeader(
        id=query.id,
        qr=1,
        opcode=(query.flags >> 11) & 0xF,
        rd=1 if query.flags & wire.FLAG_RD else 0,
        cd=1 if query.flags & wire.FLAG_CD else 0,
        ra=1,
        rcode=rcode,
    )


def blocked_response_slow(
    record: DNSRecord, query: Query, action: str, ttl: int, sinkhole_a: bytes, sinkhole_aaaa: bytes, ede_text: str
) -> bytes:
    """dnslib twin of wire.blocked_response."""
    rcode = {"refused": wire.RCODE_REFUSED, "nxdomain": wire.RCODE_NXDOMAIN}.get(action, wire.RCODE_NOERROR)
    reply = DNSRecord(_header(query, rcode), q=record.q)
    qname = record.q.qname
    qclass: int = record.q.qclass
    if action == "refused":
        pass
    elif action == "sinkhole" and query.qtype == QTYPE.A and qclass == wire.CLASS_IN:
        reply.add_answer(RR(qname, QTYPE.A, rdata=A(str(ipaddress.IPv4Address(sinkhole_a))), ttl=ttl))
    elif action == "sinkhole" and query.qtype == QTYPE.AAAA and qclass == wire.CLASS_IN:
        reply.add_answer(RR(qname, QTYPE.AAAA, rdata=AAAA(str(ipaddress.IPv6Address(sinkhole_aaaa))), ttl=ttl))
    else:
        soa = SOA(
            "blockd.invalid",
            "hostmaster.blockd.invalid",
            (wire.SOA_SERIAL, wire.SOA_REFRESH, wire.SOA_RETRY, wire.SOA_EXPIRE, ttl),
        )
        reply.add_auth(RR(qname, QTYPE.SOA, rclass=qclass, rdata=soa, ttl=ttl))
    if query.edns:
        ede = EDNSOption(wire.EDNS_OPTION_EDE, struct.pack("!H", wire.EDE_BLOCKED) + ede_text.encode("utf-8"))
        reply.add_ar(EDNS0(udp_len=wire.SERVER_UDP_PAYLOAD, flags="do" if query.dnssec_ok else "", opts=[ede]))
    return bytes(reply.pack())  # dnslib packs into a bytearray


def upstream_message_slow(record: DNSRecord, query: Query, forward_ecs: bool) -> bytes:
    """wire.upstream_message for queries only dnslib could parse: hop-by-hop options removed."""
    drop = {wire.EDNS_OPTION_COOKIE} | (set() if forward_ecs else {wire.EDNS_OPTION_ECS})
    if not any(code in drop for code, _ in query.options):
        return query.raw
    for rr in record.ar:
        if rr.rtype == QTYPE.OPT:
            rr.rdata = [option for option in rr.rdata if option.code not in drop]
    return bytes(record.pack())
