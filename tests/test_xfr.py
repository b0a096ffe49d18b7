"""blockd.xfr: transfer queries, the byte-level message reader, the TSIG chain, and assembly.

The fake primary below builds its messages with dnspython (its compression, its renderer) and
signs them with dns.tsig.sign the way a primary does over a multi-message transfer, so the
reader and the verifier are checked against another implementation, not against themselves.
Helpers without a test_ prefix are shared with test_refresh.py and test_transfer_knot.py.
"""

from __future__ import annotations

import ast
import struct
import time
from collections.abc import Sequence
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TSIG
import dns.rrset
import dns.tsig
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockd.framing import FrameReader, frame
from blockd.tsig_key import TsigKey, to_dnspython
from blockd.xfr import (
    FullZone,
    Incremental,
    Refused,
    TransferAssembler,
    TsigError,
    TsigVerifier,
    UpToDate,
    XfrError,
    XfrMessage,
    read_message,
    serial_newer,
    soa_serial,
    soa_timers,
    transfer_query,
)

ZONE = "rpz.example"
KEY = TsigKey("rpz-key", "hmac-sha256", b"k" * 32)
OTHER_SECRET = TsigKey("rpz-key", "hmac-sha256", b"x" * 32)
OTHER_NAME = TsigKey("other-key", "hmac-sha256", b"k" * 32)
NOW = 1_700_000_000
QID = 4242


def soa_text(serial: int, refresh: int = 3600, retry: int = 600, expire: int = 86400) -> str:
    return f"ns.{ZONE}. hostmaster.{ZONE}. {serial} {refresh} {retry} {expire} 60"


def rr(owner: str, rtype: str, text: str, ttl: int = 300) -> tuple[str, int, str, str]:
    return (owner, ttl, rtype, text)


def soa(serial: int) -> tuple[str, int, str, str]:
    return rr(ZONE + ".", "SOA", soa_text(serial))


def response(
    records: Sequence[tuple[str, int, str, str]],
    qtype: str = "AXFR",
    qid: int = QID,
    rcode: int = 0,
    question: bool = True,
    zone: str = ZONE,
) -> bytes:
    """One response message as a primary renders it (dnspython compresses the names)."""
    message = dns.message.Message(id=qid)
    message.flags = dns.flags.QR | dns.flags.AA
    message.set_rcode(dns.rcode.Rcode.make(rcode))
    if question:
        message.question.append(
            dns.rrset.RRset(dns.name.from_text(zone + "."), dns.rdataclass.IN, dns.rdatatype.from_text(qtype))
        )
    for owner, ttl, rtype, text in records:
        message.answer.append(dns.rrset.from_text(owner, ttl, "IN", rtype, text))
    return message.to_wire()


def split(records: Sequence[tuple[str, int, str, str]], sizes: Sequence[int], **kw: object) -> list[bytes]:
    """Records over several messages of the given sizes (the last takes the rest)."""
    messages = []
    at = 0
    for size in sizes:
        messages.append(response(records[at : at + size], **kw))  # type: ignore[arg-type]
        at += size
    messages.append(response(records[at:], question=False, **kw))  # type: ignore[arg-type]
    return messages


def add_tsig(wire: bytes, key: TsigKey, rdata: dns.rdtypes.ANY.TSIG.TSIG) -> bytes:
    """The message with a TSIG record appended (arcount + 1)."""
    body = rdata.to_wire() or b""
    record = dns.name.from_text(key.name + ".").to_wire() + struct.pack("!HHIH", 250, 255, 0, len(body)) + body
    arcount = struct.unpack_from("!H", wire, 10)[0]
    return wire[:10] + struct.pack("!H", arcount + 1) + wire[12:] + record


def sign_chain(
    wires: Sequence[bytes],
    key: TsigKey,
    request_mac: bytes,
    now: int = NOW,
    unsigned: Sequence[int] = (),
    error: int = 0,
) -> list[bytes]:
    """Sign a transfer's messages as a primary does (RFC 8945 5.3.1); indexes in unsigned stay unsigned.

    An unsigned message still goes into the digest of the next signed one.
    """
    dkey = to_dnspython(key)
    ctx = None
    out = []
    for index, wire in enumerate(wires):
        if index in unsigned:
            assert ctx is not None, "the first message must be signed"
            ctx.update(wire)
            out.append(wire)
            continue
        template = dns.rdtypes.ANY.TSIG.TSIG(
            dns.rdataclass.ANY,
            dns.rdatatype.TSIG,
            dkey.algorithm,
            now,
            300,
            b"",
            struct.unpack_from("!H", wire)[0],
            error,
            b"",
        )
        rdata, ctx = dns.tsig.sign(wire, dkey, template, now, request_mac, ctx, True)
        out.append(add_tsig(wire, key, rdata))
    return out


