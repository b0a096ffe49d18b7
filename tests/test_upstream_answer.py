"""blockd.upstream_answer.analyze: what the answer policy and the cache read off an upstream answer.

Answers are built with dnslib, with dnspython (types dnslib cannot build or parse: DNAME, SVCB)
and by hand (malformed ones).  A hypothesis fuzz checks that damaged answers only ever raise
MalformedAnswer.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rdata
import dns.rrset
import pytest
from dnslib import AAAA, CNAME, EDNS0, NS, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockd.upstream_answer import AnswerInfo, MalformedAnswer, analyze

# ---------------------------------------------------------------------------------------------
# builders


def dnslib_reply(qname: str, qtype: str = "A", rcode: int = RCODE.NOERROR) -> DNSRecord:
    reply = DNSRecord.question(qname, qtype).reply()
    reply.header.rcode = rcode
    return reply


def chain_names(depth: int) -> list[str]:
    """Owner then `depth` CNAME targets, every one in mixed case."""
    names = ["WwW.ExAmPle.COM"]
    names += [f"Hop{index}.CDN-{index}.Example-Edge.NeT" for index in range(1, depth + 1)]
    return names


def dnslib_chain(depth: int) -> bytes:
    names = chain_names(depth)
    reply = dnslib_reply(names[0])
    for owner, target in itertools.pairwise(names):
        reply.add_answer(RR(owner, QTYPE.CNAME, rdata=CNAME(target), ttl=600))
    reply.add_answer(RR(names[-1], QTYPE.A, rdata=A("192.0.2.44"), ttl=60))
    return bytes(reply.pack())


def dnspython_chain(depth: int) -> bytes:
    names = chain_names(depth)
    response = dns.message.make_response(dns.message.make_query(names[0], "A"))
    for owner, target in itertools.pairwise(names):
        response.answer.append(dns.rrset.from_text(owner + ".", 600, "IN", "CNAME", target + "."))
    response.answer.append(dns.rrset.from_text(names[-1] + ".", 60, "IN", "A", "192.0.2.44"))
    return response.to_wire()


def with_soa(reply: DNSRecord, ttl: int, minimum: int, zone: str = "example.com") -> DNSRecord:
    times = (2024010101, 7200, 900, 1209600, minimum)
    reply.add_auth(RR(zone, QTYPE.SOA, rdata=SOA(f"ns1.{zone}", f"hostmaster.{zone}", times), ttl=ttl))
    return reply


def header(qdcount: int = 1, ancount: int = 0, nscount: int = 0, arcount: int = 0, flags: int = 0x8180) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, flags, qdcount, ancount, nscount, arcount)


def wire_name(*labels: bytes) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


QUESTION = wire_name(b"www", b"example", b"com") + struct.pack("!HH", 1, 1)


# ---------------------------------------------------------------------------------------------
# names: CNAME chains, DNAME, HTTPS/SVCB targets


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("build", [dnslib_chain, dnspython_chain], ids=["dnslib", "dnspython"])
def test_cname_chain_gives_every_owner_and_target_lowercase(build, depth: int) -> None:
    info = analyze(build(depth))
    expected = tuple(name.lower() for name in chain_names(depth))
    assert info.names == expected
    assert info.addresses == (ipaddress.IPv4Address("192.0.2.44"),)
    assert info.rcode == 0
    assert info.lifetime == 60
    assert len(info.ttl_fields) == depth + 1


def test_dname_target_is_a_name() -> None:
    response = dns.message.make_response(dns.message.make_query("Www.Cloaked.EXAMPLE.", "A"))
    response.answer.append(dns.rrset.from_text("Cloaked.EXAMPLE.", 300, "IN", "DNAME", "Tiktok.COM."))
    response.answer.append(dns.rrset.from_text("Www.Cloaked.EXAMPLE.", 300, "IN", "CNAME", "Www.Tiktok.COM."))
    response.answer.append(dns.rrset.from_text("Www.Tiktok.COM.", 30, "IN", "A", "192.0.2.9"))
    info = analyze(response.to_wire())
    assert info.names == ("cloaked.example", "tiktok.com", "www.cloaked.example", "www.tiktok.com")
    assert info.addresses == (ipaddress.IPv4Address("192.0.2.9"),)
    assert info.lifetime == 30


def test_https_hints_from_dnslib() -> None:
    reply = dnslib_reply("x", "HTTPS")
    reply.add_answer(*RR.fromZone("x. 300 IN HTTPS 1 . alpn=h2 ipv4hint=198.51.100.7 ipv6hint=2001:db8::7"))
    info = analyze(reply.pack())
    assert info.names == ("x",)  # "." (the owner itself) adds no target name
    assert info.addresses == ()
    assert info.hint_addresses == (ipaddress.IPv4Address("198.51.100.7"), ipaddress.IPv6Address("2001:db8::7"))
    assert info.lifetime == 300


def test_https_alias_target_from_dnslib() -> None:
    reply = dnslib_reply("Alias.Example", "HTTPS")
    reply.add_answer(*RR.fromZone("Alias.Example. 120 IN HTTPS 0 Svc.TikTokCDN.Com."))
    info = analyze(reply.pack())
    assert info.names == ("alias.example", "svc.tiktokcdn.com")
    assert info.hint_addresses == ()


def test_svcb_target_and_hints_from_dnspython() -> None:
    query = dns.message.make_query("_dns.Resolver.Example.", "SVCB")
    response = dns.message.make_response(query)
    rdata = dns.rdata.from_text(
        "IN", "SVCB", "1 Dns.Example.NET. alpn=h2,h3 ipv4hint=192.0.2.9,192.0.2.10 ipv6hint=2001:db8::9,2001:db8::a"
    )
    response.answer.append(dns.rrset.from_rdata("_dns.Resolver.Example.", 60, rdata))
    info = analyze(response.to_wire())
    assert info.names == ("_dns.resolver.example", "dns.example.net")
    assert info.hint_addresses == tuple(
        ipaddress.ip_address(text) for text in ("192.0.2.9", "192.0.2.10", "2001:db8::9", "2001:db8::a")
    )
    assert info.addresses == ()
    assert info.lifetime == 60


def test_names_are_deduplicated_in_order() -> None:
    reply = dnslib_reply("a.example")
    reply.add_answer(RR("a.example", QTYPE.CNAME, rdata=CNAME("B.example"), ttl=60))
    reply.add_answer(RR("b.example", QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
    reply.add_answer(RR("B.EXAMPLE", QTYPE.A, rdata=A("192.0.2.2"), ttl=60))
    assert analyze(reply.pack()).names == ("a.example", "b.example")


# ---------------------------------------------------------------------------------------------
# addresses: answer section only


def test_addresses_only_from_the_answer_section() -> None:
    reply = dnslib_reply("www.example.com", "A")
    reply.add_answer(RR("www.example.com", QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
    reply.add_answer(RR("www.example.com", QTYPE.AAAA, rdata=AAAA("2001:db8::1"), ttl=60))
    reply.add_auth(RR("example.com", QTYPE.NS, rdata=NS("ns1.example.com"), ttl=60))
    reply.add_ar(RR("ns1.example.com", QTYPE.A, rdata=A("198.51.100.53"), ttl=60))
    reply.add_ar(RR("ns1.example.com", QTYPE.AAAA, rdata=AAAA("2001:db8::53"), ttl=60))
    reply.add_ar(EDNS0(udp_len=1232))
    info = analyze(reply.pack())
    assert info.addresses == (ipaddress.IPv4Address("192.0.2.1"), ipaddress.IPv6Address("2001:db8::1"))
    assert info.names == ("www.example.com",)  # authority/additional owners are not names to check


def test_address_records_with_a_wrong_length_are_not_addresses() -> None:
    body = QUESTION + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 5) + bytes([192, 0, 2, 1, 0])
    assert analyze(header(ancount=1) + body).addresses == ()


# ---------------------------------------------------------------------------------------------
# TTL fields


def test_ttl_fields_point_at_the_ttl_bytes() -> None:
    reply = dnslib_reply("WWW.example.com", "A")
    reply.add_answer(RR("WWW.example.com", QTYPE.CNAME, rdata=CNAME("edge.example.net"), ttl=600))
    reply.add_answer(RR("edge.example.net", QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
    reply.add_auth(RR("example.net", QTYPE.NS, rdata=NS("ns1.example.net"), ttl=3600))
    reply.add_ar(RR("ns1.example.net", QTYPE.A, rdata=A("198.51.100.53"), ttl=7200))
    reply.add_ar(EDNS0(flags="do", udp_len=1232))  # OPT "TTL" is ext-rcode/version/DO: never a TTL
    packed = reply.pack()
    info = analyze(packed)
    assert [ttl for _, ttl in info.ttl_fields] == [600, 60, 3600, 7200]
    for offset, ttl in info.ttl_fields:
        assert struct.unpack_from("!I", packed, offset)[0] == ttl
    patched = bytearray(packed)
    for index, (offset, _) in enumerate(info.ttl_fields):
        struct.pack_into("!I", patched, offset, 1000 + index)
    message = dns.message.from_wire(bytes(patched))
    ttls = [rrset.ttl for section in (message.answer, message.authority, message.additional) for rrset in section]
    assert ttls == [1000, 1001, 1002, 1003]
    assert message.ednsflags & dns.flags.DO  # the OPT record was left alone
    assert message.payload == 1232
    assert analyze(bytes(patched)).ttl_fields == tuple(
        (offset, 1000 + i) for i, (offset, _) in enumerate(info.ttl_fields)
    )


def test_ttl_fields_in_a_dnspython_answer_with_opt() -> None:
    query = dns.message.make_query("example.org", "AAAA", want_dnssec=True)
    response = dns.message.make_response(query)
    response.use_edns(0, dns.flags.DO, 1232)
    response.answer.append(dns.rrset.from_text("example.org.", 1234, "IN", "AAAA", "2001:db8::5"))
    packed = response.to_wire()
    info = analyze(packed)
    assert len(info.ttl_fields) == 1  # the OPT record is excluded
    offset, ttl = info.ttl_fields[0]
    assert ttl == 1234
    patched = bytearray(packed)
    struct.pack_into("!I", patched, offset, 77)
    message = dns.message.from_wire(bytes(patched))
    assert message.answer[0].ttl == 77
    assert message.ednsflags & dns.flags.DO


def test_ttl_with_the_top_bit_set_counts_as_zero() -> None:
    """RFC 2181 section 8: such a TTL must be treated as zero, so the answer is not cached."""
    body = QUESTION + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0xFFFFFFFF, 4) + bytes([192, 0, 2, 1])
    info = analyze(header(ancount=1) + body)
    assert info.ttl_fields == ((12 + len(QUESTION) + 6, 0),)
    assert info.lifetime == 0


# ---------------------------------------------------------------------------------------------
# lifetime


def test_lifetime_is_the_smallest_ttl_of_a_positive_answer() -> None:
    reply = dnslib_reply("www.example.com")
    reply.add_answer(RR("www.example.com", QTYPE.CNAME, rdata=CNAME("edge.example.net"), ttl=600))
    reply.add_answer(RR("edge.example.net", QTYPE.A, rdata=A("192.0.2.1"), ttl=45))
    reply.add_answer(RR("edge.example.net", QTYPE.A, rdata=A("192.0.2.2"), ttl=300))
    assert analyze(reply.pack()).lifetime == 45


def test_lifetime_counts_every_section_of_a_positive_answer() -> None:
    reply = dnslib_reply("www.example.com")
    reply.add_answer(RR("www.example.com", QTYPE.A, rdata=A("192.0.2.1"), ttl=300))
    reply.add_ar(RR("ns1.example.com", QTYPE.A, rdata=A("192.0.2.53"), ttl=20))
    assert analyze(reply.pack()).lifetime == 20


@pytest.mark.parametrize("rcode", [RCODE.NXDOMAIN, RCODE.NOERROR], ids=["nxdomain", "nodata"])
@pytest.mark.parametrize(("soa_ttl", "minimum", "expected"), [(900, 60, 60), (30, 3600, 30), (0, 300, 0)])
def test_negative_lifetime_is_rfc2308(rcode: int, soa_ttl: int, minimum: int, expected: int) -> None:
    reply = with_soa(dnslib_reply("gone.example.com", "AAAA", rcode), soa_ttl, minimum)
    info = analyze(reply.pack())
    assert info.rcode == rcode
    assert info.lifetime == expected
    assert info.names == ()  # the SOA owner is not in the answer section


def test_negative_lifetime_with_edns() -> None:
    reply = with_soa(dnslib_reply("gone.example.com", "A", RCODE.NXDOMAIN), 600, 120)
    reply.add_ar(EDNS0(flags="do", udp_len=1232))
    assert analyze(reply.pack()).lifetime == 120


def test_nxdomain_after_a_cname_uses_the_soa() -> None:
    reply = dnslib_reply("www.example.com", "A", RCODE.NXDOMAIN)
    reply.add_answer(RR("www.example.com", QTYPE.CNAME, rdata=CNAME("gone.example.net"), ttl=600))
    with_soa(reply, 900, 90, zone="example.net")
    info = analyze(reply.pack())
    assert info.lifetime == 90
    assert info.names == ("www.example.com", "gone.example.net")


def test_only_an_authority_soa_sets_the_negative_lifetime() -> None:
    soa = SOA("ns1.example.com", "hostmaster.example.com", (1, 7200, 900, 1209600, 60))
    reply = dnslib_reply("gone.example.com", "A", RCODE.NXDOMAIN)
    reply.add_ar(RR("example.com", QTYPE.SOA, rdata=soa, ttl=600))
    assert analyze(bytes(reply.pack())).lifetime is None
    positive = dnslib_reply("example.com", "SOA")
    positive.add_answer(RR("example.com", QTYPE.SOA, rdata=soa, ttl=600))
    assert analyze(bytes(positive.pack())).lifetime == 600  # an SOA asked for is a positive answer


@pytest.mark.parametrize("rcode", [RCODE.NXDOMAIN, RCODE.NOERROR], ids=["nxdomain", "nodata"])
def test_negative_answer_without_soa_is_not_cacheable(rcode: int) -> None:
    reply = dnslib_reply("gone.example.com", "A", rcode)
    reply.add_auth(RR("example.com", QTYPE.NS, rdata=NS("ns1.example.com"), ttl=600))
    assert analyze(reply.pack()).lifetime is None
    assert analyze(dnslib_reply("gone.example.com", "A", rcode).pack()).lifetime is None


@pytest.mark.parametrize("rcode", [RCODE.SERVFAIL, RCODE.REFUSED, RCODE.FORMERR, RCODE.NOTIMP])
def test_error_answers_are_not_cacheable(rcode: int) -> None:
    reply = dnslib_reply("www.example.com", "A", rcode)
    with_soa(reply, 600, 600)
    assert analyze(reply.pack()).lifetime is None
    reply = dnslib_reply("www.example.com", "A", rcode)
    reply.add_answer(RR("www.example.com", QTYPE.A, rdata=A("192.0.2.1"), ttl=300))
    info = analyze(reply.pack())
    assert info.rcode == rcode
    assert info.lifetime is None


def test_truncated_answers_are_not_cacheable() -> None:
    reply = dnslib_reply("www.example.com")
    reply.header.tc = 1
    assert analyze(reply.pack()).lifetime is None
    reply.add_answer(RR("www.example.com", QTYPE.A, rdata=A("192.0.2.1"), ttl=300))
    info = analyze(reply.pack())
    assert info.lifetime is None
    assert info.addresses == (ipaddress.IPv4Address("192.0.2.1"),)  # still inspected by the policy
    nxdomain = with_soa(dnslib_reply("gone.example.com", "A", RCODE.NXDOMAIN), 600, 600)
    nxdomain.header.tc = 1
    assert analyze(nxdomain.pack()).lifetime is None


# ---------------------------------------------------------------------------------------------
# malformed answers


def sample_answers() -> list[bytes]:
    chain = dnslib_chain(3)
    https = dnslib_reply("x.example", "HTTPS")
    https.add_answer(*RR.fromZone("x.example. 300 IN HTTPS 1 . alpn=h2 ipv4hint=198.51.100.7 ipv6hint=2001:db8::7"))
    https.add_ar(EDNS0(flags="do", udp_len=1232))
    nxdomain = with_soa(dnslib_reply("gone.example.com", "A", RCODE.NXDOMAIN), 900, 60)
    nodata = with_soa(dnslib_reply("www.example.com", "TXT"), 900, 60)
    mixed = dnslib_reply("www.example.com", "A")
    mixed.add_answer(RR("www.example.com", QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
    mixed.add_answer(RR("www.example.com", QTYPE.TXT, rdata=TXT("hello"), ttl=60))
    mixed.add_auth(RR("example.com", QTYPE.NS, rdata=NS("ns1.example.com"), ttl=60))
    mixed.add_ar(RR("ns1.example.com", QTYPE.AAAA, rdata=AAAA("2001:db8::53"), ttl=60))
    svcb = dns.message.make_response(dns.message.make_query("_dns.resolver.example.", "SVCB"))
    svcb.answer.append(
        dns.rrset.from_rdata(
            "_dns.resolver.example.", 60, dns.rdata.from_text("IN", "SVCB", "1 dns.example.net. ipv4hint=192.0.2.9")
        )
    )
    dname = dns.message.make_response(dns.message.make_query("www.a.example.", "A"))
    dname.answer.append(dns.rrset.from_text("a.example.", 300, "IN", "DNAME", "b.example."))
    return [chain, *(bytes(r.pack()) for r in (https, nxdomain, nodata, mixed)), svcb.to_wire(), dname.to_wire()]


SAMPLES = sample_answers()


def test_the_samples_are_valid() -> None:
    for sample in SAMPLES:
        assert isinstance(analyze(sample), AnswerInfo)
        dns.message.from_wire(sample)


@pytest.mark.parametrize("length", range(12))
def test_shorter_than_a_header(length: int) -> None:
    with pytest.raises(MalformedAnswer):
        analyze(SAMPLES[0][:length])


@pytest.mark.parametrize("index", range(len(SAMPLES)))
def test_every_truncation_is_malformed(index: int) -> None:
    sample = SAMPLES[index]
    for length in range(12, len(sample)):
        with pytest.raises(MalformedAnswer):
            analyze(sample[:length])


def test_question_truncated_in_type_and_class() -> None:
    packed = header(qdcount=1) + QUESTION
    assert analyze(packed).lifetime is None
    for cut in range(1, 5):
        with pytest.raises(MalformedAnswer, match="question truncated"):
            analyze(packed[:-cut])


def test_record_header_truncated() -> None:
    body = QUESTION + b"\xc0\x0c" + struct.pack("!HHI", 1, 1, 60)  # no RDLENGTH
    with pytest.raises(MalformedAnswer, match="record header"):
        analyze(header(ancount=1) + body)


def test_rdata_truncated() -> None:
    body = QUESTION + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([192, 0, 2])
    with pytest.raises(MalformedAnswer, match="rdata truncated"):
        analyze(header(ancount=1) + body)


def test_soa_rdata_truncated() -> None:
    rdata = b"\xc0\x0c\xc0\x0c" + bytes(16)  # the MINIMUM is missing
    body = QUESTION + b"\xc0\x0c" + struct.pack("!HHIH", 6, 1, 60, len(rdata)) + rdata
    with pytest.raises(MalformedAnswer, match="SOA"):
        analyze(header(flags=0x8183, nscount=1) + body)


def test_svcb_rdata_too_short() -> None:
    body = QUESTION + b"\xc0\x0c" + struct.pack("!HHIH", 65, 1, 60, 1) + b"\x00"
    with pytest.raises(MalformedAnswer):
        analyze(header(ancount=1) + body)


def test_pointer_to_itself() -> None:
    with pytest.raises(MalformedAnswer, match="loop or forward"):
        analyze(header() + b"\xc0\x0c" + struct.pack("!HH", 1, 1))


def test_backward_pointer_loop() -> None:
    # www -> pointer back to www: a name that never ends, each pointer going backwards.
    with pytest.raises(MalformedAnswer):
        analyze(header() + b"\x03www\xc0\x0c" + struct.pack("!HH", 1, 1))


def test_pointer_loop_through_two_names() -> None:
    # the question is fine; the answer owner is "a" + pointer to itself (offset of "a").
    start = 12 + len(QUESTION)
    owner = b"\x01a" + struct.pack("!H", 0xC000 | start)
    body = QUESTION + owner + struct.pack("!HHIH", 1, 1, 60, 4) + bytes(4)
    with pytest.raises(MalformedAnswer):
        analyze(header(ancount=1) + body)


def test_forward_pointer() -> None:
    target = 12 + len(QUESTION) + 2 + 10 + 4  # somewhere after the pointer
    body = QUESTION + struct.pack("!H", 0xC000 | target) + struct.pack("!HHIH", 1, 1, 60, 4) + bytes(4)
    with pytest.raises(MalformedAnswer, match="loop or forward"):
        analyze(header(ancount=1) + body + wire_name(b"later"))


def test_pointer_past_the_end_and_truncated_pointer() -> None:
    with pytest.raises(MalformedAnswer):
        analyze(header() + b"\xc0")
    with pytest.raises(MalformedAnswer):
        analyze(header() + b"\xff\xff" + struct.pack("!HH", 1, 1))


def test_reserved_label_types() -> None:
    for first in (0x40, 0x80):
        with pytest.raises(MalformedAnswer, match="label type"):
            analyze(header() + bytes([first]) + b"abc\x00" + struct.pack("!HH", 1, 1))


def test_name_of_255_octets_is_fine_and_256_is_not() -> None:
    longest = wire_name(b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 61)
    assert len(longest) == 255
    info = analyze(header() + longest + struct.pack("!HH", 1, 1))
    assert info.lifetime is None
    too_long = wire_name(b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 62)
    assert len(too_long) == 256
    with pytest.raises(MalformedAnswer, match="too long"):
        analyze(header() + too_long + struct.pack("!HH", 1, 1))


def test_name_made_too_long_through_pointers() -> None:
    question_name = wire_name(b"a" * 63, b"b" * 63, b"c" * 61)
    assert len(question_name) == 191
    question = question_name + struct.pack("!HH", 1, 1)
    record = struct.pack("!HHIH", 1, 1, 60, 4) + bytes(4)
    longest = bytes([63]) + b"x" * 63 + b"\xc0\x0c"  # 64 + 191 = 255 octets: fine
    assert analyze(header(ancount=1) + question + longest + record).lifetime == 60
    too_long = bytes([63]) + b"x" * 63 + b"\x01y\xc0\x0c"  # 64 + 2 + 191 = 257 octets
    with pytest.raises(MalformedAnswer, match="too long"):
        analyze(header(ancount=1) + question + too_long + record)


# ---------------------------------------------------------------------------------------------
# fuzz: damaged answers raise MalformedAnswer or nothing, and always finish

mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 8)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("pointer"), st.integers(0, 10_000), st.integers(0, 0x3FFF)),
    st.tuples(st.just("count"), st.integers(2, 5), st.integers(0, 0xFFFF)),
)


def mutate(data: bytes, mutations: list[tuple[str, int, object]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in mutations:
        at = where % (len(out) + 1)
        if kind == "set" and out:
            out[at % len(out)] = value  # type: ignore[call-overload]
        elif kind == "insert":
            out[at:at] = value  # type: ignore[assignment]
        elif kind == "delete":
            del out[at : at + value]  # type: ignore[operator]
        elif kind == "truncate":
            del out[at:]
        elif kind == "pointer":
            out[at : at + 2] = struct.pack("!H", 0xC000 | value)  # type: ignore[operator]
        elif kind == "count" and len(out) >= 12:
            struct.pack_into("!H", out, where * 2, value)
    return bytes(out)


@pytest.mark.timeout(60)
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SAMPLES), st.lists(mutation, min_size=1, max_size=6))
def test_fuzzed_answers_only_raise_malformed(sample: bytes, mutations) -> None:
    data = mutate(sample, mutations)
    try:
        info = analyze(data)
    except MalformedAnswer:
        return
    assert isinstance(info, AnswerInfo)
    for offset, ttl in info.ttl_fields:
        assert 0 <= offset <= len(data) - 4
        assert 0 <= ttl <= 0x7FFFFFFF
    assert info.lifetime is None or info.lifetime >= 0


@pytest.mark.timeout(60)
@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=300))
def test_random_bytes_only_raise_malformed(data: bytes) -> None:
    try:
        analyze(data)
    except MalformedAnswer:
        pass


@pytest.mark.timeout(60)
@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=200))
def test_random_records_after_a_valid_question_only_raise_malformed(body: bytes) -> None:
    for counts in ((1, 0, 0), (0, 1, 0), (0, 0, 1), (3, 2, 1)):
        try:
            analyze(header(1, *counts) + QUESTION + body)
        except MalformedAnswer:
            pass
