"""blockd.scrub: what of an upstream answer a client may see (Unbound's scrubber, for a forwarder).

One table: a question and the answer's records, each marked kept (+) or removed (-); the scrubbed
answer must hold exactly the kept ones (read back with dnspython, names and case as sent) and
Scrubbed.removed must count the others by section.  Then what must hold for any answer (hypothesis):
nothing added, the header and question unchanged, every kept record inside the chain, output that
dnspython and analyze read, idempotence, and MalformedAnswer as the only error for mangled bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from blockd.metrics import Metrics
from blockd.scrub import NOTHING_REMOVED, scrub
from blockd.upstream_answer import MalformedAnswer, analyze

SECTION_INDEX = {"an": 1, "ns": 2, "ar": 3}  # dnspython's Message.sections
SIG = "13 {labels} 300 20300101000000 20240101000000 4711 {signer} dGVzdA=="


def rrsig(covered: str, signer: str, labels: int = 2) -> str:
    return f"{covered} " + SIG.format(labels=labels, signer=signer)


@dataclass(frozen=True)
class Case:
    name: str
    qname: str
    qtype: str
    table: str  # lines "section +|- owner type rdata"
    rcode: str = "NOERROR"
    dnssec: bool = False


def parse_table(table: str) -> list[tuple[str, bool, str, str, str, str]]:
    rows = []
    for line in table.strip().splitlines():
        section, mark, owner, rtype, rdata = line.split(None, 4)
        rclass = "IN"
        if "/" in rtype:  # "TXT/CH": another class
            rtype, rclass = rtype.split("/")
        rows.append((section, mark == "+", owner if owner.endswith(".") else owner + ".", rtype, rclass, rdata))
    return rows


def build(
    qname: str, qtype: str, records: list[tuple[str, str, str, str, str]], rcode: str = "NOERROR", dnssec: bool = False
) -> bytes:
    """An upstream's answer: the query's ID and question, the records in order, each its own RRset."""
    query = dns.message.make_query(qname, qtype, want_dnssec=dnssec, id=0x4242)
    response = dns.message.make_response(query)
    response.flags |= dns.flags.RA
    response.set_rcode(dns.rcode.from_text(rcode))
    for section, owner, rtype, rclass, rdata in records:
        response.sections[SECTION_INDEX[section]].append(dns.rrset.from_text(owner, 300, rclass, rtype, rdata))
    return response.to_wire()


def parse(wire: bytes) -> dns.message.Message:
    """dnspython's reading, one RRset per record (else it keeps only the last CNAME or DNAME of an owner)."""
    return dns.message.from_wire(wire, one_rr_per_rrset=True)


def lines(wire: bytes) -> dict[str, list[str]]:
    """Every record of a message as dnspython prints it (case kept), sorted, by section."""
    message = parse(wire)
    return {
        section: sorted(line for rrset in message.sections[index] for line in rrset.to_text().splitlines())
        for section, index in SECTION_INDEX.items()
    }