def primary_error(wire: bytes, key: TsigKey, error: int) -> bytes:
    """A primary's unsigned TSIG error answer (BADKEY, BADSIG: empty MAC)."""
    rdata = dns.rdtypes.ANY.TSIG.TSIG(
        dns.rdataclass.ANY, dns.rdatatype.TSIG, to_dnspython(key).algorithm, NOW, 300, b"", QID, error, b""
    )
    return add_tsig(wire, key, rdata)


def assemble(
    wires: Sequence[bytes],
    serial: int | None = None,
    key: TsigKey | None = None,
    request_mac: bytes = b"",
    now: float = NOW,
    qid: int = QID,
) -> tuple[object, TransferAssembler]:
    verifier = TsigVerifier(key, request_mac) if key is not None else None
    assembler = TransferAssembler(ZONE, serial, qid, verifier)
    result = None
    for wire in wires:
        result = assembler.feed(read_message(wire), now)
    return result, assembler


RPZ = [
    rr(f"tiktok.com.{ZONE}.", "CNAME", "."),
    rr(f"*.tiktok.com.{ZONE}.", "CNAME", "."),
    rr(f"bytedance.com.{ZONE}.", "CNAME", "*."),
    rr(f"ok.tiktok.com.{ZONE}.", "CNAME", "rpz-passthru."),
    rr(f"ns.{ZONE}.", "A", "192.0.2.53"),
]
AXFR = [soa(7), *RPZ, soa(7)]
RPZ_KEYS = [owner.rstrip(".") for owner, *_ in RPZ]


def keys(records: Sequence[tuple[str, int, int, int, bytes]]) -> list[str]:
    return [record[0] for record in records]


# --- the query ---------------------------------------------------------------------------------


def test_axfr_query() -> None:
    wire, mac = transfer_query(ZONE, None, None, 1234)
    query = dns.message.from_wire(wire)
    assert mac is None
    assert query.id == 1234
    assert query.flags == 0  # no RD: a transfer is not recursive
    assert query.question[0].name == dns.name.from_text(ZONE + ".")
    assert query.question[0].rdtype == dns.rdatatype.AXFR
    assert not query.authority and not query.additional


def test_ixfr_query_carries_our_serial() -> None:
    wire, _mac = transfer_query(ZONE + ".", 2026010101, None, 7)
    query = dns.message.from_wire(wire)
    assert query.question[0].rdtype == dns.rdatatype.IXFR
    (rrset,) = query.authority
    assert rrset.name == dns.name.from_text(ZONE + ".")
    assert rrset.rdtype == dns.rdatatype.SOA
    assert rrset[0].serial == 2026010101


def test_signed_query_verifies_with_dnspython_and_gives_its_mac() -> None:
    wire, mac = transfer_query(ZONE, 5, KEY, 99)
    query = dns.message.from_wire(wire, keyring=to_dnspython(KEY))
    assert query.had_tsig
    assert mac == query.mac and mac is not None and len(mac) == 32
    assert query.keyname == dns.name.from_text("rpz-key.")


# --- reading messages --------------------------------------------------------------------------


def test_read_message_header_question_and_records() -> None:
    message = read_message(response(AXFR))
    assert (message.id, message.rcode, message.opcode) == (QID, 0, 0)
    assert message.flags & 0x8000
    assert message.question is not None
    assert (message.question.name, message.question.qtype, message.question.qclass) == (ZONE, 252, 1)
    assert message.tsig is None
    assert keys(message.answers) == [ZONE, *RPZ_KEYS, ZONE]
    owner, rtype, rclass, ttl, rdata = message.answers[1]
    assert (owner, rtype, rclass, ttl, rdata) == (f"tiktok.com.{ZONE}", 5, 1, 300, b"\x00")
    assert message.answers[3][4] == b"\x01*\x00"
    assert message.answers[4][4] == b"\x0crpz-passthru\x00"


