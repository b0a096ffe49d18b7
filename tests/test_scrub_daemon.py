"""Answers scrubbed in the real daemon (issue 12): a poisoned upstream's out-of-bailiwick records never
reach a client, the legitimate data does, fresh or from the cache, over UDP and TCP.

tests.fakeupstream answers each question below with the records of its scenario: the legitimate
ones (kept) mixed with an unrelated `www.tiktok.com A 6.6.6.6` in every section and other records
off the chain.  The client is in the blocking group, where an off-chain tiktok.com owner in the
answer would otherwise also get a legitimate answer blocked as CNAME cloaking.
"""

from __future__ import annotations

import dns.message
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.rrset
import pytest
from dnslib import CNAME, NS, QTYPE, RCODE, RR, SOA, A, DNSRecord

from tests.daemon import GOV, OTHER
from tests.test_metrics import scrape

POISON = "6.6.6.6"
SECTIONS = ("answer", "authority", "additional")
SOA_TIMES = (2024010101, 7200, 900, 1209600, 60)

# qname -> (rcode, [(section, owner, type, value, kept)])
SCENARIOS: dict[str, tuple[int, list[tuple[str, str, str, str, bool]]]] = {
    "plain.poison.example": (
        RCODE.NOERROR,
        [
            ("answer", "plain.poison.example", "A", "192.0.2.10", True),
            ("answer", "www.tiktok.com", "A", POISON, False),
            ("authority", "poison.example", "NS", "ns1.poison.example", True),
            ("authority", "www.tiktok.com", "A", POISON, False),
            ("authority", "tiktok.com", "NS", "ns.evil.example", False),
            ("additional", "ns1.poison.example", "A", "192.0.2.53", True),
            ("additional", "ns.evil.example", "A", POISON, False),
            ("additional", "www.tiktok.com", "A", POISON, False),
        ],
    ),
    "alias.poison.example": (
        RCODE.NOERROR,
        [
            ("answer", "alias.poison.example", "CNAME", "mid.cdn.example", True),
            ("answer", "mid.cdn.example", "A", POISON, False),
            ("answer", "mid.cdn.example", "CNAME", "edge.cdn.example", True),
            ("answer", "other.cdn.example", "CNAME", "www.tiktok.com", False),
            ("answer", "edge.cdn.example", "A", "192.0.2.20", True),
            ("answer", "edge.cdn.example", "A", "192.0.2.21", True),
            ("answer", "www.tiktok.com", "A", POISON, False),
            ("additional", "www.tiktok.com", "A", POISON, False),
        ],
    ),
    "missing.poison.example": (
        RCODE.NXDOMAIN,
        [
            ("authority", "poison.example", "SOA", "ns1.poison.example", True),
            ("authority", "tiktok.com", "SOA", "ns1.tiktok.com", False),
            ("authority", "www.tiktok.com", "A", POISON, False),
            ("additional", "www.tiktok.com", "A", POISON, False),
        ],
    ),
}


def _record(owner: str, rtype: str, value: str) -> RR:
    if rtype == "A":
        rdata = A(value)
    elif rtype == "CNAME":
        rdata = CNAME(value)
    elif rtype == "NS":
        rdata = NS(value)
    else:
        rdata = SOA(value, f"hostmaster.{owner}", SOA_TIMES)
    return RR(owner, getattr(QTYPE, rtype), rdata=rdata, ttl=300)


def poisoned(request: DNSRecord, transport: str) -> DNSRecord:
    rcode, records = SCENARIOS[str(request.q.qname).rstrip(".").lower()]
    reply = request.reply()
    reply.header.rcode = rcode
    add = {"answer": reply.add_answer, "authority": reply.add_auth, "additional": reply.add_ar}
    for section, owner, rtype, value, _kept in records:
        add[section](_record(owner, rtype, value))
    return reply


def seen(message: dns.message.Message) -> dict[str, list[tuple[str, str, str]]]:
    """Each section's records as (owner, type, first field of the rdata), in order, TTLs left out."""
    return {
        section: [_row(rrset, rdata) for rrset in getattr(message, section) for rdata in rrset] for section in SECTIONS
    }


def _row(rrset: dns.rrset.RRset, rdata: dns.rdata.Rdata) -> tuple[str, str, str]:
    owner = rrset.name.to_text(omit_final_dot=True).lower()
    return owner, dns.rdatatype.to_text(rrset.rdtype), rdata.to_text().split()[0].rstrip(".")


def expected(qname: str) -> dict[str, list[tuple[str, str, str]]]:
    _rcode, records = SCENARIOS[qname]
    kept: dict[str, list[tuple[str, str, str]]] = {section: [] for section in SECTIONS}
    for section, owner, rtype, value, keep in records:
        if keep:
            kept[section].append((owner, rtype, value))
    return kept


def removed(qname: str) -> dict[str, int]:
    _rcode, records = SCENARIOS[qname]
    return {section: sum(1 for s, *_, keep in records if s == section and not keep) for section in expected(qname)}


def scrubbed_counts(daemon) -> dict[str, float]:
    samples = scrape(daemon)
    return {section: samples[("blockd_scrubbed_records_total", (("section", section),))] for section in SECTIONS}


@pytest.mark.parametrize("qname", list(SCENARIOS))
def test_poisoned_answers_reach_clients_scrubbed(make_daemon, upstream, qname: str) -> None:
    upstream.responders["poison.example"] = poisoned
    daemon = make_daemon()
    assert scrubbed_counts(daemon) == {"answer": 0, "authority": 0, "additional": 0}  # series from the start
    rcode = dns.rcode.to_text(SCENARIOS[qname][0])

    first = daemon.query(qname, source=GOV)  # fresh from the upstream
    assert dns.rcode.to_text(first.rcode()) == rcode
    assert seen(first) == expected(qname)
    assert POISON not in first.to_text()

    # From the cache (one upstream query in all): the scrubbed answer is what was cached, for
    # TCP and for a client in no group alike.
    for again in (daemon.query(qname, source=GOV, tcp=True), daemon.query(qname, source=OTHER)):
        assert dns.rcode.to_text(again.rcode()) == rcode
        assert seen(again) == expected(qname)
    assert upstream.names_asked().count(qname) == 1

    assert scrubbed_counts(daemon) == removed(qname)  # counted once per upstream answer, not per client


def test_a_clean_answer_is_not_counted(make_daemon, upstream) -> None:
    daemon = make_daemon()
    answer = daemon.query("clean.example", source=GOV)
    assert [rdata.to_text() for rrset in answer.answer for rdata in rrset] == ["192.0.2.1"]
    assert scrubbed_counts(daemon) == {"answer": 0, "authority": 0, "additional": 0}
