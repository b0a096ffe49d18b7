"""The fast path (blockd.wire) and the dnslib slow path (blockd.slowpath) give identical answers.

For every query the fast path accepts, parse_query and parse_query_slow must read the same
fields and blocked_response and blocked_response_slow must write the same bytes; for queries
the fast path declines, the slow path must still produce a valid answer.
"""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
from hypothesis import HealthCheck, assume, example, given, note, settings
from hypothesis import strategies as st

from blockd import slowpath, wire
from blockd.wire import HeaderOnlyError, Query

ACTIONS = ("sinkhole", "nxdomain", "nodata", "refused")
NAMED_QTYPES = (
    wire.TYPE_A,
    wire.TYPE_AAAA,
    wire.TYPE_HTTPS,
    wire.TYPE_SVCB,
    wire.TYPE_TXT,
    wire.TYPE_MX,
    wire.TYPE_ANY,
    wire.TYPE_NS,
    wire.TYPE_SOA,
    wire.TYPE_CNAME,
)
FIELDS = ("id", "flags", "key", "qtype", "qclass", "question", "edns", "udp_size", "dnssec_ok", "options")
LDH = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
SETTINGS = settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# --- building queries byte by byte -----------------------------------------------------------


def encode_name(labels: list[bytes]) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def encode_opt(udp_size: int, dnssec_ok: bool, z: int, version: int, options: list[tuple[int, bytes]]) -> bytes:
    rdata = b"".join(struct.pack("!HH", code, len(data)) + data for code, data in options)
    ttl = (version << 16) | (0x8000 if dnssec_ok else 0) | z
    return b"\x00" + struct.pack("!HHIH", wire.TYPE_OPT, udp_size, ttl, len(rdata)) + rdata


def build_query(
    qid: int, flags: int, qname: bytes, qtype: int, qclass: int = wire.CLASS_IN, opt: bytes | None = None
) -> bytes:
    header = struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 0 if opt is None else 1)
    return header + qname + struct.pack("!HH", qtype, qclass) + (opt or b"")


# --- strategies ------------------------------------------------------------------------------


def random_case(text: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(text), max_size=len(text)).map(
        lambda upper: "".join(c.upper() if u else c.lower() for c, u in zip(text, upper, strict=True))
    )


ldh_label = st.from_regex(r"\A[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
max_label = st.text(alphabet=LDH, min_size=63, max_size=63)
odd_label = st.sampled_from(["*", "_tcp", "_dmarc", "xn--bcher-kva", "a-", "-a", "--"]).flatmap(random_case)
# Printable ASCII other than "." and "\\" is not escaped in keys, so the fast path takes it too.
printable_label = st.text(alphabet=[chr(c) for c in range(0x21, 0x7F) if chr(c) not in ".\\"], min_size=1, max_size=20)
label = st.one_of(ldh_label, ldh_label, max_label, odd_label, printable_label)


@st.composite
def short_names(draw: st.DrawFn) -> list[str]:
    labels = draw(st.lists(label, min_size=1, max_size=10))
    while sum(len(x) + 1 for x in labels) - 1 > 253:
        labels.pop(0)
    return labels or ["a"]


@st.composite
def long_names(draw: st.DrawFn) -> list[str]:
    """Names of about 240..253 characters, up to the longest a query can carry."""
    target = draw(st.integers(240, 253))
    labels: list[str] = []
    remaining = target
    while remaining > 0:
        size = min(remaining, draw(st.integers(1, 63)))
        if remaining - size == 1:
            size -= 1  # leave room for at least one more one-character label after the dot
        if size <= 0:
            size = 1
        labels.append(draw(st.text(alphabet=LDH, min_size=size, max_size=size)))
        remaining -= size + 1
    name = ".".join(labels)
    assert len(name) <= 253
    return labels


names = st.one_of(short_names(), short_names(), long_names())
qtypes = st.one_of(st.sampled_from(NAMED_QTYPES), st.integers(0, 65535))
flags = st.builds(
    lambda rd, cd, ad, z: (wire.FLAG_RD if rd else 0) | (wire.FLAG_CD if cd else 0) | (wire.FLAG_AD if ad else 0) | z,
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0, 0x0040]),
)
# Options dnspython can parse (the declined-query test reads the request with it) ...
well_formed_option = st.one_of(
    st.tuples(st.just(10), st.binary(min_size=8, max_size=8)),  # client cookie
    st.tuples(st.just(10), st.binary(min_size=16, max_size=40)),  # client + server cookie
    st.tuples(st.just(8), st.sampled_from([b"\x00\x01\x18\x00\x0a\x78\x03", b"\x00\x02\x20\x00\xfd\x00\x01\x20"])),
    st.tuples(st.sampled_from([3, 12]), st.just(b"")),  # NSID request, empty padding
    st.tuples(st.integers(65001, 65534), st.binary(max_size=40)),  # local/experimental use
)
# ... and anything at all, which blockd itself never interprets.
option = st.one_of(well_formed_option, st.tuples(st.integers(0, 65535), st.binary(max_size=40)))