@pytest.mark.parametrize(
    ("rtype", "text"),
    [
        ("NS", f"ns1.{ZONE}."),
        ("CNAME", f"target.{ZONE}."),
        ("DNAME", f"other.{ZONE}."),
        ("PTR", f"host.{ZONE}."),
        ("MX", f"10 mail.{ZONE}."),
        ("SOA", soa_text(9)),
        ("SRV", f"1 2 443 svc.{ZONE}."),
        ("NAPTR", f'100 10 "u" "E2U+sip" "!^.*$!sip:x@example!" naptr.{ZONE}.'),
        ("RP", f"admin.{ZONE}. txt.{ZONE}."),
        ("AFSDB", f"1 afs.{ZONE}."),
        ("PX", f"10 map.{ZONE}. x400.{ZONE}."),
        ("RT", f"5 relay.{ZONE}."),
        ("HTTPS", f'1 svc.{ZONE}. alpn="h2" ipv4hint="192.0.2.1"'),
        ("TXT", '"blocked by policy"'),
        ("AAAA", "2001:db8::1"),
    ],
)
def test_rdata_comes_out_uncompressed(rtype: str, text: str) -> None:
    # Owners and targets share suffixes, so every name in the message is compressible.
    records = [soa(1), rr(f"a.{ZONE}.", rtype, text), rr(f"b.a.{ZONE}.", rtype, text), soa(1)]
    message = read_message(response(records))
    expected = dns.rdata.from_text("IN", rtype, text).to_wire()  # uncompressed, as RFC 3597 wants
    assert [record[4] for record in message.answers[1:3]] == [expected, expected]


def compressed_srv() -> bytes:
    # dnspython never compresses SRV targets (RFC 2782 says not to); some servers do anyway.
    question = b"\x03rpz\x07example\x00" + struct.pack("!HH", 252, 1)
    rdata = struct.pack("!HHH", 1, 2, 443) + b"\x03svc\xc0\x0c"
    record = b"\x03srv\xc0\x0c" + struct.pack("!HHIH", 33, 1, 300, len(rdata)) + rdata
    return struct.pack("!HHHHHH", QID, 0x8400, 1, 1, 0, 0) + question + record


def test_compressed_srv_target_is_decompressed() -> None:
    (record,) = read_message(compressed_srv()).answers
    assert record == (f"srv.{ZONE}", 33, 1, 300, struct.pack("!HHH", 1, 2, 443) + b"\x03svc\x03rpz\x07example\x00")


@pytest.mark.parametrize(
    ("owner", "key"),
    [
        (f"TikTok.COM.{ZONE}.", f"tiktok.com.{ZONE}"),
        (f"a\\.b.{ZONE}.", f"a\\046b.{ZONE}"),  # a dot inside a label never equals two labels
        (f"caf\\195\\169.{ZONE}.", f"caf\\195\\169.{ZONE}"),
        (f"*.x.{ZONE}.", f"*.x.{ZONE}"),
    ],
)
def test_owners_are_keys(owner: str, key: str) -> None:
    message = read_message(response([rr(owner, "CNAME", ".")]))
    assert message.answers[0][0] == key


def test_extended_rcode_from_opt() -> None:
    message = dns.message.Message(id=QID)
    message.flags = dns.flags.QR
    message.use_edns(0)
    message.set_rcode(dns.rcode.BADVERS)
    assert read_message(message.to_wire()).rcode == 16


def header(qd: int = 1, an: int = 1, ns: int = 0, ar: int = 0, qid: int = QID) -> bytes:
    return struct.pack("!HHHHHH", qid, 0x8400, qd, an, ns, ar)


QUESTION = b"\x03rpz\x07example\x00" + struct.pack("!HH", 252, 1)


def cname(owner: bytes, rdata: bytes = b"\x00", rtype: int = 5, rdlength: int | None = None) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, 300, len(rdata) if rdlength is None else rdlength) + rdata


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"\x00" * 11, "shorter than a DNS header"),
        (header(an=0) + QUESTION[:5], "truncated"),
        (header(an=0) + QUESTION[:-1], "truncated"),
        (header(qd=2, an=0) + QUESTION * 2, "2 questions"),
        (header() + QUESTION + cname(b"\x01a\xc0\x30"), "bad compression pointer"),  # forward
        (header() + QUESTION + cname(b"\x01a\xc0\x05"), "bad compression pointer"),  # into the header
        (header() + QUESTION + b"\xc0\x21" + cname(b"\xc0\x1d"), "bad compression pointer"),  # loop
        (header() + QUESTION + cname(b"\x41a"), "unknown label type"),
        (header() + QUESTION + b"\x3faaa", "truncated"),
        (header() + QUESTION + cname((b"\x3f" + b"a" * 63) * 4 + b"\x00"), "longer than 255"),
        (header() + QUESTION + cname(b"\xc0\x0c", rdlength=5), "runs past the end"),
        (header() + QUESTION + cname(b"\xc0\x0c", b"\x01a\x00\x00"), "does not match its name"),
        (header() + QUESTION + cname(b"\xc0\x0c", b"\x01a"), "truncated"),
        (header(an=2) + QUESTION + cname(b"\xc0\x0c", b"\x01a") + cname(b"\xc0\x0c"), "does not match its name"),
        (header() + QUESTION + cname(b"\xc0\x0c", b"\x00\x00" + b"\x00" * 19, rtype=6), "does not match its fields"),
        (header() + QUESTION + cname(b"\xc0\x0c") + b"\x00", "trailing bytes"),
        (header(an=2) + QUESTION + cname(b"\xc0\x0c"), "truncated"),
        (header(an=0, ar=2) + QUESTION + cname(b"\x00", b"", rtype=250) + cname(b"\x00", b""), "not the last record"),
        (header(an=0, ar=1) + QUESTION + cname(b"\x00", b"\x00" * 4, rtype=250), "TSIG record not of class ANY"),
    ],
)
def test_malformed_messages(wire: bytes, reason: str) -> None:
    with pytest.raises(XfrError) as raised:
        read_message(wire)
    assert reason in raised.value.reason


