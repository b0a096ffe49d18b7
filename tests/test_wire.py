"""blockd.wire: the byte-level fast path (query parsing and the answers blockd writes itself)."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dnslib
import pytest

from blockd import wire
from blockd.wire import Drop, HeaderOnlyError, Query

SINK_A = bytes([0, 0, 0, 0])
SINK_AAAA = bytes(16)
EDE_TEXT = "blocked by blockd: tiktok.com on list tiktok"


def header(qid: int = 0x1234, flags: int = wire.FLAG_RD, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


def wire_name(*labels: bytes) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def question(name: bytes, qtype: int = wire.TYPE_A, qclass: int = wire.CLASS_IN) -> bytes:
    return name + struct.pack("!HH", qtype, qclass)


def opt(udp_size: int = 1232, flags: int = 0, version: int = 0, options: bytes = b"") -> bytes:
    return b"\x00" + struct.pack("!HHIH", wire.TYPE_OPT, udp_size, (version << 16) | flags, len(options)) + options


def make(name: str, rdtype: str | int = "A", **kwargs) -> tuple[dns.message.QueryMessage, bytes]:
    message = dns.message.make_query(name, rdtype, **kwargs)
    return message, message.to_wire()


def parse(data: bytes) -> Query:
    query = wire.parse_query(data)
    assert query is not None
    return query


# --- parse_query: accepted queries -----------------------------------------------------------


def test_parse_plain_dnspython_query() -> None:
    message, data = make("WwW.TikTok.COM.", "AAAA")
    query = parse(data)
    assert query.raw == data
    assert query.id == message.id
    assert query.flags == message.flags == dns.flags.RD
    assert query.key == "www.tiktok.com"
    assert query.qtype == wire.TYPE_AAAA
    assert query.qclass == wire.CLASS_IN
    assert query.question == b"\x03WwW\x06TikTok\x03COM\x00\x00\x1c\x00\x01"
    assert not query.edns
    assert query.udp_size == 512
    assert query.response_limit == 512
    assert not query.dnssec_ok
    assert query.options == []
    assert query.opt_offset == -1


def test_parse_edns_query() -> None:
    cookie = dns.edns.CookieOption(b"\x01\x02\x03\x04\x05\x06\x07\x08", b"")
    ecs = dns.edns.ECSOption("10.120.3.0", 24)
    message, data = make("tiktok.com", "HTTPS", use_edns=0, payload=4096, want_dnssec=True, options=[cookie, ecs])
    query = parse(data)
    assert query.edns
    assert query.udp_size == 4096
    assert query.response_limit == 4096
    assert query.dnssec_ok
    assert query.qtype == wire.TYPE_HTTPS
    assert query.flags == message.flags
    codes = [code for code, _ in query.options]
    assert codes == [10, wire.EDNS_OPTION_ECS]
    assert query.options[0][1] == b"\x01\x02\x03\x04\x05\x06\x07\x08"
    assert query.options[1][1] == b"\x00\x01\x18\x00\x0a\x78\x03"
    assert data[query.opt_offset] == 0
    assert struct.unpack_from("!H", data, query.opt_offset + 1)[0] == wire.TYPE_OPT


@pytest.mark.parametrize(("payload", "limit"), [(0, 512), (511, 512), (512, 512), (1232, 1232), (65535, 65535)])
def test_response_limit(payload: int, limit: int) -> None:
    _, data = make("tiktok.com", use_edns=0, payload=payload)
    query = parse(data)
    assert query.udp_size == payload
    assert query.response_limit == limit


def test_parse_edns_without_do() -> None:
    _, data = make("tiktok.com", use_edns=0, payload=1232)
    query = parse(data)
    assert query.edns and not query.dnssec_ok and query.options == []


def test_parse_dnslib_query() -> None:
    record = dnslib.DNSRecord.question("Api.TikTokV.com", "TXT")
    record.header.cd = 1
    data = record.pack()
    query = parse(data)
    assert query.id == record.header.id
    assert query.flags & wire.FLAG_RD
    assert query.flags & wire.FLAG_CD
    assert query.key == "api.tiktokv.com"
    assert query.qtype == wire.TYPE_TXT
    assert query.question == b"\x03Api\x07TikTokV\x03com\x00\x00\x10\x00\x01"


def test_parse_dnslib_edns_query() -> None:
    record = dnslib.DNSRecord.question("tiktok.com", "A")
    record.add_ar(dnslib.EDNS0(udp_len=1400, flags="do", opts=[dnslib.EDNSOption(10, b"abcdefgh")]))
    query = parse(record.pack())
    assert query.edns and query.dnssec_ok and query.udp_size == 1400
    assert query.options == [(10, b"abcdefgh")]


def test_parse_handcrafted_flags_and_empty_option() -> None:
    options = struct.pack("!HH", 3, 0)  # NSID request: an option with no data
    data = (
        header(0xBEEF, wire.FLAG_CD | wire.FLAG_AD, ar=1)
        + question(wire_name(b"a", b"example"))
        + opt(1500, 0x8000, options=options)
    )
    query = parse(data)
    assert query.id == 0xBEEF
    assert query.flags == wire.FLAG_CD | wire.FLAG_AD
    assert query.options == [(3, b"")]
    assert query.dnssec_ok


def test_wildcard_and_underscore_labels_are_accepted() -> None:
    query = parse(header() + question(wire_name(b"*", b"_Srv", b"Example", b"com")))
    assert query.key == "*._srv.example.com"


def test_max_length_name_is_accepted() -> None:
    labels = [b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 61]
    query = parse(header() + question(wire_name(*labels)))
    assert len(query.key) == 253


# --- parse_query: declined (left to the slow path) -------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(header() + b"\x03www\xc0\x0c" + struct.pack("!HH", 1, 1), id="compression-pointer"),
        pytest.param(header() + b"\xc0\x0c" + struct.pack("!HH", 1, 1), id="compression-pointer-first"),
        pytest.param(header() + b"\x41" + b"a" * 65 + b"\x00" + struct.pack("!HH", 1, 1), id="label-type-01"),
        pytest.param(header() + question(wire_name(b"a.b", b"com")), id="dot-in-label"),
        pytest.param(header() + question(wire_name(b"a\\b", b"com")), id="backslash-in-label"),
        pytest.param(header() + question(wire_name("bücher".encode(), b"de")), id="non-ascii"),
        pytest.param(header() + question(wire_name(b"a b", b"com")), id="space-in-label"),
        pytest.param(header() + question(wire_name(b"a\x00b", b"com")), id="nul-in-label"),
        pytest.param(header() + question(wire_name(b"tiktok", b"com"), qclass=3), id="class-CH"),
        pytest.param(header() + question(wire_name(b"tiktok", b"com"), qclass=255), id="class-ANY"),
        pytest.param(header(ar=2) + question(wire_name(b"tiktok", b"com")) + opt() + opt(), id="arcount-2"),
        pytest.param(
            header(an=1) + question(wire_name(b"tiktok", b"com")) + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c"
            b"\x00\x04\x01\x02\x03\x04",
            id="ancount-1",
        ),
        pytest.param(header(ns=1) + question(wire_name(b"tiktok", b"com")), id="nscount-1"),
        pytest.param(header(ar=1) + question(wire_name(b"tiktok", b"com")) + opt(version=1), id="edns-version-1"),
        pytest.param(header(ar=1) + question(wire_name(b"tiktok", b"com")) + b"\x01x" + opt()[1:], id="opt-with-owner"),
        pytest.param(
            header(ar=1) + question(wire_name(b"tiktok", b"com")) + b"\x00\x00\x01\x00\x01\x00\x00\x00\x00\x00\x00",
            id="additional-not-opt",
        ),
        pytest.param(header(ar=1) + question(wire_name(b"tiktok", b"com")) + b"\x00\x00", id="opt-short"),
        pytest.param(header() + question(b"\x00"), id="root"),
        pytest.param(header() + question(wire_name(b"foo", b"invalid")), id="invalid-tld"),
        pytest.param(header() + question(wire_name(b"blockd", b"INVALID")), id="blockd-invalid"),
        pytest.param(header() + question(wire_name(b"invalid")), id="invalid"),
        pytest.param(header() + question(wire_name(b"hostmaster", b"blockd", b"invalid")), id="hostmaster"),
    ],
)
def test_declined(data: bytes) -> None:
    assert wire.parse_query(data) is None


def test_declined_dnspython_queries() -> None:
    assert wire.parse_query(make("tiktok.com", "A", rdclass=dns.rdataclass.CH)[1]) is None
    assert wire.parse_query(make("version.bind", "TXT", rdclass=dns.rdataclass.CH)[1]) is None
    assert wire.parse_query(make("tiktok.com", "A", use_edns=1)[1]) is None
    assert wire.parse_query(make("x.invalid", "A")[1]) is None


# --- parse_query: dropped or answered with a bare header -------------------------------------


@pytest.mark.parametrize("length", [0, 1, 2, 11])
def test_short_packets_are_dropped(length: int) -> None:
    with pytest.raises(Drop):
        wire.parse_query(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00"[:length])


def test_responses_are_dropped() -> None:
    _, data = make("tiktok.com")
    response = bytearray(data)
    response[2] |= 0x80
    with pytest.raises(Drop):
        wire.parse_query(bytes(response))
    with pytest.raises(Drop):
        wire.read_header(bytes(response))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (header(qd=0), "QDCOUNT is 0"),
        (header(qd=0, ar=1) + opt(), "QDCOUNT is 0"),
        (header(qd=2) + question(wire_name(b"a", b"com")) * 2, "QDCOUNT is 2"),
        (header() + wire_name(b"tiktok", b"com") + b"\x00\x01\x00", "question truncated"),
        (header() + wire_name(b"tiktok", b"com"), "question truncated"),
        (header() + b"\x06tiktok\x03com", "runs past the end"),
        (header() + b"\x06tik", "runs past the end"),
        (header(), "runs past the end"),
        (header() + b"".join([b"\x3f" + b"a" * 63] * 4) + b"\x00\x00\x01\x00\x01", "longer than 255"),
        (header(ar=1) + question(wire_name(b"a", b"com")) + opt(options=b"\x00\x0a\x00\x08abc"), "option truncated"),
        (header(ar=1) + question(wire_name(b"a", b"com")) + opt(options=b"\x00\x0a\x00"), "option truncated"),
        (header(ar=1) + question(wire_name(b"a", b"com")) + opt()[:-2] + b"\x00\x05ab", "OPT record truncated"),
    ],
)
def test_formerr(data: bytes, reason: str) -> None:
    with pytest.raises(HeaderOnlyError) as info:
        wire.parse_query(data)
    assert info.value.rcode == wire.RCODE_FORMERR
    assert info.value.query_id == 0x1234
    assert info.value.flags == struct.unpack_from("!H", data, 2)[0]
    assert reason in str(info.value)


@pytest.mark.parametrize("opcode", [dns.opcode.NOTIFY, dns.opcode.UPDATE, dns.opcode.IQUERY, dns.opcode.STATUS])
def test_notimp_for_other_opcodes(opcode: int) -> None:
    message, data = make("tiktok.com", "SOA")
    message.set_opcode(opcode)
    data = message.to_wire()
    with pytest.raises(HeaderOnlyError) as info:
        wire.parse_query(data)
    assert info.value.rcode == wire.RCODE_NOTIMP
    assert info.value.query_id == message.id
    response = dns.message.from_wire(wire.header_only_response(info.value.query_id, info.value.flags, info.value.rcode))
    assert response.opcode() == opcode
    assert response.rcode() == dns.rcode.NOTIMP


# --- error_response and header_only_response -------------------------------------------------


def test_header_only_response() -> None:
    data = wire.header_only_response(0xABCD, wire.FLAG_RD | wire.FLAG_CD | wire.FLAG_AD | wire.FLAG_TC, 1)
    assert len(data) == 12
    qid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", data)
    assert (qid, qd, an, ns, ar) == (0xABCD, 0, 0, 0, 0)
    # RA clear: FORMERR and NOTIMP are not answers from the resolver (as BIND 9.18 and Unbound 1.17).
    assert flags == wire.FLAG_QR | wire.FLAG_RD | wire.FLAG_CD | wire.RCODE_FORMERR
    message = dns.message.from_wire(data)
    assert message.id == 0xABCD
    assert message.rcode() == dns.rcode.FORMERR
    assert message.question == []


def test_error_response_without_edns() -> None:
    _, data = make("WwW.TikTok.COM", "A")
    query = parse(data)
    answer = wire.error_response(query, wire.RCODE_SERVFAIL, wire.EDE_NO_REACHABLE_AUTHORITY, "no upstream")
    message = dns.message.from_wire(answer)
    assert message.id == query.id
    assert message.rcode() == dns.rcode.SERVFAIL
    assert message.flags & dns.flags.QR and message.flags & dns.flags.RA and message.flags & dns.flags.RD
    assert message.edns == -1
    assert message.answer == message.authority == message.additional == []
    assert answer[12:] == query.question
    assert str(message.question[0].name) == "WwW.TikTok.COM."


def test_error_response_with_edns_and_ede() -> None:
    _, data = make("tiktok.com", "A", use_edns=0, want_dnssec=True)
    query = parse(data)
    answer = wire.error_response(query, wire.RCODE_REFUSED, wire.EDE_PROHIBITED, "client not allowed")
    message = dns.message.from_wire(answer)
    assert message.rcode() == dns.rcode.REFUSED
    assert message.edns == 0
    assert message.payload == wire.SERVER_UDP_PAYLOAD
    assert message.ednsflags & dns.flags.DO
    (ede,) = message.options
    assert isinstance(ede, dns.edns.EDEOption)
    assert ede.code == wire.EDE_PROHIBITED
    assert ede.text == "client not allowed"


def test_error_response_extra_flags_and_no_ede() -> None:
    _, data = make("tiktok.com", "A", use_edns=0)
    query = parse(data)
    answer = wire.error_response(query, wire.RCODE_NOERROR, flags=wire.FLAG_TC)
    message = dns.message.from_wire(answer)
    assert message.flags & dns.flags.TC
    assert message.edns == 0
    assert message.options == ()
    assert not message.ednsflags & dns.flags.DO


def test_opt_record_layout() -> None:
    assert wire.opt_record(False) == b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
    assert wire.opt_record(True) == b"\x00\x00\x29\x04\xd0\x00\x00\x80\x00\x00\x00"
    with_ede = wire.opt_record(False, 15, "é")
    assert with_ede[-8:] == b"\x00\x0f\x00\x04\x00\x0f\xc3\xa9"


# --- blocked_response ------------------------------------------------------------------------


def blocked(
    name: str = "WwW.TikTok.COM",
    rdtype: str | int = "A",
    action: str = "sinkhole",
    ttl: int = 300,
    sink_a: bytes = SINK_A,
    sink_aaaa: bytes = SINK_AAAA,
    text: str = EDE_TEXT,
    **kwargs,
) -> tuple[Query, bytes, dns.message.Message]:
    _, data = make(name, rdtype, **kwargs)
    query = parse(data)
    answer = wire.blocked_response(query, action, ttl, sink_a, sink_aaaa, text)
    return query, answer, dns.message.from_wire(answer)


def check_common(query: Query, answer: bytes, message: dns.message.Message) -> None:
    assert message.id == query.id
    assert message.flags & dns.flags.QR
    assert message.flags & dns.flags.RA
    assert not message.flags & dns.flags.AA
    assert not message.flags & dns.flags.TC
    assert bool(message.flags & dns.flags.RD) == bool(query.flags & wire.FLAG_RD)
    assert bool(message.flags & dns.flags.CD) == bool(query.flags & wire.FLAG_CD)
    assert message.opcode() == dns.opcode.QUERY
    # The question is echoed byte for byte, in the client's case.
    assert answer[12 : 12 + len(query.question)] == query.question
    assert len(message.question) == 1


def check_soa(message: dns.message.Message, owner: str, ttl: int) -> None:
    (rrset,) = message.authority
    assert rrset.rdtype == dns.rdatatype.SOA
    assert str(rrset.name) == owner
    assert rrset.ttl == ttl
    (soa,) = rrset
    assert str(soa.mname) == "blockd.invalid."
    assert str(soa.rname) == "hostmaster.blockd.invalid."
    assert (soa.serial, soa.refresh, soa.retry, soa.expire, soa.minimum) == (1, 3600, 600, 86400, ttl)


def test_sinkhole_a() -> None:
    query, answer, message = blocked(rdtype="A", ttl=300)
    check_common(query, answer, message)
    assert message.rcode() == dns.rcode.NOERROR
    (rrset,) = message.answer
    assert str(rrset.name) == "WwW.TikTok.COM."
    assert rrset.rdtype == dns.rdatatype.A
    assert rrset.ttl == 300
    assert [r.address for r in rrset] == ["0.0.0.0"]
    assert message.authority == []
    assert message.edns == -1
    assert str(message.question[0].name) == "WwW.TikTok.COM."


def test_sinkhole_aaaa() -> None:
    query, answer, message = blocked(rdtype="AAAA", ttl=60)
    check_common(query, answer, message)
    (rrset,) = message.answer
    assert rrset.rdtype == dns.rdatatype.AAAA
    assert rrset.ttl == 60
    assert [r.address for r in rrset] == ["::"]
    assert message.authority == []


def test_sinkhole_custom_addresses() -> None:
    _, _, message = blocked(rdtype="A", sink_a=bytes([192, 0, 2, 1]))
    assert [r.address for r in message.answer[0]] == ["192.0.2.1"]
    _, _, message = blocked(rdtype="AAAA", sink_aaaa=bytes.fromhex("20010db8" + "00" * 11 + "01"))
    assert [r.address for r in message.answer[0]] == ["2001:db8::1"]


@pytest.mark.parametrize("rdtype", ["HTTPS", "SVCB", "TXT", "MX", "ANY", "NS", "SOA", "CNAME", "SRV", "PTR", 9999])
def test_sinkhole_other_types_are_nodata_with_soa(rdtype: str | int) -> None:
    query, answer, message = blocked(rdtype=rdtype, ttl=120)
    check_common(query, answer, message)
    assert message.rcode() == dns.rcode.NOERROR
    assert message.answer == []
    check_soa(message, "WwW.TikTok.COM.", 120)


@pytest.mark.parametrize("rdtype", ["A", "AAAA", "HTTPS", "TXT"])
def test_nxdomain(rdtype: str) -> None:
    query, answer, message = blocked(rdtype=rdtype, action="nxdomain", ttl=30)
    check_common(query, answer, message)
    assert message.rcode() == dns.rcode.NXDOMAIN
    assert message.answer == []
    check_soa(message, "WwW.TikTok.COM.", 30)


@pytest.mark.parametrize("rdtype", ["A", "AAAA", "HTTPS", "MX"])
def test_nodata(rdtype: str) -> None:
    query, answer, message = blocked(rdtype=rdtype, action="nodata", ttl=0)
    check_common(query, answer, message)
    assert message.rcode() == dns.rcode.NOERROR
    assert message.answer == []
    check_soa(message, "WwW.TikTok.COM.", 0)


@pytest.mark.parametrize("rdtype", ["A", "AAAA", "HTTPS"])
def test_refused(rdtype: str) -> None:
    query, answer, message = blocked(rdtype=rdtype, action="refused")
    check_common(query, answer, message)
    assert message.rcode() == dns.rcode.REFUSED
    assert message.answer == message.authority == []
    assert len(answer) == 12 + len(query.question)


@pytest.mark.parametrize("action", ["sinkhole", "nxdomain", "nodata", "refused"])
@pytest.mark.parametrize("rdtype", ["A", "AAAA", "HTTPS"])
@pytest.mark.parametrize("dnssec", [False, True])
def test_ede_when_query_had_edns(action: str, rdtype: str, dnssec: bool) -> None:
    text = "blocked by blockd: tiktok.com on list tiktok — «ünïcode»"
    query, answer, message = blocked(rdtype=rdtype, action=action, text=text, use_edns=0, want_dnssec=dnssec)
    check_common(query, answer, message)
    assert message.edns == 0
    assert message.payload == wire.SERVER_UDP_PAYLOAD
    assert bool(message.ednsflags & dns.flags.DO) == dnssec
    (ede,) = message.options
    assert isinstance(ede, dns.edns.EDEOption)
    assert ede.code == dns.edns.EDECode.BLOCKED == 15
    assert ede.text == text


@pytest.mark.parametrize("action", ["sinkhole", "nxdomain", "nodata", "refused"])
def test_no_opt_without_edns(action: str) -> None:
    _query, answer, message = blocked(action=action, rdtype="TXT")
    assert message.edns == -1
    assert message.additional == []
    assert struct.unpack_from("!H", answer, 10)[0] == 0


def test_empty_ede_text() -> None:
    _, _, message = blocked(text="", use_edns=0)
    (ede,) = message.options
    assert ede.code == 15
    assert not ede.text


@pytest.mark.parametrize("flags", [0, wire.FLAG_RD, wire.FLAG_CD, wire.FLAG_RD | wire.FLAG_CD | wire.FLAG_AD])
def test_id_rd_cd_copied(flags: int) -> None:
    data = header(0x0F0F, flags) + question(wire_name(b"tiktok", b"com"))
    query = parse(data)
    answer = wire.blocked_response(query, "nxdomain", 10, SINK_A, SINK_AAAA, "x")
    qid, response_flags = struct.unpack_from("!HH", answer)
    assert qid == 0x0F0F
    assert response_flags == wire.FLAG_QR | wire.FLAG_RA | (flags & (wire.FLAG_RD | wire.FLAG_CD)) | 3


def test_counts_in_header() -> None:
    for action, rdtype, counts in [
        ("sinkhole", "A", (1, 1, 0, 1)),
        ("sinkhole", "TXT", (1, 0, 1, 1)),
        ("nxdomain", "A", (1, 0, 1, 1)),
        ("nodata", "AAAA", (1, 0, 1, 1)),
        ("refused", "A", (1, 0, 0, 1)),
    ]:
        _, answer, _ = blocked(action=action, rdtype=rdtype, use_edns=0)
        assert struct.unpack_from("!HHHH", answer, 4) == counts, (action, rdtype)


def test_soa_compression_points_into_the_message() -> None:
    query, answer, _ = blocked(rdtype="TXT", action="nodata")
    soa_at = 12 + len(query.question)
    assert answer[soa_at : soa_at + 2] == b"\xc0\x0c"
    mname_at = soa_at + 12
    assert answer[mname_at : mname_at + len(wire.SOA_MNAME)] == wire.SOA_MNAME
    rname_pointer_at = mname_at + len(wire.SOA_MNAME) + len(wire.SOA_RNAME_LABEL)
    assert struct.unpack_from("!H", answer, rname_pointer_at)[0] == 0xC000 | mname_at


def test_blocked_response_is_parsable_by_dnslib_too() -> None:
    _, answer, _ = blocked(rdtype="HTTPS", action="nxdomain", use_edns=0)
    record = dnslib.DNSRecord.parse(answer)
    assert record.header.rcode == 3
    assert str(record.auth[0].rdata.mname) == "blockd.invalid."