CASES = [
    Case(
        "a plain answer has nothing to remove",
        "www.example.com",
        "A",
        """
        an + www.example.com A 192.0.2.1
        an + www.example.com A 192.0.2.2
    """,
    ),
    Case(
        "off-chain records go from every section (issue 12)",
        "www.example.com",
        "A",
        """
        an + www.example.com A 192.0.2.1
        an - www.tiktok.com A 6.6.6.6
        ns - www.tiktok.com A 6.6.6.6
        ar - www.tiktok.com A 6.6.6.6
    """,
    ),
    Case(
        "another type at the question name goes",
        "www.example.com",
        "A",
        """
        an + www.example.com A 192.0.2.1
        an - www.example.com AAAA 2001:db8::6
        an - www.example.com TXT "injected"
    """,
    ),
    Case(
        "another class goes",
        "www.example.com",
        "TXT",
        """
        an + www.example.com TXT "kept"
        an - www.example.com TXT/CH "other class"
    """,
    ),
    Case(
        "a CNAME chain is followed to its end, in any order",
        "www.example.com",
        "A",
        """
        an + edge.cdn.net A 192.0.2.7
        an + www.example.com CNAME www.example.com.cdn.cloudflare.net.
        an + www.example.com.cdn.cloudflare.net CNAME edge.cdn.net.
        an - www.example.com.cdn.cloudflare.net A 6.6.6.6
        an - www.example.com A 6.6.6.6
        an - other.cdn.net CNAME www.tiktok.com.
        an - www.tiktok.com A 6.6.6.6
    """,
    ),
    Case(
        "only the first CNAME of an owner is the chain",
        "www.example.com",
        "A",
        """
        an + www.example.com CNAME edge.cdn.net.
        an - www.example.com CNAME www.tiktok.com.
        an + edge.cdn.net A 192.0.2.7
        an - www.tiktok.com A 6.6.6.6
    """,
    ),
    Case(
        "a CNAME loop is kept as the upstream sent it",
        "a.example.com",
        "A",
        """
        an + a.example.com CNAME b.example.com.
        an + b.example.com CNAME a.example.com.
    """,
    ),
    Case(
        "a CNAME question keeps the CNAME",
        "www.example.com",
        "CNAME",
        """
        an + www.example.com CNAME edge.cdn.net.
        ar - edge.cdn.net A 192.0.2.7
    """,
    ),
    Case(
        "a DNAME above the name, with its synthesized CNAME",
        "host.old.example",
        "A",
        """
        an + old.example DNAME new.example.
        an + host.old.example CNAME host.new.example.
        an + host.new.example A 192.0.2.8
        an - other.example DNAME www.tiktok.com.
        an - host.other.example A 6.6.6.6
    """,
    ),
    Case(
        "a DNAME without the CNAME: the chain goes on at the synthesized name",
        "host.old.example",
        "A",
        """
        an + old.example DNAME new.example.
        an + host.new.example A 192.0.2.8
    """,
    ),
    Case(
        "a CNAME that disagrees with the DNAME goes, with its target",
        "host.old.example",
        "A",
        """
        an + old.example DNAME new.example.
        an - host.old.example CNAME www.tiktok.com.
        an - www.tiktok.com A 6.6.6.6
        an + host.new.example A 192.0.2.8
    """,
    ),
    Case(
        "a DNAME question keeps the DNAME at the name",
        "old.example",
        "DNAME",
        """
        an + old.example DNAME new.example.
    """,
    ),
    Case(
        "ANY keeps every type at the name",
        "example.com",
        "ANY",
        """
        an + example.com A 192.0.2.1
        an + example.com MX 10 mail.example.com.
        an + example.com TXT "v=spf1 -all"
        an - www.tiktok.com A 6.6.6.6
        ar + mail.example.com A 192.0.2.25
    """,
    ),
    Case(
        "NXDOMAIN keeps the SOA of an ancestor zone only",
        "missing.example.com",
        "A",
        """
        ns + example.com SOA ns1.example.com. hostmaster.example.com. 1 7200 900 1209600 60
        ns - tiktok.com SOA ns1.tiktok.com. evil.tiktok.com. 1 7200 900 1209600 60
        ns - www.tiktok.com A 6.6.6.6
        ar - www.tiktok.com A 6.6.6.6
    """,
        rcode="NXDOMAIN",
    ),
    Case(
        "NODATA keeps the SOA",
        "www.example.com",
        "AAAA",
        """
        ns + example.com SOA ns1.example.com. hostmaster.example.com. 1 7200 900 1209600 60
        ns - example.com SOA ns9.example.com. second.example.com. 1 7200 900 1209600 60
    """,
    ),
    Case(
        "a positive answer keeps no SOA",
        "www.example.com",
        "A",
        """
        an + www.example.com A 192.0.2.1
        ns - example.com SOA ns1.example.com. hostmaster.example.com. 1 7200 900 1209600 60
    """,
    ),
    Case(
        "NXDOMAIN after a CNAME: the SOA of the target's zone",
        "www.example.com",
        "A",
        """
        an + www.example.com CNAME gone.cdn.net.
        ns + cdn.net SOA ns1.cdn.net. hostmaster.cdn.net. 1 7200 900 1209600 60
    """,
        rcode="NXDOMAIN",
    ),
    Case(
        "NXDOMAIN after a CNAME: not the SOA of the question's zone",
        "www.example.com",
        "A",
        """
        an + www.example.com CNAME gone.cdn.net.
        ns - example.com SOA ns1.example.com. hostmaster.example.com. 1 7200 900 1209600 60
    """,
        rcode="NXDOMAIN",
    ),
    Case(
        "one NS RRset of an ancestor, with its glue",
        "www.example.com",
        "A",
        """
        an + www.example.com A 192.0.2.1
        ns + example.com NS ns1.example.com.
        ns + example.com NS ns2.elsewhere.net.
        ns - com NS a.gtld-servers.net.
        ns - tiktok.com NS ns.evil.net.
        ar + ns1.example.com A 192.0.2.53
        ar + ns1.example.com AAAA 2001:db8::53
        ar + ns2.elsewhere.net A 198.51.100.53
        ar - a.gtld-servers.net A 192.5.6.30
        ar - ns.evil.net A 6.6.6.6
        ar - www.example.com A 6.6.6.6
        ar - ns1.example.com TXT "not an address"
        ar - ns1.example.com CNAME www.tiktok.com.
    """,
    ),
    Case(
        "MX and SRV answers keep their targets' addresses",
        "example.com",
        "MX",
        """
        an + example.com MX 10 mail.example.com.
        an + example.com MX 20 mx.provider.net.
        ar + mail.example.com A 192.0.2.25
        ar + mx.provider.net AAAA 2001:db8::25
        ar - www.tiktok.com A 6.6.6.6
    """,
    ),
    Case(
        "SRV",
        "_sip._tcp.example.com",
        "SRV",
        """
        an + _sip._tcp.example.com SRV 0 5 5060 sip.example.com.
        ar + sip.example.com A 192.0.2.60
        ar - sip2.example.com A 192.0.2.61
    """,
    ),
    Case(
        "glue only for NS, MX, SRV in the answer or authority",
        "www.example.com",
        "A",
        """
        an + www.example.com A 192.0.2.1
        ns - www.tiktok.com MX 10 mail.tiktok.com.
        ar - mail.tiktok.com A 6.6.6.6
    """,
    ),
    Case(
        "signatures follow what they cover",
        "www.example.com",
        "A",
        f"""
        an + www.example.com A 192.0.2.1
        an + www.example.com RRSIG {rrsig("A", "example.com.", 3)}
        an - www.example.com RRSIG {rrsig("TXT", "example.com.", 3)}
        an - www.tiktok.com RRSIG {rrsig("A", "tiktok.com.", 3)}
        ns + example.com NS ns1.example.com.
        ns + example.com RRSIG {rrsig("NS", "example.com.")}
        ar + ns1.example.com A 192.0.2.53
        ar + ns1.example.com RRSIG {rrsig("A", "example.com.", 3)}
        ar - www.tiktok.com RRSIG {rrsig("A", "tiktok.com.", 3)}
    """,
        dnssec=True,
    ),
    Case(
        "a signed CNAME chain",
        "www.example.com",
        "A",
        f"""
        an + www.example.com CNAME edge.cdn.net.
        an + www.example.com RRSIG {rrsig("CNAME", "example.com.", 3)}
        an + edge.cdn.net A 192.0.2.7
        an + edge.cdn.net RRSIG {rrsig("A", "cdn.net.", 3)}
    """,
        dnssec=True,
    ),
    Case(
        "a signed NXDOMAIN keeps its NSEC proof inside the SOA's zone",
        "missing.example.com",
        "A",
        f"""
        ns + example.com SOA ns1.example.com. hostmaster.example.com. 1 7200 900 1209600 60
        ns + example.com RRSIG {rrsig("SOA", "example.com.")}
        ns + alpha.example.com NSEC omega.example.com. A RRSIG NSEC
        ns + alpha.example.com RRSIG {rrsig("NSEC", "example.com.", 3)}
        ns + example.com NSEC alpha.example.com. NS SOA RRSIG NSEC DNSKEY
        ns + example.com RRSIG {rrsig("NSEC", "example.com.")}
        ns - tiktok.com NSEC www.tiktok.com. A RRSIG NSEC
        ns - tiktok.com RRSIG {rrsig("NSEC", "tiktok.com.")}
        ns - example.com DS 12345 13 2 0000000000000000000000000000000000000000000000000000000000000000
    """,
        rcode="NXDOMAIN",
        dnssec=True,
    ),
    Case(
        "a signed NODATA with NSEC3",
        "www.example.com",
        "AAAA",
        f"""
        ns + example.com SOA ns1.example.com. hostmaster.example.com. 1 7200 900 1209600 60
        ns + example.com RRSIG {rrsig("SOA", "example.com.")}
        ns + 2t7b4g4vsa5smi47k61mv5bv1a22bojr.example.com NSEC3 1 0 0 - 2T7B4G4VSA5SMI47K61MV5BV1A22BOJS A RRSIG
        ns + 2t7b4g4vsa5smi47k61mv5bv1a22bojr.example.com RRSIG {rrsig("NSEC3", "example.com.", 3)}
        ns - 2t7b4g4vsa5smi47k61mv5bv1a22bojr.tiktok.com NSEC3 1 0 0 - 2T7B4G4VSA5SMI47K61MV5BV1A22BOJS A
    """,
        dnssec=True,
    ),
    Case(
        "a wildcard answer keeps the NSEC proving it, in the signer's zone",
        "a.b.example.com",
        "A",
        f"""
        an + a.b.example.com A 192.0.2.9
        an + a.b.example.com RRSIG {rrsig("A", "example.com.", 2)}
        ns + a.example.com NSEC c.example.com. A RRSIG NSEC
        ns + a.example.com RRSIG {rrsig("NSEC", "example.com.", 3)}
        ns - a.tiktok.com NSEC c.tiktok.com. A RRSIG NSEC
    """,
        dnssec=True,
    ),
    Case(
        "ANY keeps only the chain's CNAME, and every type along the chain",
        "www.example.com",
        "ANY",
        """
        an + www.example.com CNAME edge.cdn.net.
        an - www.example.com CNAME www.tiktok.com.
        an + edge.cdn.net A 192.0.2.7
        an + edge.cdn.net TXT "edge"
        an - www.tiktok.com A 6.6.6.6
    """,
    ),
    Case(
        "an SOA of another class goes",
        "missing.example.com",
        "A",
        """
        ns + example.com SOA ns1.example.com. hostmaster.example.com. 1 7200 900 1209600 60
        ns - example.com SOA/CH ns1.example.com. hostmaster.example.com. 1 7200 900 1209600 60
    """,
        rcode="NXDOMAIN",
    ),
    Case(
        "a NAPTR answer is rebuilt with its replacement name",
        "example.com",
        "NAPTR",
        """
        an + example.com NAPTR 100 10 "S" "SIP+D2U" "" _sip._udp.example.com.
        an - www.tiktok.com NAPTR 100 10 "S" "SIP+D2U" "" _sip._udp.tiktok.com.
    """,
    ),
    Case(
        "an RRSIG question keeps the signatures at the name",
        "www.example.com",
        "RRSIG",
        f"""
        an + www.example.com RRSIG {rrsig("A", "example.com.", 3)}
        an - www.tiktok.com RRSIG {rrsig("A", "tiktok.com.", 3)}
    """,
    ),
    Case(
        "case is kept as the upstream spelled it",
        "WwW.ExAmPlE.CoM",
        "A",
        """
        an + www.example.com CNAME Edge.CDN.net.
        an + EDGE.cdn.NET A 192.0.2.7
        ar - Www.TikTok.com A 6.6.6.6
    """,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_scrub_keeps_exactly_the_chain(case: Case) -> None:
    rows = parse_table(case.table)
    wire = build(case.qname, case.qtype, [(s, o, t, c, r) for s, _k, o, t, c, r in rows], case.rcode, case.dnssec)
    kept_wire = build(
        case.qname, case.qtype, [(s, o, t, c, r) for s, k, o, t, c, r in rows if k], case.rcode, case.dnssec
    )
    result = scrub(wire)
    expected_removed = tuple(sum(1 for s, k, *_ in rows if s == section and not k) for section in SECTION_INDEX)
    assert result.removed == expected_removed
    assert lines(result.answer) == lines(kept_wire)
    if expected_removed == NOTHING_REMOVED:
        assert result.answer is wire  # not even copied
    else:
        assert result.answer[:4] == wire[:4]  # ID and flags
        assert dns.message.from_wire(result.answer).question == dns.message.from_wire(wire).question
        assert scrub(result.answer).removed == NOTHING_REMOVED
        analyze(result.answer)  # what the cache then reads


def test_the_question_is_kept_byte_for_byte() -> None:
    wire = build(
        "WwW.ExAmPlE.CoM", "A", [("an", "www.example.com.", "A", "IN", "192.0.2.1"), ("ar", "x.", "A", "IN", "6.6.6.6")]
    )
    question_end = 12 + len(b"\x03WwW\x07ExAmPlE\x03CoM\x00") + 4
    assert scrub(wire).answer[12:question_end] == wire[12:question_end]


def test_pointers_into_removed_records_are_rewritten() -> None:
    # dnspython compresses "other.org" in the kept CNAME target and A owner to the removed first
    # record's owner: cutting that record out of the bytes would leave both pointing at garbage.
    records = [
        ("an", "zzz.other.org.", "A", "IN", "6.6.6.6"),
        ("an", "www.example.com.", "CNAME", "IN", "www.other.org."),
        ("an", "www.other.org.", "A", "IN", "192.0.2.1"),
    ]
    wire = build("www.example.com", "A", records)
    assert wire.count(b"\x05other\x03org\x00") == 1  # written once, pointed to after
    result = scrub(wire)
    assert result.removed == (1, 0, 0)
    assert lines(result.answer)["an"] == [
        "www.example.com. 300 IN CNAME www.other.org.",
        "www.other.org. 300 IN A 192.0.2.1",
    ]
    assert len(result.answer) < len(wire)  # compressed again


def test_the_opt_record_and_its_options_stay() -> None:
    query = dns.message.make_query("www.example.com", "A", use_edns=0, payload=1232, want_dnssec=True)
    response = dns.message.make_response(query)
    response.use_edns(0, dns.flags.DO, 1232, options=[dns.edns.GenericOption(15, b"\x00\x16upstream text")])
    response.additional.append(dns.rrset.from_text("www.tiktok.com.", 300, "IN", "A", "6.6.6.6"))
    result = scrub(response.to_wire())
    assert result.removed == (0, 0, 1)
    scrubbed = dns.message.from_wire(result.answer)
    assert scrubbed.edns == 0 and scrubbed.payload == 1232 and scrubbed.ednsflags & dns.flags.DO
    assert [(o.otype, o.to_wire()) for o in scrubbed.options] == [(15, b"\x00\x16upstream text")]


def append_raw(wire: bytes, section: int, record: bytes) -> bytes:
    """wire (with no records after `section`) plus a record given as bytes, counted in its section."""
    counts = list(struct.unpack_from("!HHHH", wire, 4))
    assert not any(counts[section + 1 :])
    counts[section] += 1
    return wire[:4] + struct.pack("!HHHH", *counts) + wire[12:] + record


def test_addresses_of_the_wrong_length_go() -> None:
    wire = build("www.example.com", "A", [("an", "www.example.com.", "A", "IN", "192.0.2.1")])
    wire = append_raw(wire, 1, b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 5) + b"\x06\x06\x06\x06\x06")
    result = scrub(wire)
    assert result.removed == (1, 0, 0)
    assert lines(result.answer)["an"] == ["www.example.com. 300 IN A 192.0.2.1"]


def test_a_record_too_short_for_its_type_cannot_be_rebuilt() -> None:
    wire = build("example.com", "MX", [("an", "www.tiktok.com.", "A", "IN", "6.6.6.6")])
    wire = append_raw(wire, 1, b"\xc0\x0c" + struct.pack("!HHIH", 15, 1, 300, 1) + b"\x00")  # MX: 1 byte
    with pytest.raises(MalformedAnswer, match="rdata shorter than its type needs"):
        scrub(wire)


@pytest.mark.parametrize(
    "wire, reason",
    [
        (b"\x42\x42\x81\x80\x00\x01", "shorter than a header"),
        (struct.pack("!HHHHHH", 0x4242, 0x8180, 0, 0, 0, 0), "not exactly one question"),
        (struct.pack("!HHHHHH", 0x4242, 0x8180, 2, 0, 0, 0) + b"\x00\x00\x01\x00\x01" * 2, "not exactly one"),
        (struct.pack("!HHHHHH", 0x4242, 0x8180, 1, 0, 0, 0) + b"\x03www", "past the end"),
        (
            struct.pack("!HHHHHH", 0x4242, 0x8180, 1, 1, 0, 0) + b"\x00\x00\x01\x00\x01" + b"\xc0\x0c\x00\x01",
            "record header truncated",
        ),
        (
            struct.pack("!HHHHHH", 0x4242, 0x8180, 1, 1, 0, 0) + b"\x00\x00\x01\x00\x01"
            + b"\x00" + struct.pack("!HHIH", 1, 1, 300, 9) + b"\x01\x02\x03\x04",
            "rdata truncated",
        ),
        (  # a pointer to itself
            struct.pack("!HHHHHH", 0x4242, 0x8180, 1, 1, 0, 0) + b"\x00\x00\x01\x00\x01"
            + b"\xc0\x11" + struct.pack("!HHIH", 1, 1, 300, 4) + b"\x01\x02\x03\x04",
            "compression loop",
        ),
        (  # a CNAME whose target runs into the next record
            struct.pack("!HHHHHH", 0x4242, 0x8180, 1, 2, 0, 0) + b"\x01a\x00\x00\x05\x00\x01"
            + b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 300, 2) + b"\x01b"
            + b"\x00" + struct.pack("!HHIH", 1, 1, 300, 4) + b"\x01\x02\x03\x04",
            "past its record",
        ),
    ],
)  # fmt: skip
def test_malformed_answers_raise_malformed_answer(wire: bytes, reason: str) -> None:
    with pytest.raises(MalformedAnswer, match=reason):
        scrub(wire)