def test_malformed_tsig_rdata() -> None:
    record = b"\x00" + struct.pack("!HHIH", 250, 255, 0, 3) + b"\x01a\x00"
    with pytest.raises(XfrError, match="malformed TSIG record"):
        read_message(header(an=0, ar=1) + QUESTION + record)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_give_a_message_or_xfr_error(wire: bytes) -> None:
    try:
        read_message(wire)
    except XfrError:
        pass


SIGNED_SAMPLE = sign_chain([response(AXFR)], KEY, b"\x01" * 32)[0]
SAMPLES = [response(AXFR), SIGNED_SAMPLE, compressed_srv()]


@settings(max_examples=1500, deadline=None)
@given(
    st.sampled_from(SAMPLES),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=6),
    st.integers(0, 2000),
)
def test_fuzz_mutated_messages_give_a_message_or_xfr_error(
    sample: bytes, changes: list[tuple[int, int]], cut: int
) -> None:
    wire = bytearray(sample)
    for at, value in changes:
        wire[at % len(wire)] = value
    try:
        read_message(bytes(wire[: len(wire) - cut % 40]))
    except XfrError:
        pass


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_mutated_signed_messages_fail_only_with_xfr_errors(changes: list[tuple[int, int]]) -> None:
    wire = bytearray(SIGNED_SAMPLE)
    for at, value in changes:
        wire[at % len(wire)] = value
    try:
        assemble([bytes(wire)], key=KEY, request_mac=b"\x01" * 32)
    except XfrError:
        pass


RECORD_CHOICES = [
    soa(1),
    soa(2),
    soa(3),
    rr(f"a.{ZONE}.", "CNAME", "."),
    rr(f"b.{ZONE}.", "A", "192.0.2.1"),
    rr("x.", "NS", "y."),
]


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(st.sampled_from(RECORD_CHOICES), max_size=12),
    st.lists(st.integers(0, 4), max_size=4),
    st.sampled_from([None, 1, 2, 3]),
)
def test_fuzz_any_record_sequence_gives_a_result_or_xfr_error(
    records: list[tuple[str, int, str, str]], sizes: list[int], serial: int | None
) -> None:
    assembler = TransferAssembler(ZONE, serial, QID)
    try:
        for wire in split(records, sizes, qtype="AXFR" if serial is None else "IXFR"):
            assembler.feed(read_message(wire))
    except XfrError:
        return
    if assembler.result is not None:
        assert isinstance(assembler.result, (FullZone, Incremental, UpToDate))


LABEL = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(LABEL, min_size=1, max_size=4), st.sampled_from(["CNAME", "NS", "MX", "A"])), max_size=30
    )
)
def test_reader_agrees_with_dnspython(entries: list[tuple[list[str], str]]) -> None:
    texts = {"CNAME": f"t.{ZONE}.", "NS": "ns.example.net.", "MX": f"5 mx.{ZONE}.", "A": "192.0.2.1"}
    records = (
        [soa(3)] + [rr(".".join(labels) + f".{ZONE}.", rtype, texts[rtype]) for labels, rtype in entries] + [soa(3)]
    )
    wire = response(records)
    ours = read_message(wire).answers
    theirs = []
    for rrset in dns.message.from_wire(wire, one_rr_per_rrset=True).answer:
        for rdata in rrset:
            theirs.append(
                (rrset.name.to_text(omit_final_dot=True), rrset.rdtype, rrset.rdclass, rrset.ttl, rdata.to_wire())
            )
    assert ours == theirs