def edns_records(options: st.SearchStrategy[tuple[int, bytes]]) -> st.SearchStrategy[bytes | None]:
    return st.one_of(
        st.none(),
        st.builds(
            encode_opt,
            udp_size=st.one_of(st.sampled_from([0, 512, 1232, 4096, 65535]), st.integers(0, 65535)),
            dnssec_ok=st.booleans(),
            z=st.one_of(st.just(0), st.integers(0, 0x7FFF)),
            version=st.just(0),
            options=st.lists(options, max_size=4),
        ),
    )


edns = edns_records(option)
queries = st.builds(
    lambda qid, fl, labels, qtype, opt, trailing: (
        build_query(qid, fl, encode_name([x.encode() for x in labels]), qtype, opt=opt) + trailing
    ),
    st.integers(0, 65535),
    flags,
    names,
    qtypes,
    edns,
    st.one_of(st.just(b""), st.just(b""), st.just(b""), st.binary(min_size=1, max_size=8)),  # ignored by both
)
sinkhole_a = st.one_of(st.just(bytes(4)), st.binary(min_size=4, max_size=4))
sinkhole_aaaa = st.one_of(st.just(bytes(16)), st.binary(min_size=16, max_size=16))
ttls = st.one_of(st.sampled_from([0, 1, 60, 300, 86400, 2**31 - 1]), st.integers(0, 2**32 - 1))
ede_texts = st.one_of(
    st.just("blocked by blockd: tiktok.com on list tiktok"),
    st.text(max_size=80),
    st.text(alphabet="éü中文🙂«» ", max_size=20),
)


def fields(query: Query) -> dict[str, object]:
    return {name: getattr(query, name) for name in FIELDS}


def fast_and_slow(data: bytes) -> tuple[Query, Query, object]:
    fast = wire.parse_query(data)
    slow = slowpath.parse_query_slow(data)
    record = slow.record
    if fast is None:
        assume(not slow.key.endswith("invalid"))  # declined by design (see wire.parse_query)
        raise AssertionError(f"the fast path declined {slow.key!r}")
    return fast, slow, record


# --- the properties --------------------------------------------------------------------------


@SETTINGS
@given(
    data=queries,
    action=st.sampled_from(ACTIONS),
    ttl=ttls,
    sink_a=sinkhole_a,
    sink_aaaa=sinkhole_aaaa,
    text=ede_texts,
)
@example(
    data=build_query(1, wire.FLAG_RD, encode_name([b"WwW", b"TikTok", b"COM"]), wire.TYPE_A),
    action="sinkhole",
    ttl=300,
    sink_a=bytes(4),
    sink_aaaa=bytes(16),
    text="",
)
@example(
    data=build_query(
        2,
        0,
        encode_name([b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 61]),
        wire.TYPE_HTTPS,
        opt=encode_opt(1232, True, 0, 0, [(3, b"")]),
    ),
    action="nxdomain",
    ttl=0,
    sink_a=bytes(4),
    sink_aaaa=bytes(16),
    text="ü",
)
def test_blocked_responses_are_identical(
    data: bytes, action: str, ttl: int, sink_a: bytes, sink_aaaa: bytes, text: str
) -> None:
    fast, slow, record = fast_and_slow(data)
    fast_answer = wire.blocked_response(fast, action, ttl, sink_a, sink_aaaa, text)
    slow_answer = slowpath.blocked_response_slow(record, slow, action, ttl, sink_a, sink_aaaa, text)
    note(f"query  {data.hex()}")
    note(f"fast   {fast_answer.hex()}")
    note(f"slow   {slow_answer.hex()}")
    assert fast_answer == slow_answer
    assert type(fast_answer) is type(slow_answer) is bytes
    message = dns.message.from_wire(fast_answer)
    assert message.id == fast.id
    assert fast_answer[12 : 12 + len(fast.question)] == fast.question


@SETTINGS
@given(data=queries)
def test_parsed_fields_are_identical(data: bytes) -> None:
    fast, slow, _record = fast_and_slow(data)
    assert fields(fast) == fields(slow)
    assert fast.raw == slow.raw == data
    assert fast.response_limit == slow.response_limit


@SETTINGS
@given(data=queries, rcode=st.sampled_from([wire.RCODE_REFUSED, wire.RCODE_SERVFAIL]), text=ede_texts)
def test_error_responses_are_identical(data: bytes, rcode: int, text: str) -> None:
    # error_response is shared by both paths: the Query each path builds must give the same bytes.
    fast, slow, _record = fast_and_slow(data)
    assert wire.error_response(fast, rcode, wire.EDE_PROHIBITED, text) == wire.error_response(
        slow, rcode, wire.EDE_PROHIBITED, text
    )


# --- queries the fast path declines ----------------------------------------------------------