def test_the_metric_counts_by_section() -> None:
    metrics = Metrics(CollectorRegistry())
    sample = metrics.registry.get_sample_value
    for section in ("answer", "authority", "additional"):
        assert sample("blockd_scrubbed_records_total", {"section": section}) == 0  # there from the start
    metrics.scrubbed.count((1, 0, 3))
    metrics.scrubbed.count(NOTHING_REMOVED)
    metrics.scrubbed.count((0, 2, 0))
    assert sample("blockd_scrubbed_records_total", {"section": "answer"}) == 1
    assert sample("blockd_scrubbed_records_total", {"section": "authority"}) == 2
    assert sample("blockd_scrubbed_records_total", {"section": "additional"}) == 3


# -- properties of any answer ---------------------------------------------------------------------

NAMES = [
    "example.com.", "www.example.com.", "WWW.Example.COM.", "a.b.example.com.", "cdn.net.", "edge.cdn.net.",
    "www.tiktok.com.", "tiktok.com.", "com.", "net.", ".",
]  # fmt: skip
QTYPES = ["A", "AAAA", "MX", "ANY", "CNAME", "DNAME", "NS", "SOA", "TXT", "SRV", "RRSIG"]
RTYPES = ["A", "AAAA", "CNAME", "DNAME", "NS", "MX", "SRV", "SOA", "TXT", "RRSIG", "NSEC"]
names = st.sampled_from(NAMES)