# --- serial arithmetic and SOA fields ----------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "newer"),
    [(2, 1, True), (1, 2, False), (1, 1, False), (0, 0xFFFFFFFF, True), (5, 0xFFFFFFF0, True), (0x80000000, 0, False)],
)
def test_serial_newer(a: int, b: int, newer: bool) -> None:
    assert serial_newer(a, b) is newer


def test_soa_fields() -> None:
    record = read_message(response([rr(ZONE + ".", "SOA", soa_text(77, 100, 20, 9000))])).answers[0]
    assert soa_serial(record) == 77
    assert soa_timers(record) == (100, 20, 9000)


# --- TSIG over a transfer ----------------------------------------------------------------------

REQUEST_MAC = b"\x5a" * 32
THREE = split(AXFR, [3, 2])  # three messages


def test_signed_transfer_verifies() -> None:
    result, assembler = assemble(sign_chain(THREE, KEY, REQUEST_MAC), key=KEY, request_mac=REQUEST_MAC)
    assert isinstance(result, FullZone)
    assert keys(result.records) == RPZ_KEYS
    assert assembler.messages == 3


@pytest.mark.parametrize(
    ("wires", "now", "reason"),
    [
        # the primary signs with another secret under our key's name
        (sign_chain(THREE, OTHER_SECRET, REQUEST_MAC), NOW, "bad signature (BADSIG)"),
        # a key we do not have
        (sign_chain(THREE, OTHER_NAME, REQUEST_MAC), NOW, "unknown key 'other-key' (BADKEY)"),
        # signed as an answer to some other query
        (sign_chain(THREE, KEY, b"\x00" * 32), NOW, "bad signature (BADSIG)"),
        # our clock and the primary's five minutes and a second apart (fudge 300)
        (sign_chain(THREE, KEY, REQUEST_MAC), NOW + 301, "clock skew (BADTIME)"),
        # first and last message must be signed
        (sign_chain(THREE, KEY, REQUEST_MAC, unsigned=[2]), NOW, "unsigned message (the last message"),
        ([THREE[0], *sign_chain(THREE, KEY, REQUEST_MAC)[1:]], NOW, "unsigned message (the first message"),
        # messages reordered: the chain breaks
        (
            [sign_chain(THREE, KEY, REQUEST_MAC)[i] for i in (0, 2, 1)],
            NOW,
            "bad signature (BADSIG)",
        ),
        # the primary's own verdict on our query
        ([primary_error(response([], rcode=9), KEY, 17)], NOW, "primary rejected our TSIG: unknown key (BADKEY)"),
        ([primary_error(response([], rcode=9), KEY, 16)], NOW, "primary rejected our TSIG: bad signature (BADSIG)"),
        ([primary_error(response([], rcode=9), KEY, 18)], NOW, "primary rejected our TSIG: clock skew (BADTIME)"),
        # a signed answer with a TSIG error on NOERROR
        (sign_chain(THREE[:1], KEY, REQUEST_MAC, error=22), NOW, "bad truncation (BADTRUNC)"),
    ],
)
def test_tsig_failures(wires: list[bytes], now: int, reason: str) -> None:
    with pytest.raises(TsigError) as raised:
        assemble(wires, key=KEY, request_mac=REQUEST_MAC, now=now)
    assert reason in raised.value.reason


def test_unsigned_middle_message_is_covered_by_the_next_signature() -> None:
    # RFC 8945 5.3.1: a primary may leave up to 99 messages in a row unsigned (NSD signs every
    # 100th); the next signed message's MAC covers them.
    wires = sign_chain(THREE, KEY, REQUEST_MAC, unsigned=[1])
    result, _ = assemble(wires, key=KEY, request_mac=REQUEST_MAC)
    assert isinstance(result, FullZone) and len(result.records) == len(RPZ)


def test_tampered_unsigned_middle_message_fails_at_the_next_signature() -> None:
    wires = sign_chain(THREE, KEY, REQUEST_MAC, unsigned=[1])
    forged = response(AXFR[3:5], question=False)
    forged = forged.replace(b"\x00\x05\x00\x01\x00\x00\x01\x2c", b"\x00\x05\x00\x01\x00\x00\x01\x2d", 1)  # a TTL
    assert forged != wires[1]
    with pytest.raises(TsigError, match=r"bad signature \(BADSIG\)"):
        assemble([wires[0], forged, wires[2]], key=KEY, request_mac=REQUEST_MAC)


