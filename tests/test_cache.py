"""blockd.cache: the AnswerCache (bound, LRU, lazy expiry, clamps, counters), cache_key, and render().

render() serves a hit by patching bytes.  The issue asks for proof that those bytes equal what the
slow path would give, so `slow_path` below is that slow path written with dnslib: parse the stored
answer, set the client's ID, RD bit and question spelling, age every TTL, pack.  A hypothesis test
compares the two over names, case, types, CNAME chains, negative answers, EDNS, ages and clamps.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from dnslib import (
    AAAA,
    CLASS,
    CNAME,
    EDNS0,
    MX,
    NS,
    QTYPE,
    RCODE,
    RR,
    SOA,
    TXT,
    A,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockd import slowpath, wire
from blockd.cache import AnswerCache, CacheEntry, cache_key, render
from blockd.upstream_answer import AnswerInfo, analyze
from blockd.wire import Query

T0 = 1_000_000.0  # the injected clock: every test passes `now` explicitly

# ---------------------------------------------------------------------------------------------
# builders


def query_record(
    name: str,
    qtype: str = "A",
    qid: int = 0x1234,
    rd: bool = True,
    edns: bool = False,
    do: bool = False,
    cd: bool = False,
    qclass: str = "IN",
) -> DNSRecord:
    question = DNSQuestion(name, getattr(QTYPE, qtype), getattr(CLASS, qclass))
    record = DNSRecord(DNSHeader(id=qid, rd=int(rd), cd=int(cd)), q=question)
    if edns:
        record.add_ar(EDNS0(flags="do" if do else "", udp_len=1232))
    return record


def parse(record: DNSRecord) -> Query:
    """The Query blockd builds for these bytes (fast path, or the dnslib slow path)."""
    data = bytes(record.pack())
    query = wire.parse_query(data)
    if query is None:
        query = slowpath.parse_query_slow(data)
    return query


def make_query(name: str, qtype: str = "A", **kwargs) -> Query:
    return parse(query_record(name, qtype, **kwargs))


def a_answer(name: str, ttl: int = 300, address: str = "192.0.2.1", **kwargs) -> bytes:
    request = query_record(name, **kwargs)
    reply = request.reply()
    reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=ttl))
    if kwargs.get("edns"):
        reply.add_ar(EDNS0(flags="do" if kwargs.get("do") else "", udp_len=1232))
    return bytes(reply.pack())


def entry_for(cache: AnswerCache, answer: bytes, now: float = T0) -> CacheEntry:
    return cache.entry_for(answer, analyze(answer), now)


def store(cache: AnswerCache, name: str, ttl: int = 300, now: float = T0, **kwargs) -> CacheEntry:
    answer = a_answer(name, ttl, **kwargs)
    entry = entry_for(cache, answer, now)
    cache.put(cache_key(make_query(name, **kwargs)), entry)
    return entry


def key(name: str, **kwargs):
    return cache_key(make_query(name, **kwargs))


def ttls(answer: bytes) -> list[int]:
    record = DNSRecord.parse(answer)
    return [rr.ttl for rr in record.rr + record.auth + record.ar if rr.rtype != QTYPE.OPT]


# ---------------------------------------------------------------------------------------------
# bound, LRU, counters


def test_entry_count_bound_evicts_least_recently_used() -> None:
    cache = AnswerCache(size=3)
    for name in ("a.example", "b.example", "c.example"):
        store(cache, name)
    assert len(cache) == 3
    assert cache.get(key("a.example"), T0 + 1) is not None  # a is now the most recent
    store(cache, "d.example")
    assert len(cache) == 3
    assert cache.evictions == 1
    assert cache.get(key("b.example"), T0 + 1) is None  # b was the least recently used
    for name in ("a.example", "c.example", "d.example"):
        assert cache.get(key(name), T0 + 1) is not None
    store(cache, "e.example")  # now a is the oldest use (the gets above ran a, c, d)
    assert cache.get(key("a.example"), T0 + 1) is None
    assert cache.evictions == 2
    assert len(cache) == 3


def test_replacing_an_entry_is_not_an_eviction() -> None:
    cache = AnswerCache(size=2)
    store(cache, "a.example", ttl=100)
    store(cache, "b.example")
    replacement = store(cache, "A.EXAMPLE", ttl=200, now=T0 + 5)  # same key: case folded
    assert len(cache) == 2
    assert cache.evictions == 0
    assert cache.get(key("a.example"), T0 + 6) is replacement
    store(cache, "c.example")
    assert cache.get(key("b.example"), T0 + 6) is None  # a was refreshed by the replacement


def test_requests_and_hits_are_counted() -> None:
    cache = AnswerCache(size=10)
    assert (cache.requests, cache.hits) == (0, 0)
    assert cache.get(key("a.example"), T0) is None
    store(cache, "a.example", ttl=60)
    assert cache.get(key("a.example"), T0 + 1) is not None
    assert cache.get(key("a.example"), T0 + 2) is not None
    assert cache.get(key("b.example"), T0 + 2) is None
    assert cache.get(key("a.example"), T0 + 60) is None  # expired: a request, not a hit
    assert (cache.requests, cache.hits, cache.evictions) == (5, 2, 0)


def test_shrinking_the_size_trims_at_once() -> None:
    """A reload that lowers [cache] size (or sets 0) must not keep serving the entries beyond it."""
    cache = AnswerCache(size=5)
    for name in ("a.example", "b.example", "c.example"):
        store(cache, name)
    cache.size = 1
    assert len(cache) == 1
    assert cache.evictions == 2
    assert cache.get(key("c.example"), T0) is not None  # the most recently used one stays
    cache.size = 0
    assert len(cache) == 0
    assert cache.get(key("c.example"), T0) is None
    cache.size = 10
    store(cache, "a.example")
    assert len(cache) == 1


# ---------------------------------------------------------------------------------------------
# lazy expiry against the passed clock


def test_expiry_is_lazy_and_exact() -> None:
    cache = AnswerCache(size=10)
    entry = store(cache, "a.example", ttl=300)
    assert entry.stored == T0
    assert entry.expires == T0 + 300
    assert len(cache) == 1
    assert cache.get(key("a.example"), T0 + 299.999) is entry
    assert len(cache) == 1  # nothing is removed until someone asks
    assert cache.get(key("a.example"), T0 + 300) is None  # expired at exactly `expires`
    assert len(cache) == 0  # and removed by that lookup
    store(cache, "b.example", ttl=10)
    assert len(cache) == 1  # no timer removes it: only a lookup at or after `expires` does
    assert cache.get(key("b.example"), T0 + 10_000) is None
    assert len(cache) == 0


def test_the_clock_is_the_callers() -> None:
    cache = AnswerCache(size=10)
    store(cache, "a.example", ttl=60, now=5.0)
    assert cache.get(key("a.example"), 64.9) is not None
    assert cache.get(key("a.example"), 65.0) is None


# ---------------------------------------------------------------------------------------------
# clamps, size 0, what is not stored


def test_min_ttl_clamps_lifetime_and_served_ttls() -> None:
    cache = AnswerCache(size=10, min_ttl=60, max_ttl=3600)
    entry = store(cache, "a.example", ttl=5)
    assert entry.expires == T0 + 60
    assert ttls(entry.answer) == [60]
    query = make_query("a.example")
    assert ttls(render(entry, query, T0)) == [60]
    assert ttls(render(entry, query, T0 + 59.9)) == [1]
    assert cache.get(cache_key(query), T0 + 59.9) is entry
    assert cache.get(cache_key(query), T0 + 60) is None


def test_max_ttl_clamps_lifetime_and_served_ttls() -> None:
    cache = AnswerCache(size=10, min_ttl=0, max_ttl=3600)
    entry = store(cache, "a.example", ttl=86400)
    assert entry.expires == T0 + 3600
    query = make_query("a.example")
    assert ttls(render(entry, query, T0)) == [3600]
    assert ttls(render(entry, query, T0 + 100)) == [3500]


def test_clamps_apply_to_every_record_and_negative_answers() -> None:
    cache = AnswerCache(size=10, min_ttl=30, max_ttl=600)
    request = query_record("gone.example")
    reply = request.reply()
    reply.header.rcode = RCODE.NXDOMAIN
    reply.add_auth(RR("example", QTYPE.SOA, rdata=SOA("ns.example", "host.example", (1, 2, 3, 4, 10)), ttl=7200))
    answer = bytes(reply.pack())
    assert analyze(answer).lifetime == 10
    entry = entry_for(cache, answer)
    assert entry.expires == T0 + 30  # min(7200, MINIMUM 10) raised to min_ttl
    assert ttls(entry.answer) == [600]  # the SOA's own TTL lowered to max_ttl


def test_size_zero_disables() -> None:
    cache = AnswerCache(size=0)
    entry = store(cache, "a.example")
    assert len(cache) == 0
    assert cache.get(key("a.example"), T0) is None
    assert (cache.requests, cache.hits, cache.evictions) == (1, 0, 0)
    assert render(entry, make_query("a.example"), T0)  # the fresh answer is still served


def test_uncacheable_answers_are_not_stored() -> None:
    cache = AnswerCache(size=10)
    servfail = query_record("fail.example").reply()
    servfail.header.rcode = RCODE.SERVFAIL
    nodata_without_soa = query_record("empty.example").reply()
    truncated = query_record("tc.example").reply()
    truncated.header.tc = 1
    for name, record in (("fail.example", servfail), ("empty.example", nodata_without_soa), ("tc.example", truncated)):
        answer = bytes(record.pack())
        assert analyze(answer).lifetime is None
        cache.put(key(name), entry_for(cache, answer))
    store(cache, "zero.example", ttl=0)
    assert analyze(a_answer("zero.example", ttl=0)).lifetime == 0
    assert len(cache) == 0
    for name in ("fail.example", "empty.example", "tc.example", "zero.example"):
        assert cache.get(key(name), T0) is None


def test_uncacheable_answers_are_not_stored_even_with_min_ttl() -> None:
    cache = AnswerCache(size=10, min_ttl=60)
    servfail = query_record("fail.example").reply()
    servfail.header.rcode = RCODE.SERVFAIL
    info = analyze(bytes(servfail.pack()))
    assert info.lifetime is None
    cache.put(key("fail.example"), cache.entry_for(bytes(servfail.pack()), info, T0))
    assert len(cache) == 0


# ---------------------------------------------------------------------------------------------
# cache_key


def test_cache_key_folds_case() -> None:
    assert key("WwW.ExAmPle.COM") == key("www.example.com") == key("WWW.EXAMPLE.COM.")
    assert key("www.example.com")[0] == "www.example.com"


def test_cache_key_covers_type_class_do_cd_and_edns() -> None:
    base = make_query("www.example.com")
    variants = {
        "base": base,
        "qtype": make_query("www.example.com", "AAAA"),
        "qclass": make_query("www.example.com", qclass="CH"),
        "edns": make_query("www.example.com", edns=True),
        "do": make_query("www.example.com", edns=True, do=True),
        "cd": make_query("www.example.com", cd=True),
        "cd+edns": make_query("www.example.com", cd=True, edns=True),
        "name": make_query("www2.example.com"),
    }
    keys = {label: cache_key(query) for label, query in variants.items()}
    assert len(set(keys.values())) == len(keys), keys
    assert keys["qclass"][2] == 3  # CHAOS, via the slow path
    # What does not change the upstream's answer is not in the key.
    assert cache_key(make_query("www.example.com", qid=7, rd=False)) == keys["base"]


# ---------------------------------------------------------------------------------------------
# render


def differing_offsets(a: bytes, b: bytes) -> set[int]:
    assert len(a) == len(b)
    return {index for index in range(len(a)) if a[index] != b[index]}


def test_render_keeps_the_clients_id_rd_and_spelling() -> None:
    cache = AnswerCache(size=10)
    stored = a_answer("www.example.com", ttl=300, qid=0x1111, rd=True)
    entry = entry_for(cache, stored)
    client = make_query("WwW.ExAmPle.COM", qid=0xBEEF, rd=False)
    out = render(entry, client, T0)
    assert struct.unpack_from("!H", out)[0] == 0xBEEF
    record = DNSRecord.parse(out)
    assert record.header.rd == 0
    assert str(record.q.qname) == "WwW.ExAmPle.COM."
    assert out[12 : 12 + len(client.question)] == client.question
    assert record.header.qr == 1
    # Only the ID, the RD, AA and RA bits and the question's letters changed (age 0: TTLs untouched).
    question = range(12, 12 + len(client.question))
    changed = differing_offsets(out, stored)
    assert changed <= {0, 1, 2, 3, *question}
    assert out[2] & 0xFA == stored[2] & 0xFA and out[3] == stored[3] | 0x80
    # The owner is a pointer to the question, so it follows the client's spelling too.
    assert str(record.rr[0].rname) == "WwW.ExAmPle.COM."
    assert str(record.rr[0].rdata) == "192.0.2.1"
    # And RD set by the client is set in the answer.
    assert DNSRecord.parse(render(entry, make_query("www.example.com", rd=True), T0)).header.rd == 1


def test_render_ages_ttls_by_whole_seconds() -> None:
    cache = AnswerCache(size=10)
    stored = a_answer("www.example.com", ttl=300)
    entry = entry_for(cache, stored)
    client = make_query("www.example.com")
    assert render(entry, client, T0) == render(entry, client, T0 + 0.999)
    assert ttls(render(entry, client, T0)) == [300]
    assert ttls(render(entry, client, T0 + 10)) == [290]
    assert ttls(render(entry, client, T0 + 10.9)) == [290]
    assert ttls(render(entry, client, T0 + 299.5)) == [1]
    assert ttls(render(entry, client, T0 + 300)) == [0]
    assert ttls(render(entry, client, T0 + 400)) == [0]  # never negative, never wraps
    aged = render(entry, client, T0 + 10)
    ((offset, _ttl),) = entry.ttl_fields
    assert differing_offsets(aged, stored) <= set(range(offset, offset + 4)) | {2, 3}  # TTL; AA, RA
    assert entry.answer == stored  # rendering never changes the stored bytes


def test_render_floors_each_ttl_separately() -> None:
    cache = AnswerCache(size=10)
    request = query_record("www.example.com")
    reply = request.reply()
    reply.add_answer(RR("www.example.com", QTYPE.CNAME, rdata=CNAME("edge.example.net"), ttl=3600))
    reply.add_answer(RR("edge.example.net", QTYPE.A, rdata=A("192.0.2.1"), ttl=20))
    reply.add_ar(RR("ns.example.net", QTYPE.A, rdata=A("192.0.2.53"), ttl=5))
    entry = entry_for(cache, bytes(reply.pack()))
    assert entry.expires == T0 + 5
    assert ttls(render(entry, make_query("www.example.com"), T0 + 15)) == [3585, 5, 0]


def test_render_keeps_the_opt_record() -> None:
    cache = AnswerCache(size=10)
    stored = a_answer("www.example.com", ttl=300, edns=True, do=True)
    entry = entry_for(cache, stored)
    out = render(entry, make_query("WWW.example.com", edns=True, do=True, qid=9), T0 + 100)
    record = DNSRecord.parse(out)
    opt = [rr for rr in record.ar if rr.rtype == QTYPE.OPT]
    assert len(opt) == 1 and opt[0].ttl == 0x8000 and opt[0].rclass == 1232  # DO bit, size intact
    assert ttls(out) == [200]


def test_a_differently_spelled_owner_keeps_its_spelling() -> None:
    """An upstream that answers with its own owner spelling: the owner is not a pointer into the
    question, so it is left as the upstream wrote it; only the question follows the client."""
    cache = AnswerCache(size=10)
    request = query_record("www.example.com")
    reply = request.reply()
    reply.add_answer(RR("WWW.EXAMPLE.COM", QTYPE.A, rdata=A("192.0.2.1"), ttl=300))
    stored = bytes(reply.pack())
    entry = entry_for(cache, stored)
    client = make_query("wWw.eXaMpLe.cOm", qid=77)
    out = render(entry, client, T0 + 1)
    expected = slow_path(stored, "wWw.eXaMpLe.cOm", 77, True, 1, lambda ttl: ttl)
    assert out == expected
    record = DNSRecord.parse(out)
    assert str(record.q.qname) == "wWw.eXaMpLe.cOm."
    assert str(record.rr[0].rname) == "WWW.EXAMPLE.COM."


# ---------------------------------------------------------------------------------------------
# the slow path, and proof that render() gives the same bytes


def respell(name: DNSLabel, stored: tuple[bytes, ...], client: tuple[bytes, ...]) -> DNSLabel:
    """`name` with the longest suffix it shares, byte for byte, with the stored question spelled
    as the client spelled it.

    dnslib compresses case-sensitively: a name in a dnslib answer was written as a pointer into
    the question exactly when (and as far as) it shares a suffix spelled the same way.  Such names
    follow the question's spelling, as they would in the upstream's answer to the client's query
    itself, so the slow path re-spells them the same way before packing.
    """
    labels = tuple(name.label)
    shared = 0
    while shared < min(len(labels), len(stored)) and labels[-shared - 1] == stored[-shared - 1]:
        shared += 1
    if not shared:
        return name
    return DNSLabel(list(labels[: len(labels) - shared] + client[len(client) - shared :]))


def slow_path(stored: bytes, client_name: str, qid: int, rd: bool, age: int, clamp: Callable[[int], int]) -> bytes:
    """A cache hit answered the slow way: full dnslib parse, edit, pack."""
    record = DNSRecord.parse(stored)
    old = tuple(record.q.qname.label)
    new = tuple(DNSLabel(client_name).label)
    record.header.id = qid
    record.header.rd = int(rd)
    record.header.aa = 0  # blockd answers as a recursive service: never authoritative, recursion available
    record.header.ra = 1
    record.q.qname = DNSLabel(client_name)
    for rr in record.rr + record.auth + record.ar:
        if rr.rtype == QTYPE.OPT:
            continue  # its "TTL" is the extended RCODE, version and DO bit
        rr.ttl = max(0, clamp(rr.ttl) - age)
        rr.rname = respell(rr.rname, old, new)
        if isinstance(rr.rdata, CNAME | MX):  # CNAME, NS, PTR, MX: compressed names in rdata
            rr.rdata.label = respell(rr.rdata.label, old, new)
        elif isinstance(rr.rdata, SOA):
            rr.rdata.mname = respell(rr.rdata.mname, old, new)
            rr.rdata.rname = respell(rr.rdata.rname, old, new)
    return bytes(record.pack())


# Question names are made of letters a-h only; every other name's labels contain a letter from
# i-z and a digit, so no other name can share a suffix with the question in any spelling.  Names
# *under* the question (CNAME targets, the SOA zone, its mname) share a suffix spelled exactly as
# the question, as an upstream echoing the question writes them.
question_label = st.text("abcdefgh", min_size=1, max_size=12)
other_label = st.builds(
    lambda a, b: a + b,
    st.text("ijklmnopqrstuvwxyz", min_size=1, max_size=8),
    st.text("0123456789", min_size=1, max_size=2),
)


@st.composite
def spelled(draw, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if flip else c for c, flip in zip(text, flips, strict=True))


@st.composite
def other_name(draw) -> str:
    labels = draw(st.lists(other_label, min_size=1, max_size=4))
    return draw(spelled(".".join(labels)))


@st.composite
def scenario(draw) -> dict:
    base = ".".join(draw(st.lists(question_label, min_size=1, max_size=5)))
    stored_name = draw(spelled(base))
    client_name = draw(spelled(base))
    stored_labels = stored_name.split(".")

    def under_question() -> str:
        cut = draw(st.integers(0, len(stored_labels) - 1))
        prefix = draw(st.lists(other_label, min_size=0, max_size=2))
        return ".".join(prefix + stored_labels[cut:])

    def ttl() -> int:
        return draw(st.one_of(st.integers(0, 1000), st.integers(0, 2**31 - 1)))

    qtype = draw(st.sampled_from(["A", "AAAA", "TXT", "MX", "HTTPS", "NS"]))
    kind = draw(st.sampled_from(["positive", "positive", "nxdomain", "nodata"]))
    edns = draw(st.booleans())
    do = edns and draw(st.booleans())
    cd = draw(st.booleans())
    request = query_record(
        stored_name, qtype, qid=draw(st.integers(0, 0xFFFF)), rd=draw(st.booleans()), edns=edns, do=do, cd=cd
    )
    reply = request.reply()
    reply.header.cd = int(cd)
    owner = stored_name
    for _ in range(draw(st.integers(0, 5 if kind != "nodata" else 0))):
        target = under_question() if draw(st.booleans()) else draw(other_name())
        reply.add_answer(RR(owner, QTYPE.CNAME, rdata=CNAME(target), ttl=ttl()))
        owner = target
    if kind == "positive":
        for index in range(draw(st.integers(1, 3))):
            if qtype == "A":
                rdata = A(f"192.0.2.{index + 1}")
            elif qtype == "AAAA":
                rdata = AAAA(f"2001:db8::{index + 1}")
            elif qtype == "TXT":
                rdata = TXT(f"text {index}")
            elif qtype == "MX":
                rdata = MX(under_question() if draw(st.booleans()) else draw(other_name()), 10 + index)
            elif qtype == "NS":
                rdata = NS(under_question() if draw(st.booleans()) else draw(other_name()))
            else:
                rdata = RR.fromZone(f"x. 1 IN HTTPS 1 . alpn=h2 ipv4hint=198.51.100.{index + 1}")[0].rdata
            reply.add_answer(RR(owner, getattr(QTYPE, qtype), rdata=rdata, ttl=ttl()))
        if draw(st.booleans()):
            reply.add_auth(RR(under_question(), QTYPE.NS, rdata=NS(draw(other_name())), ttl=ttl()))
        if draw(st.booleans()):
            reply.add_ar(RR(draw(other_name()), QTYPE.A, rdata=A("198.51.100.53"), ttl=ttl()))
    else:
        reply.header.rcode = RCODE.NXDOMAIN if kind == "nxdomain" else RCODE.NOERROR
        zone_cut = draw(st.integers(0, len(stored_labels) - 1))
        zone = ".".join(stored_labels[zone_cut:])
        mname = under_question() if draw(st.booleans()) else draw(other_name())
        times = (draw(st.integers(0, 2**32 - 1)), 7200, 900, 1209600, draw(st.integers(0, 100_000)))
        reply.add_auth(RR(zone, QTYPE.SOA, rdata=SOA(mname, draw(other_name()), times), ttl=ttl()))
    if edns:
        reply.add_ar(EDNS0(flags="do" if do else "", udp_len=draw(st.sampled_from([512, 1232, 4096]))))
    min_ttl = draw(st.sampled_from([0, 0, 1, 30, 300]))
    max_ttl = draw(st.sampled_from([86400, 86400, 300, 3600, 7 * 86400]))
    max_ttl = max(max_ttl, min_ttl)
    client = query_record(
        client_name, qtype, qid=draw(st.integers(0, 0xFFFF)), rd=draw(st.booleans()), edns=edns, do=do, cd=cd
    )
    age = draw(st.integers(0, 400)) + draw(st.sampled_from([0.0, 0.25, 0.5, 0.999]))
    return {
        "stored": bytes(reply.pack()),
        "request": request,
        "client": client,
        "client_name": client_name,
        "min_ttl": min_ttl,
        "max_ttl": max_ttl,
        "age": age,
    }


@pytest.mark.timeout(120)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenario())
def test_render_equals_the_slow_path(case: dict) -> None:
    stored: bytes = case["stored"]
    assert bytes(DNSRecord.parse(stored).pack()) == stored  # dnslib reproduces its own bytes
    cache = AnswerCache(size=10, min_ttl=case["min_ttl"], max_ttl=case["max_ttl"])

    def clamp(ttl: int) -> int:
        return min(max(ttl, cache.min_ttl), cache.max_ttl)

    info = analyze(stored)
    entry = cache.entry_for(stored, info, T0)
    stored_key = cache_key(parse(case["request"]))
    cache.put(stored_key, entry)

    client = parse(case["client"])
    assert cache_key(client) == stored_key
    age: float = case["age"]
    now = T0 + age
    expected = slow_path(stored, case["client_name"], client.id, bool(client.flags & wire.FLAG_RD), int(age), clamp)
    assert render(entry, client, now) == expected

    # What the cache holds, and for how long.
    if info.lifetime is None or clamp(info.lifetime) == 0:
        assert len(cache) == 0
        assert cache.get(stored_key, now) is None
    else:
        assert entry.expires == T0 + clamp(info.lifetime)
        assert (cache.get(stored_key, now) is entry) == (age < clamp(info.lifetime))


def test_slow_path_by_hand() -> None:
    """One fixed case of the property above, readable: a CNAME chain, EDNS, 0x20 spelling, 10 s."""
    request = query_record("www.example.com", edns=True, qid=1)
    reply = request.reply()
    reply.add_answer(RR("www.example.com", QTYPE.CNAME, rdata=CNAME("edge.www.example.com"), ttl=300))
    reply.add_answer(RR("edge.www.example.com", QTYPE.CNAME, rdata=CNAME("e1.cdn.example.net"), ttl=300))
    reply.add_answer(RR("e1.cdn.example.net", QTYPE.A, rdata=A("192.0.2.7"), ttl=60))
    reply.add_ar(EDNS0(udp_len=1232))
    stored = bytes(reply.pack())
    cache = AnswerCache(size=10)
    entry = entry_for(cache, stored)
    client = make_query("WwW.ExAmPle.COM", edns=True, qid=0xABCD, rd=False)
    out = render(entry, client, T0 + 10)
    assert out == slow_path(stored, "WwW.ExAmPle.COM", 0xABCD, False, 10, lambda ttl: ttl)
    record = DNSRecord.parse(out)
    assert [str(rr.rname) for rr in record.rr] == ["WwW.ExAmPle.COM.", "edge.WwW.ExAmPle.COM.", "e1.cdn.example.net."]
    assert [rr.ttl for rr in record.rr] == [290, 290, 50]


def test_entry_info_is_the_analysis() -> None:
    cache = AnswerCache(size=10)
    answer = a_answer("www.example.com", ttl=42)
    info = analyze(answer)
    entry = cache.entry_for(answer, info, T0)
    assert isinstance(entry.info, AnswerInfo)
    assert entry.info is info
    assert entry.ttl_fields == info.ttl_fields
    assert entry.answer == answer  # no clamp applied: the very same bytes


def test_serve_stale_keeps_expired_entries_for_stale_max_and_answers_them_with_stale_ttl() -> None:
    cache = AnswerCache(serve_stale=True, stale_max=100, stale_ttl=30)
    store(cache, "stale.example", ttl=10, now=0.0)
    k = key("stale.example")
    assert cache.stale(k, 5.0) is None, "a live entry is not stale"
    assert cache.get(k, 20.0) is None and len(cache) == 1, "expired, but kept for serve-stale"
    stale = cache.stale(k, 20.0)
    assert stale is not None and stale.expires == 50.0
    assert all(ttl == 30 for _, ttl in stale.ttl_fields) and ttls(stale.answer) == [30]
    assert cache.stale_answers == 1
    assert cache.stale(k, 111.0) is None, "past stale_max"
    assert cache.get(k, 111.0) is None and len(cache) == 0


def test_without_serve_stale_expired_entries_go() -> None:
    cache = AnswerCache()
    store(cache, "gone.example", ttl=10, now=0.0)
    k = key("gone.example")
    assert cache.get(k, 20.0) is None and len(cache) == 0
    assert cache.stale(k, 20.0) is None


def test_the_cache_is_bounded_in_estimated_bytes_too() -> None:
    cache = AnswerCache(size=1_000_000, max_bytes=50_000)
    for n in range(200):
        store(cache, f"n{n}.example", ttl=300, now=0.0)
        assert cache.bytes <= 50_000
    assert 0 < len(cache) < 200 and cache.evictions == 200 - len(cache)
    assert cache.get(key("n199.example"), 1.0) is not None, "the newest entries are kept"
    held = cache.bytes
    cache.max_bytes = held // 2  # a reload shrinking it trims at once
    assert cache.bytes <= held // 2
    cache.clear()
    assert cache.bytes == 0


def test_replacing_an_entry_keeps_the_byte_count_exact() -> None:
    cache = AnswerCache()
    for _ in range(5):
        entry = store(cache, "same.example", ttl=300, now=0.0)
    assert len(cache) == 1 and cache.bytes == entry.cost > 0