@st.composite
def rdata_for(draw: st.DrawFn, rtype: str) -> str:
    target = draw(names)
    return {
        "A": f"192.0.2.{draw(st.integers(0, 255))}",
        "AAAA": f"2001:db8::{draw(st.integers(0, 0xFFFF)):x}",
        "CNAME": target,
        "DNAME": target,
        "NS": target,
        "MX": f"10 {target}",
        "SRV": f"0 5 443 {target}",
        "SOA": f"ns1.{target.lstrip('.')} host.{target.lstrip('.')} 1 7200 900 1209600 60".replace("..", "."),
        "TXT": '"text"',
        "RRSIG": f"{draw(st.sampled_from(RTYPES[:-2]))} " + SIG.format(labels=2, signer=target),
        "NSEC": f"{target} A RRSIG NSEC",
    }[rtype]


@st.composite
def answers(draw: st.DrawFn) -> tuple[str, str, bytes]:
    qname, qtype = draw(names), draw(st.sampled_from(QTYPES))
    records = []
    for _ in range(draw(st.integers(0, 12))):
        rtype = draw(st.sampled_from(RTYPES))
        section = draw(st.sampled_from(list(SECTION_INDEX)))
        records.append((section, draw(names), rtype, "IN", draw(rdata_for(rtype))))
    rcode = draw(st.sampled_from(["NOERROR", "NXDOMAIN", "SERVFAIL"]))
    return qname, qtype, build(qname, qtype, records, rcode, draw(st.booleans()))