def test_at_most_99_unsigned_messages_in_a_row() -> None:
    body = [rr(f"n{i}.{ZONE}.", "CNAME", ".") for i in range(101)]
    wires = [response([soa(7)])] + [response([record], question=False) for record in body] + [response([soa(7)])]
    ok = sign_chain(wires[:101] + wires[-1:], KEY, REQUEST_MAC, unsigned=range(1, 100))
    result, _ = assemble(ok, key=KEY, request_mac=REQUEST_MAC)
    assert isinstance(result, FullZone)
    too_many = sign_chain(wires, KEY, REQUEST_MAC, unsigned=range(1, 101))
    with pytest.raises(TsigError, match="100 in a row"):
        assemble(too_many, key=KEY, request_mac=REQUEST_MAC)


def test_without_a_key_a_signed_answer_is_taken_unverified() -> None:
    result, _ = assemble(sign_chain(THREE, OTHER_NAME, REQUEST_MAC))
    assert isinstance(result, FullZone) and len(result.records) == len(RPZ)


def test_without_a_key_the_primarys_tsig_error_still_fails() -> None:
    with pytest.raises(TsigError, match="BADKEY"):
        assemble([primary_error(response([], rcode=9), KEY, 17)])


def test_an_unsigned_refusal_is_reported_as_the_refusal() -> None:
    # A primary whose ACL does not know us answers unsigned: the rcode is what to report.
    with pytest.raises(Refused) as raised:
        assemble([response([], rcode=5)], key=KEY, request_mac=REQUEST_MAC)
    assert raised.value.rcode == 5


# --- assembling: AXFR --------------------------------------------------------------------------


def test_axfr_in_one_message() -> None:
    result, assembler = assemble([response(AXFR)])
    assert isinstance(result, FullZone)
    assert result.serial == 7 and result.soa[0] == ZONE
    assert keys(result.records) == RPZ_KEYS
    assert assembler.complete and assembler.records == len(AXFR)


@pytest.mark.parametrize("sizes", [[1], [1, 1], [2, 3], [6], [1, 1, 1, 1, 1, 1]])
def test_axfr_over_several_messages(sizes: list[int]) -> None:
    result, _ = assemble(split(AXFR, sizes))
    assert isinstance(result, FullZone) and keys(result.records) == RPZ_KEYS


def test_axfr_of_an_empty_zone() -> None:
    result, _ = assemble([response([soa(1), soa(1)])])
    assert result == FullZone(read_message(response([soa(1)])).answers[0], [])


def test_out_of_zone_records_are_dropped_and_counted() -> None:
    result, assembler = assemble([response([soa(7), rr("tiktok.com.", "CNAME", "."), *RPZ, soa(7)])])
    assert isinstance(result, FullZone) and "tiktok.com" not in keys(result.records)
    assert len(result.records) == len(RPZ) and assembler.out_of_zone == 1


def feed_all(assembler: TransferAssembler, wires: Sequence[bytes]) -> object:
    result = None
    for wire in wires:
        result = assembler.feed(read_message(wire))
    return result


@pytest.mark.parametrize(
    ("wires", "error", "reason"),
    [
        ([response(RPZ)], XfrError, "does not start with the zone's SOA"),
        ([response([rr(f"sub.{ZONE}.", "SOA", soa_text(7)), soa(7)])], XfrError, "does not start with the zone's SOA"),
        ([response([soa(7), *RPZ, soa(8)])], XfrError, "does not end with the starting SOA"),
        ([response([*AXFR, RPZ[0]])], XfrError, "records after the end"),
        ([response(AXFR), response([], question=False)], XfrError, "after the transfer was complete"),
        ([response(AXFR, qid=1)], XfrError, "ID mismatch"),
        ([response(AXFR, zone="other.example")], XfrError, "mismatched question"),
        ([response(AXFR, qtype="IXFR")], XfrError, "mismatched question"),
        ([response([], rcode=5)], Refused, "REFUSED"),
        ([response([], rcode=9)], Refused, "NOTAUTH"),
        ([response([], rcode=4)], Refused, "NOTIMP"),
        ([response([], rcode=1)], Refused, "FORMERR"),
        ([response([], rcode=2)], XfrError, "SERVFAIL"),
        ([response(AXFR[:2]), response([], rcode=2, question=False)], XfrError, "SERVFAIL"),
    ],
)
def test_axfr_failures(wires: list[bytes], error: type[XfrError], reason: str) -> None:
    with pytest.raises(error) as raised:
        feed_all(TransferAssembler(ZONE, None, QID), wires)
    assert reason in raised.value.reason
    if error is XfrError:
        assert not isinstance(raised.value, Refused)


