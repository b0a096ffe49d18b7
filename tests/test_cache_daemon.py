"""The answer cache in the real daemon: hits, aging, negative answers, in-flight sharing, the key's
DO/CD bits, metrics, and `[cache] size = 0`.  Loopback only, against tests.fakeupstream."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from dnslib import QTYPE, RCODE, RR, SOA, A, DNSRecord

from tests.daemon import GOV, OTHER
from tests.test_metrics import scrape


def ask(
    daemon, name: str, rdtype: str = "A", source: str = OTHER, qid: int | None = None, timeout: float = 3.0, **kwargs
) -> tuple[dns.message.Message, bytes, bytes]:
    """Send one UDP query from `source` (its own socket, so its own port): (answer, raw answer, raw query)."""
    query = dns.message.make_query(name, rdtype, **kwargs)
    if qid is not None:
        query.id = qid
    wire = query.to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.sendto(wire, ("127.0.0.1", daemon.port))
        raw, _ = sock.recvfrom(65535)
    return dns.message.from_wire(raw), raw, wire


def question_bytes(wire: bytes) -> bytes:
    """The question section (name as spelled, type, class) of a one-question message."""
    end = 12
    while wire[end]:
        end += 1 + wire[end]
    return wire[12 : end + 5]


def asked(upstream, name: str) -> int:
    return upstream.names_asked().count(name)


def a_records(message: dns.message.Message) -> list[tuple[str, int]]:
    return [(rdata.to_text(), rrset.ttl) for rrset in message.answer for rdata in rrset if rrset.rdtype == 1]


def cache_samples(daemon) -> tuple[float, float, float]:
    samples = scrape(daemon)
    return (
        samples[("blockd_cache_requests_total", ())],
        samples[("blockd_cache_hits_total", ())],
        samples[("blockd_cache_entries", ())],
    )


def negative(rcode: int, zone: str, minimum: int = 60, soa_ttl: int = 600):
    """A negative answer with the SOA of `zone`, which must contain the question (else blockd's
    scrubber rightly removes the SOA as out of bailiwick, and the answer is not cacheable)."""

    def respond(request: DNSRecord, transport: str) -> DNSRecord:
        reply = request.reply()
        reply.header.rcode = rcode
        times = (2024010101, 7200, 900, 1209600, minimum)
        reply.add_auth(RR(zone, QTYPE.SOA, rdata=SOA(f"ns1.{zone}", f"host.{zone}", times), ttl=soa_ttl))
        return reply

    return respond


# ---------------------------------------------------------------------------------------------


def test_repeated_query_is_answered_from_cache(make_daemon, upstream) -> None:
    daemon = make_daemon()
    first, _, _ = ask(daemon, "cached.example", qid=0x1111)
    assert first.id == 0x1111
    assert a_records(first) == [("192.0.2.1", 300)]
    assert asked(upstream, "cached.example") == 1

    second, raw, query = ask(daemon, "CaChEd.ExAmPlE", qid=0x2222)
    assert asked(upstream, "cached.example") == 1  # from the cache
    assert second.id == 0x2222
    assert struct.unpack_from("!H", raw)[0] == 0x2222
    assert question_bytes(raw) == question_bytes(query)  # the 0x20 spelling, byte for byte
    assert second.question[0].name.to_text() == "CaChEd.ExAmPlE."
    assert dns.rcode.to_text(second.rcode()) == "NOERROR"
    assert [address for address, _ in a_records(second)] == ["192.0.2.1"]
    assert second.flags & dns.flags.QR and second.flags & dns.flags.RD

    # No group and the government group share the upstream's answer (policy runs on it per group).
    third, _, _ = ask(daemon, "cached.EXAMPLE", source=GOV, qid=0x3333)
    assert third.id == 0x3333
    assert [address for address, _ in a_records(third)] == ["192.0.2.1"]
    # A client that did not set RD gets RD clear.
    fourth, _, _ = ask(daemon, "cached.example", qid=0x4444, flags=0)
    assert not fourth.flags & dns.flags.RD
    assert asked(upstream, "cached.example") == 1


def test_negative_answers_are_cached(make_daemon, upstream) -> None:
    upstream.responders["nx.example"] = negative(RCODE.NXDOMAIN, zone="nx.example")
    upstream.responders["nodata.example"] = negative(RCODE.NOERROR, zone="nodata.example")
    daemon = make_daemon()
    for name, rcode in (("gone.nx.example", "NXDOMAIN"), ("empty.nodata.example", "NOERROR")):
        first, _, _ = ask(daemon, name, "AAAA")
        second, raw, query = ask(daemon, name.upper(), "AAAA", qid=4242)
        assert asked(upstream, name) == 1, name
        for message in (first, second):
            assert dns.rcode.to_text(message.rcode()) == rcode
            assert not message.answer
            assert [rrset.rdtype for rrset in message.authority] == [dns.rdatatype.SOA]
        assert second.id == 4242
        assert question_bytes(raw) == question_bytes(query)


def test_identical_questions_in_flight_share_one_upstream_query(make_daemon, upstream) -> None:
    def slow(request: DNSRecord, transport: str) -> DNSRecord:
        time.sleep(0.3)
        reply = request.reply()
        reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("192.0.2.77"), ttl=120))
        return reply

    upstream.responders["slow.example"] = slow
    daemon = make_daemon()
    spellings = ["www.slow.example", "WWW.SLOW.EXAMPLE", "wWw.SlOw.ExAmPlE", "Www.Slow.Example"]
    count = 10
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count

    def client(index: int) -> None:
        name = spellings[index % len(spellings)]
        source = GOV if index % 2 else OTHER
        qid = 1000 + index
        try:
            barrier.wait(timeout=5)
            message, raw, query = ask(daemon, name, source=source, qid=qid)
            results[index] = (qid, name, source, message, raw, query)
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[index] = exc

    threads = [threading.Thread(target=client, args=(index,)) for index in range(count)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    elapsed = time.monotonic() - started
    for result in results:
        assert isinstance(result, tuple), result
        qid, name, _source, message, raw, query = result
        assert message.id == qid
        assert question_bytes(raw) == question_bytes(query)
        assert message.question[0].name.to_text() == name + "."
        assert [address for address, _ in a_records(message)] == ["192.0.2.77"]
    assert asked(upstream, "www.slow.example") == 1
    assert elapsed < 2.5  # one 0.3 s upstream wait, not ten of them one after another


def test_do_and_cd_bits_are_separate_entries(make_daemon, upstream) -> None:
    daemon = make_daemon()
    name = "bits.example"
    variants = [
        {},
        {"want_dnssec": True},  # EDNS with DO
        {"use_edns": 0},  # EDNS without DO
        {"flags": dns.flags.RD | dns.flags.CD},
        {"flags": dns.flags.RD | dns.flags.CD, "want_dnssec": True},
    ]
    for number, variant in enumerate(variants, start=1):
        message, _, _ = ask(daemon, name, **variant)
        assert [address for address, _ in a_records(message)] == ["192.0.2.1"]
        assert asked(upstream, name) == number, variant  # a new entry: the upstream is asked again
        again, _, _ = ask(daemon, name.upper(), **variant)
        assert [address for address, _ in a_records(again)] == ["192.0.2.1"]
        assert asked(upstream, name) == number, variant  # the same entry: answered from the cache
        if "flags" in variant:
            assert again.flags & dns.flags.CD
    # What the upstream saw carried the bits that make the entries differ.
    with upstream.lock:
        raws = [raw for raw, entry in zip(upstream.raw_queries, upstream.queries, strict=True) if entry[1] == name]
    parsed = [dns.message.from_wire(raw) for raw in raws]
    assert [bool(m.ednsflags & dns.flags.DO) for m in parsed] == [False, True, False, False, True]
    assert [bool(m.flags & dns.flags.CD) for m in parsed] == [False, False, False, True, True]
    assert [m.edns >= 0 for m in parsed] == [False, True, True, False, True]


def test_cache_metrics_move(make_daemon, upstream) -> None:
    daemon = make_daemon()
    requests, hits, entries = cache_samples(daemon)
    assert (requests, hits, entries) == (0, 0, 0)
    assert ("blockd_cache_evictions_total", ()) in scrape(daemon)

    ask(daemon, "metrics.example")
    assert cache_samples(daemon) == (1, 0, 1)
    ask(daemon, "Metrics.Example")
    ask(daemon, "METRICS.EXAMPLE", source=GOV)
    assert cache_samples(daemon) == (3, 2, 1)
    ask(daemon, "metrics.example", "AAAA")
    assert cache_samples(daemon) == (4, 2, 2)
    # Blocked names are answered before the cache: no lookup, no entry.
    blocked, _, _ = ask(daemon, "www.tiktok.com", source=GOV)
    assert [address for address, _ in a_records(blocked)] == ["0.0.0.0"]
    assert cache_samples(daemon) == (4, 2, 2)
    assert asked(upstream, "metrics.example") == 2


def test_cache_size_zero_disables(make_daemon, upstream) -> None:
    daemon = make_daemon(extra="\n[cache]\nsize = 0\n")
    for number in range(1, 4):
        message, _, _ = ask(daemon, "nocache.example", qid=number)
        assert message.id == number
        assert [address for address, _ in a_records(message)] == ["192.0.2.1"]
        assert asked(upstream, "nocache.example") == number
    upstream.responders["nx.example"] = negative(RCODE.NXDOMAIN, zone="nx.example")
    ask(daemon, "gone.nx.example")
    ask(daemon, "gone.nx.example")
    assert asked(upstream, "gone.nx.example") == 2
    requests, hits, entries = cache_samples(daemon)
    assert hits == 0
    assert entries == 0
    assert requests == 5


def _answers_once(address: str) -> Callable[[DNSRecord, str], DNSRecord | None]:
    """An upstream that answers a name once (TTL 1), and never again: it went away."""
    answered: list[bool] = []

    def respond(request: DNSRecord, transport: str) -> DNSRecord | None:
        if answered:
            return None
        answered.append(True)
        reply = request.reply()
        reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=1))
        return reply

    return respond


@pytest.mark.parametrize("serve_stale", [True, False])
def test_serve_stale_answers_an_expired_entry_when_no_upstream_answers(make_daemon, upstream, serve_stale) -> None:
    upstream.responders["stale.example"] = _answers_once("192.0.2.77")
    daemon = make_daemon(
        extra=f"[cache]\nserve_stale = {'true' if serve_stale else 'false'}\nstale_ttl = 30\n", timeout=0.5
    )
    first = daemon.query("stale.example", "A", source=OTHER)
    assert first.answer[0].ttl == 1
    time.sleep(1.5)  # expired
    again = daemon.query("stale.example", "A", source=OTHER)
    if not serve_stale:
        assert dns.rcode.to_text(again.rcode()) == "SERVFAIL"
        return
    assert [r.to_text() for r in again.answer[0]] == ["192.0.2.77"]
    assert again.answer[0].ttl == 30
    assert scrape(daemon)[("blockd_cache_stale_answers_total", ())] == 1