def chain_of(message: dns.message.Message) -> set[dns.name.Name]:
    """The names a resolver reaches from the question by the answer's own redirections, read by
    dnspython: at each name the first DNAME above it (RFC 6672), else its CNAME."""
    name = message.question[0].name
    chain = {name}
    for _ in range(40):
        dname = next(
            (
                r
                for r in message.answer
                if r.rdtype == dns.rdatatype.DNAME and name.is_subdomain(r.name) and name != r.name
            ),
            None,
        )
        cname = next((r for r in message.answer if r.rdtype == dns.rdatatype.CNAME and r.name == name), None)
        try:
            if dname is not None:
                name = name.relativize(dname.name).derelativize(dname[0].target)
            elif cname is not None:
                name = cname[0].target
            else:
                break
        except dns.name.NameTooLong:
            break
        if name in chain:
            break
        chain.add(name)
    return chain


def assert_inside_the_chain(message: dns.message.Message) -> None:
    chain = chain_of(message)
    for rrset in message.answer:  # on the chain, or a DNAME above it
        assert rrset.name in chain or (
            rrset.rdtype == dns.rdatatype.DNAME and any(n != rrset.name and n.is_subdomain(rrset.name) for n in chain)
        ), rrset
    kept = {(rrset.name, rrset.rdtype) for section in (message.answer, message.authority) for rrset in section}
    glue_for = {
        rdata.target if rrset.rdtype in (dns.rdatatype.NS, dns.rdatatype.SRV) else rdata.exchange
        for section in (message.answer, message.authority)
        for rrset in section
        if rrset.rdtype in (dns.rdatatype.NS, dns.rdatatype.MX, dns.rdatatype.SRV)
        for rdata in rrset
    }
    for rrset in message.authority:
        if rrset.rdtype in (dns.rdatatype.SOA, dns.rdatatype.NS):
            assert any(name.is_subdomain(rrset.name) for name in chain), rrset
        elif rrset.rdtype == dns.rdatatype.RRSIG:
            assert (rrset.name, rrset.covers) in kept, rrset
        else:
            assert rrset.rdtype in (dns.rdatatype.NSEC, dns.rdatatype.NSEC3), rrset
    for rrset in message.additional:
        covered = rrset.covers if rrset.rdtype == dns.rdatatype.RRSIG else rrset.rdtype
        assert covered in (dns.rdatatype.A, dns.rdatatype.AAAA) and rrset.name in glue_for, rrset


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers())
def test_any_answer_scrubs_into_a_subset_inside_the_chain(generated: tuple[str, str, bytes]) -> None:
    _qname, _qtype, wire = generated
    result = scrub(wire)
    before, after = lines(wire), lines(result.answer)
    for section in SECTION_INDEX:
        remaining = list(before[section])
        for line in after[section]:
            remaining.remove(line)  # nothing added, nothing altered (case and TTL included)
    counted = struct.unpack_from("!HHH", wire, 6)
    left = struct.unpack_from("!HHH", result.answer, 6)
    assert tuple(c - k for c, k in zip(counted, left, strict=True)) == result.removed
    assert result.answer[:4] == wire[:4]
    original, scrubbed = parse(wire), parse(result.answer)
    assert scrubbed.question == original.question and scrubbed.edns == original.edns
    assert_inside_the_chain(scrubbed)
    again = scrub(result.answer)
    assert again.removed == NOTHING_REMOVED and again.answer is result.answer  # idempotent
    assert analyze(result.answer).rcode == analyze(wire).rcode


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers(), st.data())
def test_mangled_bytes_raise_only_malformed_answer(generated: tuple[str, str, bytes], data: st.DataObject) -> None:
    wire = bytearray(generated[2])
    for _ in range(data.draw(st.integers(1, 4))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(12, len(wire)))
    mangled = bytes(wire[:cut])
    try:
        result = scrub(mangled)
    except MalformedAnswer:
        return
    if result.removed == NOTHING_REMOVED:
        assert result.answer is mangled
    else:
        assert len(result.answer) <= 0xFFFF
        assert scrub(result.answer).removed == NOTHING_REMOVED