def with_flags(wire: bytes, flags: int) -> bytes:
    return wire[:2] + struct.pack("!H", flags) + wire[4:]


@pytest.mark.parametrize(
    ("flags", "reason"),
    [(0x0400, "not a response"), (0x8000 | 0x2800, "not a response"), (0x8200, "truncated (TC)")],
)
def test_header_flags(flags: int, reason: str) -> None:
    with pytest.raises(XfrError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        feed_all(TransferAssembler(ZONE, None, QID), [with_flags(response(AXFR), flags)])


def test_read_message_returns_an_xfr_message() -> None:
    assert isinstance(read_message(response(AXFR)), XfrMessage)


# --- assembling: IXFR --------------------------------------------------------------------------


def ixfr(*records: tuple[str, int, str, str]) -> bytes:
    return response(list(records), qtype="IXFR")


A = rr(f"a.{ZONE}.", "CNAME", ".")
B = rr(f"b.{ZONE}.", "CNAME", ".")
C = rr(f"c.{ZONE}.", "CNAME", "*.")
D = rr(f"d.{ZONE}.", "CNAME", "rpz-drop.")


def owners(
    step: tuple[list[tuple[str, int, int, int, bytes]], list[tuple[str, int, int, int, bytes]]],
) -> tuple[list[str], list[str]]:
    return keys(step[0]), keys(step[1])


def test_ixfr_one_difference_sequence() -> None:
    result, _ = assemble([ixfr(soa(3), soa(2), A, B, soa(3), C, soa(3))], serial=2)
    assert isinstance(result, Incremental)
    assert (result.old_serial, result.new_serial) == (2, 3)
    assert [owners(step) for step in result.steps] == [([f"a.{ZONE}", f"b.{ZONE}"], [f"c.{ZONE}"])]
    assert result.soa is not None and soa_serial(result.soa) == 3


def test_ixfr_several_sequences_not_condensed() -> None:
    wire = ixfr(soa(5), soa(2), A, soa(3), B, soa(3), soa(4), C, soa(4), soa(5), D)
    result, _ = assemble([wire, ixfr(soa(5))], serial=2)
    assert isinstance(result, Incremental) and (result.old_serial, result.new_serial) == (2, 5)
    assert [owners(step) for step in result.steps] == [
        ([f"a.{ZONE}"], [f"b.{ZONE}"]),
        ([], [f"c.{ZONE}"]),
        ([], [f"d.{ZONE}"]),
    ]


@pytest.mark.parametrize("sizes", [[1], [1, 1], [2], [3, 1], [1, 1, 1, 1, 1, 1], [6]])
def test_ixfr_split_over_messages_anywhere(sizes: list[int]) -> None:
    records = [soa(3), soa(2), A, B, soa(3), C, soa(3)]
    result, _ = assemble(split(records, sizes, qtype="IXFR"), serial=2)
    assert isinstance(result, Incremental)
    assert [owners(step) for step in result.steps] == [([f"a.{ZONE}", f"b.{ZONE}"], [f"c.{ZONE}"])]


@pytest.mark.parametrize(("ours", "theirs"), [(7, 7), (8, 7), (3, 0xFFFFFFF0)])
def test_ixfr_up_to_date(ours: int, theirs: int) -> None:
    result, _ = assemble([ixfr(soa(theirs))], serial=ours)
    assert isinstance(result, UpToDate) and result.serial == theirs


def test_ixfr_newer_single_soa_waits_for_the_next_message() -> None:
    assembler = TransferAssembler(ZONE, 2, QID)
    assert assembler.feed(read_message(ixfr(soa(3)))) is None
    assert not assembler.complete
    result = assembler.feed(read_message(response([soa(2), A, soa(3), B, soa(3)], qtype="IXFR", question=False)))
    assert isinstance(result, Incremental)


def test_ixfr_serial_wraps_around() -> None:
    result, _ = assemble([ixfr(soa(1), soa(0xFFFFFFFF), A, soa(1), B, soa(1))], serial=0xFFFFFFFF)
    assert isinstance(result, Incremental) and (result.old_serial, result.new_serial) == (0xFFFFFFFF, 1)


def test_ixfr_answered_with_the_full_zone() -> None:
    result, assembler = assemble([ixfr(soa(7), *RPZ), ixfr(soa(7))], serial=2)
    assert isinstance(result, FullZone) and result.serial == 7
    assert keys(result.records) == RPZ_KEYS
    assert assembler.axfr_style


def test_ixfr_answered_with_an_empty_full_zone() -> None:
    result, assembler = assemble([ixfr(soa(7), soa(7))], serial=2)
    assert isinstance(result, FullZone) and result.records == [] and assembler.axfr_style


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (ixfr(soa(3), soa(1), A, soa(3), soa(3)), "start at serial 1, ours is 2"),
        (ixfr(soa(5), soa(2), A, soa(3), B, soa(4), C, soa(5), soa(5)), "do not chain: serial 3, then 4"),
        (ixfr(soa(3), soa(2), A, soa(1), soa(3)), "goes from serial 2 back to 1"),
        (ixfr(soa(3), soa(2), A, soa(2), soa(3)), "goes from serial 2 back to 2"),
        (ixfr(soa(5), soa(2), A, soa(3), soa(3), soa(4), soa(5)), "the differences end at serial 4, not 5"),
        (ixfr(soa(3), soa(2), soa(3), A, soa(3), B), "records after the end"),
        (ixfr(A), "does not start with the zone's SOA"),
    ],
)
def test_ixfr_failures(wire: bytes, reason: str) -> None:
    with pytest.raises(XfrError) as raised:
        feed_all(TransferAssembler(ZONE, 2, QID), [wire])
    assert reason in raised.value.reason