odd_bytes_label = st.one_of(
    st.binary(min_size=1, max_size=20).filter(lambda b: any(c in b for c in b".\\ \x00") or not b.isascii()),
    st.sampled_from([b"a.b", b"a\\b", "bücher".encode(), b"a b", b"\xff", b"\x00"]),
)


@st.composite
def declined_queries(draw: st.DrawFn) -> bytes:
    qid = draw(st.integers(0, 65535))
    fl = draw(flags)
    qtype = draw(qtypes)
    labels = [x.encode() for x in draw(short_names())]
    kind = draw(st.sampled_from(["bytes", "class", "pointer", "invalid", "ancount", "arcount", "version", "root"]))
    qclass = wire.CLASS_IN
    opt = draw(edns_records(well_formed_option))
    header_counts = (1, 0, 0, 0 if opt is None else 1)
    if kind == "bytes":
        labels.insert(draw(st.integers(0, len(labels))), draw(odd_bytes_label))
        while sum(len(x) + 1 for x in labels) + 1 > 255:
            labels.pop()
        qname = encode_name(labels)
    elif kind == "class":
        qclass = draw(st.sampled_from([3, 4, 254, 255]) | st.integers(2, 65535))
        qname = encode_name(labels)
    elif kind == "pointer":
        # Offset 4 is the high byte of QDCOUNT, always 0: a root name the question can point at.
        qname = encode_name(labels)[:-1] + b"\xc0\x04"
    elif kind == "invalid":
        qname = encode_name([*labels[-3:], draw(random_case("invalid")).encode()])
    elif kind == "root":
        qname = b"\x00"
    else:
        qname = encode_name(labels)
    if kind == "version":
        opt = encode_opt(1232, draw(st.booleans()), 0, draw(st.integers(1, 255)), [])
        header_counts = (1, 0, 0, 1)
    body = qname + struct.pack("!HH", qtype, qclass)
    extra = opt or b""
    if kind == "ancount":
        extra = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + b"\x01\x02\x03\x04" + extra
        header_counts = (1, 1, 0, header_counts[3])
    elif kind == "arcount":
        extra = extra + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + b"\x01\x02\x03\x04"
        header_counts = (1, 0, 0, header_counts[3] + 1)
    return struct.pack("!HH", qid, fl) + struct.pack("!HHHH", *header_counts) + body + extra


def _is_utf8(label: bytes) -> bool:
    try:
        label.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@SETTINGS
@given(data=declined_queries(), action=st.sampled_from(ACTIONS), ttl=st.integers(0, 2**31 - 1), text=ede_texts)
def test_declined_queries_get_a_valid_slow_answer(data: bytes, action: str, ttl: int, text: str) -> None:
    note(f"query {data.hex()}")
    assert wire.parse_query(data) is None
    request = dns.message.from_wire(data, ignore_trailing=True)
    try:
        query = slowpath.parse_query_slow(data)
        record = query.record
    except slowpath.BadVersion as exc:
        answer = slowpath.badvers_response(exc.query)
        message = dns.message.from_wire(answer)
        assert message.id == request.id
        assert message.rcode() == dns.rcode.BADVERS
        assert message.question == request.question
        return
    except HeaderOnlyError as exc:
        # dnslib refuses labels that are not UTF-8 (DNS allows any bytes): FORMERR, header only.
        assert not all(_is_utf8(x) for x in request.question[0].name.labels), str(exc)
        assert exc.rcode == wire.RCODE_FORMERR
        message = dns.message.from_wire(wire.header_only_response(exc.query_id, exc.flags, exc.rcode))
        assert message.id == request.id
        assert message.rcode() == dns.rcode.FORMERR
        return
    answer = slowpath.blocked_response_slow(record, query, action, ttl, bytes(4), bytes(16), text)
    message = dns.message.from_wire(answer)
    assert message.id == request.id
    assert message.flags & dns.flags.QR
    assert message.flags & dns.flags.RA
    assert bool(message.flags & dns.flags.RD) == bool(request.flags & dns.flags.RD)
    assert bool(message.flags & dns.flags.CD) == bool(request.flags & dns.flags.CD)
    (asked,) = request.question
    (echoed,) = message.question
    # The client's own case and bytes, compared label by label (dnspython's == ignores case).
    assert echoed.name.labels == asked.name.labels
    assert (echoed.rdtype, echoed.rdclass) == (asked.rdtype, asked.rdclass)
    expected_rcode = {"nxdomain": dns.rcode.NXDOMAIN, "refused": dns.rcode.REFUSED}.get(action, dns.rcode.NOERROR)
    assert message.rcode() == expected_rcode
    if action == "refused":
        assert message.answer == message.authority == []
    elif message.answer:
        assert action == "sinkhole" and echoed.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
    else:
        (soa,) = message.authority
        assert soa.rdtype == dns.rdatatype.SOA and soa.name.labels == asked.name.labels
    if request.edns >= 0:
        (ede,) = message.options
        assert ede.otype == dns.edns.OptionType.EDE
    else:
        assert message.edns == -1