def test_ixfr_that_ends_at_another_serial() -> None:
    # The final SOA (serial 4) closes a sequence that only reached serial 3.
    assembler = TransferAssembler(ZONE, 2, QID)
    records = [soa(4), soa(2), A, soa(3), B, soa(4)]
    with pytest.raises(XfrError, match=r"do not chain|end at serial"):
        feed_all(assembler, [ixfr(*records)])


# --- the pure module stays pure ------------------------------------------------------------------


@pytest.mark.parametrize("module", ["xfr", "tsig_key", "refresh"])
def test_pure_modules_import_no_io(module: str) -> None:
    tree = ast.parse((Path(__file__).resolve().parent.parent / "blockd" / f"{module}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"twisted", "socket", "time", "zope", "pyroute2", "prometheus_client"}


# --- speed ---------------------------------------------------------------------------------------


def synthetic_axfr(records: int, qid: int = 1, per_message: int = 1500) -> list[bytes]:
    """An RPZ AXFR as the bytes a primary sends: owners compressed against the apex, CNAME ./*."""
    apex = b"\x03rpz\x07example\x00"
    question = apex + struct.pack("!HH", 252, 1)
    soa_rdata = b"\x02ns\xc0\x0c\x04host\xc0\x0c" + struct.pack("!IIIII", 7, 3600, 600, 86400, 60)
    soa_record = b"\xc0\x0c" + struct.pack("!HHIH", 6, 1, 300, len(soa_rdata)) + soa_rdata
    body = []
    for i in range(records):
        label = b"d%d" % i
        rdata = b"\x00" if i % 3 else b"\x01*\x00"
        body.append(
            bytes([len(label)])
            + label
            + b"\x06tiktok\x03com\xc0\x0c"
            + struct.pack("!HHIH", 5, 1, 300, len(rdata))
            + rdata
        )
    stream = [soa_record, *body, soa_record]
    return [
        struct.pack("!HHHHHH", qid, 0x8400, 1, len(stream[at : at + per_message]), 0, 0)
        + question
        + b"".join(stream[at : at + per_message])
        for at in range(0, len(stream), per_message)
    ]


def transfer_seconds(messages: list[bytes]) -> tuple[float, FullZone]:
    stream = b"".join(frame(message) for message in messages)
    started = time.perf_counter()
    reader = FrameReader()
    assembler = TransferAssembler(ZONE, None, 1)
    result = None
    for at in range(0, len(stream), 65536):
        for wire in reader.feed(stream[at : at + 65536]):
            result = assembler.feed(read_message(wire))
    assert isinstance(result, FullZone)
    return time.perf_counter() - started, result


def test_a_50k_record_transfer_parses_quickly() -> None:
    seconds, result = transfer_seconds(synthetic_axfr(50_000))
    assert len(result.records) == 50_000
    assert result.records[1] == (f"d1.tiktok.com.{ZONE}", 5, 1, 300, b"\x00")
    assert seconds < 10, seconds  # about 0.15 s; generous for a loaded CI machine


@pytest.mark.slow
def test_a_million_record_transfer(capsys: pytest.CaptureFixture[str]) -> None:
    seconds, result = transfer_seconds(synthetic_axfr(1_000_000))
    assert len(result.records) == 1_000_000
    with capsys.disabled():
        print(f"\n1,000,000-record AXFR stream: framed, read and assembled in {seconds:.2f} s")
    assert seconds < 60, seconds
