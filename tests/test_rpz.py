"""blockd.rpz: every trigger and action, the master-file corners, every error with its file:line,
record-level add/delete for transfers, and the render/parse round trip."""

from __future__ import annotations

import ipaddress
import struct

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockd.names import key_from_wire_labels
from blockd.rpz import (
    DROP_RULE,
    NODATA_RULE,
    NXDOMAIN_RULE,
    PASSTHRU_RULE,
    RPZ_ACTIONS,
    TCP_ONLY_RULE,
    LocalRecord,
    PolicyZone,
    Rule,
    Soa,
    add_record,
    delete_record,
    ip_trigger_owner,
    looks_like_zone_file,
    new_zone,
    parse_zone_file,
    records,
    render_zone_file,
)

A, NS, CNAME, SOA, MX, TXT, AAAA = 1, 2, 5, 6, 15, 16, 28
ORIGIN = "rpz.example"
# Three lines, so the first line of a test's body is line 4 of the file.
HEAD = "$ORIGIN rpz.example.\n$TTL 300\n@ SOA ns.example. admin.example. 1 3600 600 86400 60\n"
NEITHER = "the address is neither 4 decimal bytes nor IPv6 groups (zz for ::)"
SOA_RECORD = Soa(300, "ns.example", "admin.example", 1, 3600, 600, 86400, 60)


def parse(body: str, origin: str | None = None, head: str = HEAD) -> tuple[PolicyZone | None, list[str]]:
    zone, errors = parse_zone_file((head + body).splitlines(True), "z.rpz", origin)
    return zone, [str(error) for error in errors]


def zone_of(body: str, origin: str | None = None, head: str = HEAD) -> PolicyZone:
    zone, errors = parse(body, origin, head)
    assert errors == []
    assert zone is not None
    return zone


def errors_of(body: str, origin: str | None = None, head: str = HEAD) -> list[str]:
    zone, errors = parse(body, origin, head)
    assert zone is None
    return errors


def wire(rtype: str, text: str) -> bytes:
    data = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rtype), text).to_wire()
    assert data is not None
    return data


def name_wire(text: str) -> bytes:
    labels = [label.encode() for label in text.rstrip(".").split(".") if label]
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\0"


def local(*items: tuple[int, int, bytes]) -> Rule:
    return Rule("local-data", tuple(LocalRecord(rtype, ttl, rdata) for rtype, ttl, rdata in items))


# --- actions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "rule"),
    [
        ("a.example CNAME .", NXDOMAIN_RULE),
        ("a.example CNAME *.", NODATA_RULE),
        ("a.example CNAME rpz-passthru.", PASSTHRU_RULE),
        ("a.example CNAME a.example.", PASSTHRU_RULE),  # legacy PASSTHRU: the trigger name itself
        ("a.example CNAME rpz-drop.", DROP_RULE),
        ("a.example CNAME rpz-tcp-only.", TCP_ONLY_RULE),
        ("a.example CNAME RPZ-DROP.", DROP_RULE),  # upper case: the general path
        ("a.example 60 IN CNAME rpz-passthru.", PASSTHRU_RULE),
        ("a.example cname .", NXDOMAIN_RULE),
        ("a.example Cname *.", NODATA_RULE),
        ("a.example CNAME garden.example.net.", local((CNAME, 300, name_wire("garden.example.net")))),
        ("a.example CNAME garden", local((CNAME, 300, name_wire("garden.rpz.example")))),
        ("a.example CNAME Garden.Example.", local((CNAME, 300, name_wire("Garden.Example")))),  # case kept
        ("a.example CNAME a.example", local((CNAME, 300, name_wire("a.example.rpz.example")))),  # relative: not itself
        ("a.example A 192.0.2.1", local((A, 300, bytes([192, 0, 2, 1])))),
        ("a.example 60 AAAA 2001:db8::1", local((AAAA, 60, ipaddress.IPv6Address("2001:db8::1").packed))),
        ('a.example TXT "v=spf1; -all"', local((TXT, 300, b"\x0cv=spf1; -all"))),
        ("a.example MX 10 mail.example.", local((MX, 300, b"\x00\x0a" + name_wire("mail.example")))),
        ("a.example MX 10 mail", local((MX, 300, b"\x00\x0a" + name_wire("mail.rpz.example")))),
        ("a.example SRV 0 5 443 srv.example.", local((33, 300, wire("SRV", "0 5 443 srv.example.")))),
        ("a.example PTR host.example.", local((12, 300, name_wire("host.example")))),
        ('a.example CAA 0 issue "ca.example"', local((257, 300, b"\x00\x05issueca.example"))),
        ("a.example HTTPS 1 . alpn=h2", local((65, 300, wire("HTTPS", "1 . alpn=h2")))),
        ("a.example TYPE65280 \\# 2 abcd", local((65280, 300, b"\xab\xcd"))),
        ("a.example TYPE1 192.0.2.9", local((A, 300, bytes([192, 0, 2, 9])))),
    ],
)
def test_actions(line: str, rule: Rule) -> None:
    zone = zone_of(line + "\n")
    assert zone.exact == {"a.example": rule}
    assert len(zone) == 1


def test_wildcard_cname_targets_are_local_data() -> None:
    zone = zone_of("*.a.example CNAME *.garden.net.\n*.b.example CNAME *.b.example.\n")
    assert zone.below["a.example"] == local((CNAME, 300, b"\x01*\x06garden\x03net\x00"))
    # "*.name CNAME *.name." is BIND's wildcard CNAME, not the legacy PASSTHRU.
    assert zone.below["b.example"] == local((CNAME, 300, b"\x01*\x01b\x07example\x00"))


def test_local_data_accumulates_per_owner() -> None:
    zone = zone_of('a 60 A 192.0.2.1\n  A 192.0.2.2\na AAAA ::1\na TXT "x"\na A 192.0.2.1\n')
    assert zone.exact["a"] == local(
        (A, 60, bytes([192, 0, 2, 1])),
        (A, 300, bytes([192, 0, 2, 2])),
        (AAAA, 300, bytes(15) + b"\x01"),
        (TXT, 300, b"\x01x"),
    )  # the repeated A is one RRset member, kept once


def test_singletons_are_shared() -> None:
    body = "".join(f"n{i}.example CNAME .\n*.n{i}.example CNAME .\n" for i in range(500))
    body += "".join(f"d{i}.example 60 IN CNAME rpz-drop.\n" for i in range(50))
    zone = zone_of(body)
    assert len(zone) == 1050
    assert all(rule is NXDOMAIN_RULE for rule in zone.below.values())
    assert {id(rule) for rule in zone.exact.values()} == {id(NXDOMAIN_RULE), id(DROP_RULE)}


def test_repeated_local_data_is_shared_and_stays_per_owner() -> None:
    zone = zone_of("a A 0.0.0.0\nb A 0.0.0.0\nb A 192.0.2.1\nc A 0.0.0.0\nd 60 A 0.0.0.0\n")
    assert zone.exact["a"] is zone.exact["c"]  # one Rule for every owner with just that record
    assert zone.exact["a"] == local((A, 300, bytes(4)))
    assert zone.exact["b"] == local((A, 300, bytes(4)), (A, 300, bytes([192, 0, 2, 1])))
    assert zone.exact["d"] == local((A, 60, bytes(4)))
    # the RDATA memo knows the origin relative names were read against
    zone = zone_of("$ORIGIN x.rpz.example.\nm MX 10 mail\n$ORIGIN y.rpz.example.\nm MX 10 mail\n")
    assert zone.exact["m.x"] == local((MX, 300, b"\x00\x0a" + name_wire("mail.x.rpz.example")))
    assert zone.exact["m.y"] == local((MX, 300, b"\x00\x0a" + name_wire("mail.y.rpz.example")))


def test_rules_validate_themselves() -> None:
    assert RPZ_ACTIONS == ("nxdomain", "nodata", "passthru", "drop", "tcp-only", "local-data")
    with pytest.raises(ValueError, match="unknown RPZ action"):
        Rule("sinkhole")
    with pytest.raises(ValueError, match="carry records"):
        Rule("local-data")
    with pytest.raises(ValueError, match="carry records"):
        Rule("nxdomain", (LocalRecord(A, 1, b"\0\0\0\0"),))


# --- triggers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("owner", "table", "key"),
    [
        ("www.tiktok.com", "exact", "www.tiktok.com"),
        ("*.tiktok.com", "below", "tiktok.com"),
        ("www.tiktok.com.rpz.example.", "exact", "www.tiktok.com"),
        ("*.tiktok.com.rpz.example.", "below", "tiktok.com"),
        ("WWW.TikTok.COM", "exact", "www.tiktok.com"),
        ("*.TIKTOK.com.RPZ.example.", "below", "tiktok.com"),
        ("tiktok", "exact", "tiktok"),  # a top-level name is a trigger like any other
        ("bücher.example", "exact", "xn--bcher-kva.example"),
        ("*.BÜCHER.example", "below", "xn--bcher-kva.example"),
        ("a\\.b.example", "exact", "a\\046b.example"),  # a dot inside a label, as blockd.names keys it
        ("\\065bc.example", "exact", "abc.example"),
        ("\\097\\098c.example", "exact", "abc.example"),
        ("a\\032b.example", "exact", "a\\032b.example"),
        ("a\\(b.example", "exact", "a(b.example"),
        ("_dmarc.example", "exact", "_dmarc.example"),
        ("a.*.example", "exact", "a.*.example"),  # "*" inside a name is a plain label
        ("www.rpz.example", "exact", "www.rpz.example"),  # relative: www.rpz.example.rpz.example.
        ("x.rpz-ip.example", "exact", "x.rpz-ip.example"),  # rpz-ip only counts as the last label
    ],
)
def test_qname_triggers(owner: str, table: str, key: str) -> None:
    zone = zone_of(f"{owner} CNAME .\n")
    assert getattr(zone, table) == {key: NXDOMAIN_RULE}


def test_exact_and_below_are_separate_triggers() -> None:
    zone = zone_of("tiktok.com CNAME rpz-passthru.\n*.tiktok.com CNAME .\n")
    assert zone.exact == {"tiktok.com": PASSTHRU_RULE}
    assert zone.below == {"tiktok.com": NXDOMAIN_RULE}
    assert len(zone) == 2


@pytest.mark.parametrize(
    ("owner", "network"),
    [
        ("32.4.3.2.1.rpz-ip", "1.2.3.4/32"),
        ("24.0.2.0.192.rpz-ip", "192.0.2.0/24"),
        ("8.0.0.0.10.rpz-ip", "10.0.0.0/8"),
        ("0.0.0.0.0.rpz-ip", "0.0.0.0/0"),
        ("128.1.zz.db8.2001.rpz-ip", "2001:db8::1/128"),
        ("128.1.0.0.0.0.0.db8.2001.rpz-ip", "2001:db8::1/128"),
        ("128.0001.zz.0db8.2001.rpz-ip", "2001:db8::1/128"),
        ("48.zz.db8.2001.rpz-ip", "2001:db8::/48"),
        ("64.zz.1.0.db8.2001.rpz-ip", "2001:db8:0:1::/64"),
        ("128.1.zz.rpz-ip", "::1/128"),
        ("0.zz.rpz-ip", "::/0"),
        ("128.zz.1.0.0.0.0.0.1.rpz-ip", "1:0:0:0:0:0:1:0/128"),
        ("128.1.2.3.4.5.6.7.zz.rpz-ip", "0:7:6:5:4:3:2:1/128"),
        ("128.4.3.2.1.zz.ffff.rpz-ip", "ffff::1:2:3:4/128"),
    ],
)
def test_ip_triggers(owner: str, network: str) -> None:
    zone = zone_of(f"{owner} CNAME rpz-drop.\n")
    assert zone.ip == {ipaddress.ip_network(network): (owner, DROP_RULE)}
    assert len(zone) == 1


def test_ip_trigger_actions_and_local_data() -> None:
    zone = zone_of(
        "32.1.2.0.192.rpz-ip A 192.0.2.99\n"
        "  A 192.0.2.98\n"
        "32.1.0.0.127.rpz-ip CNAME 32.1.0.0.127.\n"  # BIND's legacy PASSTHRU for an address
        "32.2.0.0.127.rpz-ip CNAME 32.2.0.0.127.rpz-ip.\n"  # the owner without the origin, also itself
        "32.3.0.0.127.rpz-ip CNAME *.\n"
    )
    net = ipaddress.ip_network
    assert zone.ip == {
        net("192.0.2.1/32"): (
            "32.1.2.0.192.rpz-ip",
            local((A, 300, bytes([192, 0, 2, 99])), (A, 300, bytes([192, 0, 2, 98]))),
        ),
        net("127.0.0.1/32"): ("32.1.0.0.127.rpz-ip", PASSTHRU_RULE),
        net("127.0.0.2/32"): ("32.2.0.0.127.rpz-ip", PASSTHRU_RULE),
        net("127.0.0.3/32"): ("32.3.0.0.127.rpz-ip", NODATA_RULE),
    }


def test_two_spellings_of_one_network_share_its_trigger() -> None:
    zone = zone_of("128.1.zz.db8.2001.rpz-ip A 192.0.2.1\n128.1.0.0.0.0.0.db8.2001.rpz-ip A 192.0.2.2\n")
    assert zone.ip == {
        ipaddress.ip_network("2001:db8::1/128"): (
            "128.1.zz.db8.2001.rpz-ip",
            local((A, 300, bytes([192, 0, 2, 1])), (A, 300, bytes([192, 0, 2, 2]))),
        )
    }


def test_ignored_triggers_are_counted() -> None:
    zone = zone_of(
        "32.1.0.0.10.rpz-client-ip CNAME .\n"
        "ns.evil.example.rpz-nsdname CNAME .\n"
        "*.evil.example.rpz-nsdname CNAME rpz-drop.\n"
        "ns.evil.example.rpz-nsdname CNAME .\n"  # the same record again: counted once
        "32.1.0.0.10.rpz-nsip CNAME .\n"
        '24.0.0.10.rpz-nsip TXT "not even an address"\n'
        "x.rpz-nsip A 192.0.2.1\n"
        "www CNAME .\n"
    )
    assert zone.ignored == {"rpz-client-ip": 1, "rpz-nsdname": 2, "rpz-nsip": 3}
    assert len(zone) == 1
    assert zone.exact == {"www": NXDOMAIN_RULE}
    kept = [owner for owner, *_ in records(zone) if "rpz-n" in owner or "rpz-client" in owner]
    assert len(kept) == 6  # kept aside for re-publishing


# --- master-file syntax -----------------------------------------------------------------------


def test_relative_and_absolute_origins() -> None:
    zone = zone_of(
        "$ORIGIN tiktok.com\n"  # relative to rpz.example.
        "www CNAME .\n"
        "@ CNAME rpz-drop.\n"
        "* CNAME .\n"
        "$ORIGIN bytedance.com.rpz.example.\n"
        "api CNAME .\n"
        "$ORIGIN rpz.example.\n"
        "top.example CNAME .\n"
    )
    assert zone.exact == {
        "www.tiktok.com": NXDOMAIN_RULE,
        "tiktok.com": DROP_RULE,
        "api.bytedance.com": NXDOMAIN_RULE,
        "top.example": NXDOMAIN_RULE,
    }
    assert zone.below == {"tiktok.com": NXDOMAIN_RULE}


def test_origin_above_the_zone_as_unbound_writes_it() -> None:
    text = (
        "$ORIGIN example.com.\n"
        "rpz 3600 IN SOA ns1.rpz.example.com. hostmaster.rpz.example.com. (\n"
        "\t\t1379078166 28800 7200 604800 7200 )\n"
        "\t3600\tIN\tNS\tns1.rpz.example.com.\n"
        "\t3600\tIN\tNS\tns2.rpz.example.com.\n"
        "$ORIGIN rpz.example.com.\n"
        "gotham.com CNAME .\n"
    )
    for origin in (None, "rpz.example.com", "rpz.example.com."):
        zone = zone_of("", origin, head=text)
        assert zone.origin == "rpz.example.com"
        assert zone.soa == Soa(
            3600, "ns1.rpz.example.com", "hostmaster.rpz.example.com", 1379078166, 28800, 7200, 604800, 7200
        )
        assert zone.exact == {"gotham.com": NXDOMAIN_RULE}


def test_no_origin_anywhere_takes_the_soa_owner() -> None:
    head = "rpz.example. 300 IN SOA ns.example. admin.example. 1 3600 600 86400 60\nwww CNAME .\n"
    zone = zone_of("", head=head)
    assert zone.origin == "rpz.example"
    assert zone.exact == {"www": NXDOMAIN_RULE}


def test_soa_in_parentheses_with_comments() -> None:
    head = (
        "$TTL 1h\n"
        "$ORIGIN RPZ.Example.\n"
        "@ IN SOA ns.example. admin.example. ( ; the SOA\n"
        "      2024010101 ; serial\n"
        "      1h         ; refresh\n"
        "      10m        ; retry\n"
        "      1w         ; expire\n"
        "      5m )       ; minimum\n"
    )
    zone = zone_of("www CNAME .\n", head=head)
    assert zone.soa == Soa(3600, "ns.example", "admin.example", 2024010101, 3600, 600, 604800, 300)


def test_parentheses_in_other_records() -> None:
    zone = zone_of('a TXT ( "one" ; first\n  "two;three" )\nb ( A\n 192.0.2.1 )\n')
    assert zone.exact["a"] == local((TXT, 300, b"\x03one\x09two;three"))
    assert zone.exact["b"] == local((A, 300, bytes([192, 0, 2, 1])))


@pytest.mark.parametrize(
    ("line", "rdata"),
    [
        ('a TXT "v=spf1; -all" ; a comment', b"\x0cv=spf1; -all"),
        ('a TXT "a;b" "c(d)" ; (not a parenthesis', b"\x03a;b\x04c(d)"),
        ('a TXT "say \\"hi\\";"', b'\x09say "hi";'),
        ("a TXT semi\\;colon", b"\x0asemi;colon"),
        ('a TXT ""', b"\x00"),
    ],
)
def test_comments_and_quoted_strings(line: str, rdata: bytes) -> None:
    assert zone_of(line + "\n").exact["a"] == local((TXT, 300, rdata))


def test_blank_owner_is_the_previous_owner() -> None:
    zone = zone_of("a A 192.0.2.1\n\tAAAA ::1\n ; a comment line\n\n  TXT x\nb CNAME .\n")
    assert [record.rtype for record in zone.exact["a"].records] == [A, AAAA, TXT]
    assert zone.exact["b"] is NXDOMAIN_RULE


def test_blank_owner_after_a_fast_line() -> None:
    # The fast path stores "x CNAME ." without the general parser; the next line still knows its owner.
    assert errors_of("x.example CNAME .\n  A 192.0.2.1\n") == ["z.rpz:5: CNAME and other data at x.example"]
    assert errors_of("*.x CNAME .\n  A 192.0.2.1\n") == ["z.rpz:5: CNAME and other data at *.x"]
    assert errors_of("x.rpz.example. CNAME .\n  TXT y\n") == ["z.rpz:5: CNAME and other data at x"]
    zone = zone_of("x CNAME .\n  CNAME .\n  RRSIG CNAME 8 2 300 20300101000000 20200101000000 1 rpz.example. AAAA\n")
    assert zone.exact == {"x": NXDOMAIN_RULE}


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [
        ("0", 0),
        ("86400", 86400),
        ("90s", 90),
        ("1m", 60),
        ("1h", 3600),
        ("1H", 3600),
        ("2d", 172800),
        ("1w", 604800),
        ("1h30m", 5400),
        ("1d2h3m4s", 93784),
        ("1h30", 3630),
        ("2147483647", 2**31 - 1),
    ],
)
def test_ttl_units(ttl: str, seconds: int) -> None:
    assert zone_of(f"a {ttl} A 192.0.2.1\n").exact["a"].records[0].ttl == seconds
    assert zone_of(f"$TTL {ttl}\nb A 192.0.2.1\n").exact["b"].records[0].ttl == seconds


@pytest.mark.parametrize(
    "line",
    [
        "a 60 IN A 192.0.2.1",
        "a IN 60 A 192.0.2.1",
        "a 60 A 192.0.2.1",
        "a in 60 a 192.0.2.1",
        "a 60 CLASS1 A 192.0.2.1",
    ],
)
def test_class_and_ttl_in_either_order(line: str) -> None:
    assert zone_of(line + "\n").exact["a"] == local((A, 60, bytes([192, 0, 2, 1])))


@pytest.mark.parametrize(
    ("line", "rule"),
    [
        ("a 60 IN CNAME .", NXDOMAIN_RULE),
        ("a IN 60 CNAME *.", NODATA_RULE),
        ("a IN CNAME rpz-drop.", DROP_RULE),
        ("a 60 CNAME rpz-tcp-only.", TCP_ONLY_RULE),
        ("a\tin\tcname\trpz-passthru. ; comment", PASSTHRU_RULE),
    ],
)
def test_class_and_ttl_on_policy_lines(line: str, rule: Rule) -> None:
    assert zone_of(line + "\n").exact == {"a": rule}


def test_ttl_defaults() -> None:
    no_ttl = "$ORIGIN rpz.example.\n@ SOA ns.example. admin.example. 1 3600 600 86400 60\n"
    zone = zone_of("a A 192.0.2.1\nb 120 A 192.0.2.2\nc A 192.0.2.3\n", head=no_ttl)
    assert zone.soa.ttl == 60  # no $TTL, no TTL: the SOA's minimum (BIND)
    assert [zone.exact[name].records[0].ttl for name in "abc"] == [60, 120, 120]  # the previous record's
    # ... also when the previous records were read by the fast path
    zone = zone_of("x 77 CNAME .\ny CNAME .\nz A 192.0.2.3\n", head=no_ttl)
    assert zone.exact["z"].records[0].ttl == 77
    zone = zone_of("x IN 78 CNAME .\nz A 192.0.2.3\n", head=no_ttl)
    assert zone.exact["z"].records[0].ttl == 78
    # $TTL wins over the previous record's
    zone = zone_of("a 120 A 192.0.2.1\nb A 192.0.2.2\n")
    assert zone.exact["b"].records[0].ttl == 300


def test_line_endings_bom_comments_and_blank_lines() -> None:
    text = "\ufeff$ORIGIN rpz.example.\r\n$TTL 300\r\n; comment\r\n\r\n@ SOA ns. admin. 1 2 3 4 5\r\nwww CNAME .\r\n"
    text += "a A 192.0.2.1\r\n   \r\n\t; indented comment\r\nb CNAME . ; trailing\r\n"
    zone, errors = parse_zone_file(text.splitlines(True), "z.rpz")
    assert errors == []
    assert zone is not None
    assert set(zone.exact) == {"www", "a", "b"}


def test_skipped_records() -> None:
    zone = zone_of(
        "@ NS ns.example.\n"
        "  NS ns2.example.\n"
        "@ RRSIG SOA 8 2 300 20300101000000 20200101000000 1 rpz.example. AAAA\n"
        "@ DNSKEY 257 3 8 AwEAAQ==\n"
        "www CNAME .\n"
        "www NSEC x.rpz.example. CNAME RRSIG NSEC\n"
        "www ZONEMD 1 1 1 " + "00" * 48 + "\n"
    )
    assert zone.exact == {"www": NXDOMAIN_RULE}
    assert [rtype for _, rtype, _, _ in records(zone)] == [SOA, CNAME]


def test_looking_like_a_zone_file() -> None:
    assert looks_like_zone_file(["; policy\n", "$ORIGIN rpz.example.\n"])
    assert looks_like_zone_file(["$origin rpz.example.\n"])
    assert looks_like_zone_file(["@ IN SOA ns.example. admin.example. (\n"])
    assert looks_like_zone_file(["rpz.example. 300 IN SOA ns. admin. 1 2 3 4 5\n"])
    assert looks_like_zone_file(["$TTL 300\n", "@ SOA ns admin (1 2 3 4 5)\n"])
    assert looks_like_zone_file(["  IN SOA ns admin 1 2 3 4 5\n"])
    assert not looks_like_zone_file(["tiktok.com\n", "||bytedance.com^\n"])
    assert not looks_like_zone_file(["0.0.0.0 soa\n", "0.0.0.0 soa.example\n", "0.0.0.0 soa x.example\n"])
    assert not looks_like_zone_file(["# SOA ( comment\n", "soa.example.com\n"])
    assert not looks_like_zone_file([])


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("$INCLUDE other.zone\n", "$INCLUDE is not supported: put the records in this file"),
        ("$include other.zone rpz.example.\n", "$INCLUDE is not supported: put the records in this file"),
        ("$GENERATE 1-9 h$ CNAME .\n", "$GENERATE is not supported: write the records out in this file"),
        ("$FOO bar\n", "unknown directive $FOO"),
        ("$ORIGIN\n", "$ORIGIN takes one value"),
        ("$TTL 1 2\n", "$TTL takes one value"),
        ("$ORIGIN .\n", "$ORIGIN cannot be the root"),
        ("$TTL abc\n", "bad TTL 'abc': a number of seconds, or with units like 1h30m, 2d, 1w"),
        ("$TTL 1x\n", "bad TTL '1x': a number of seconds, or with units like 1h30m, 2d, 1w"),
        ("$TTL 2147483648\n", "TTL 2147483648 is above 2147483647"),
        ("a 99999999999 A 192.0.2.1\n", "TTL 99999999999 is above 2147483647"),
        ("a CH A 192.0.2.1\n", "class CH is not supported: a policy zone is class IN"),
        ("a 60 HS TXT x\n", "class HS is not supported: a policy zone is class IN"),
        ("a CLASS3 TXT x\n", "class CLASS3 is not supported: a policy zone is class IN"),
        ("a FOO 1\n", "unknown record type 'FOO'"),
        ("a 60 IN 60 A 192.0.2.1\n", "unknown record type '60'"),
        ("a\n", "record without a type"),
        ("a 60 IN\n", "record without a type"),
        ("a CNAME\n", "CNAME takes exactly one target name"),
        ("a CNAME b. c.\n", "CNAME takes exactly one target name"),
        ("a CNAME rpz-foo.\n", "CNAME rpz-foo. is not an RPZ action (names under rpz-* are reserved)"),
        ("a CNAME x.rpz-drop.\n", "CNAME x.rpz-drop. is not an RPZ action (names under rpz-* are reserved)"),
        (
            "a.rpz-foo CNAME .\n",
            "unknown RPZ trigger 'rpz-foo' in a.rpz-foo (known: rpz-ip, rpz-client-ip, rpz-nsdname, rpz-nsip)",
        ),
        ("* CNAME .\n", "a trigger for every name (*) is not supported"),
        ("www.other.example. CNAME .\n", "www.other.example. is outside the zone rpz.example."),
        ("xrpz.example. CNAME .\n", "xrpz.example. is outside the zone rpz.example."),
        ("@ A 192.0.2.1\n", "A record at the zone apex rpz.example.: only SOA and NS belong there"),
        ("@ CNAME .\n", "CNAME record at the zone apex rpz.example.: only SOA and NS belong there"),
        ("a NS ns.example.\n", "NS record at a: delegations are not supported in a policy zone"),
        ("a DNAME b.example.\n", "DNAME record at a: DNAME is not an RPZ action"),
        ("a OPT \\# 0\n", "OPT at a is a meta type, not data"),
        ("a TYPE255 \\# 0\n", "ANY at a is a meta type, not data"),
        ("a TYPE0 \\# 0\n", "TYPE0 at a is a meta type, not data"),
        ("@ SOA ns. admin. 2 1 1 1 1\n", "second SOA record (the zone's SOA is at line 3)"),
        ("sub SOA ns. admin. 2 1 1 1 1\n", "SOA record for sub.rpz.example. is not at the zone origin rpz.example."),
        ("a CNAME .\na A 192.0.2.1\n", "CNAME and other data at a"),
        ("a CNAME rpz-drop.\na CNAME .\n", "more than one CNAME at a"),
        ("a CNAME x.example.\na CNAME y.example.\n", "more than one CNAME at a"),
        ("a CNAME x.example.\na CNAME .\n", "more than one CNAME at a"),
        ("a CNAME x.example.\na TXT y\n", "CNAME and other data at a"),
        ("32.1.0.0.10.rpz-ip CNAME .\n32.1.0.0.10.rpz-ip A 192.0.2.1\n", "CNAME and other data at 32.1.0.0.10.rpz-ip"),
        ("33.4.3.2.1.rpz-ip CNAME .\n", "bad rpz-ip trigger 33.4.3.2.1.rpz-ip: prefix length 33 is longer than 32"),
        (
            "129.1.zz.db8.2001.rpz-ip CNAME .\n",
            "bad rpz-ip trigger 129.1.zz.db8.2001.rpz-ip: prefix length 129 is longer than 128",
        ),
        (
            "24.4.3.2.1.rpz-ip CNAME .\n",
            "bad rpz-ip trigger 24.4.3.2.1.rpz-ip: host bits set in 1.2.3.4/24 (the network is 1.2.3.0/24)",
        ),
        (
            "32.1.zz.db8.2001.rpz-ip CNAME .\n",
            "bad rpz-ip trigger 32.1.zz.db8.2001.rpz-ip: host bits set in 2001:db8::1/32"
            " (the network is 2001:db8::/32)",
        ),
        (
            "x.4.3.2.1.rpz-ip CNAME .\n",
            "bad rpz-ip trigger x.4.3.2.1.rpz-ip: expected <prefix length>.<reversed address>.rpz-ip",
        ),
        (
            "032.4.3.2.1.rpz-ip CNAME .\n",
            "bad rpz-ip trigger 032.4.3.2.1.rpz-ip: expected <prefix length>.<reversed address>.rpz-ip",
        ),
        ("rpz-ip CNAME .\n", "bad rpz-ip trigger rpz-ip: expected <prefix length>.<reversed address>.rpz-ip"),
        (
            "*.24.0.2.0.192.rpz-ip CNAME .\n",
            "bad rpz-ip trigger *.24.0.2.0.192.rpz-ip: expected <prefix length>.<reversed address>.rpz-ip",
        ),
        (
            "32.3.2.1.rpz-ip CNAME .\n",
            f"bad rpz-ip trigger 32.3.2.1.rpz-ip: {NEITHER}",
        ),
        (
            "32.256.0.0.1.rpz-ip CNAME .\n",
            f"bad rpz-ip trigger 32.256.0.0.1.rpz-ip: {NEITHER}",
        ),
        (
            "128.1.zz.zz.2001.rpz-ip CNAME .\n",
            f"bad rpz-ip trigger 128.1.zz.zz.2001.rpz-ip: {NEITHER}",
        ),
        (
            "128.g.zz.2001.rpz-ip CNAME .\n",
            f"bad rpz-ip trigger 128.g.zz.2001.rpz-ip: {NEITHER}",
        ),
        (
            "128.12345.zz.rpz-ip CNAME .\n",
            f"bad rpz-ip trigger 128.12345.zz.rpz-ip: {NEITHER}",
        ),
        (
            "128.1.2.3.4.5.6.7.8.zz.rpz-ip CNAME .\n",
            f"bad rpz-ip trigger 128.1.2.3.4.5.6.7.8.zz.rpz-ip: {NEITHER}",
        ),
        (
            "128.1.2.3.4.5.6.7.rpz-ip CNAME .\n",
            f"bad rpz-ip trigger 128.1.2.3.4.5.6.7.rpz-ip: {NEITHER}",
        ),
        ("a..b CNAME .\n", "empty label in 'a..b'"),
        (".a CNAME .\n", "empty label in '.a'"),
        ("a" * 64 + " CNAME .\n", f"label longer than 63 octets in '{'a' * 64}'"),
        ("a" * 64 + ".x CNAME .\n", f"label longer than 63 octets in '{'a' * 64}.x'"),
        ("a\\1b CNAME .\n", "bad escape in 'a\\\\1b': use \\DDD (three decimal digits) or \\ and one character"),
        ("a\\12 CNAME .\n", "bad escape in 'a\\\\12': use \\DDD (three decimal digits) or \\ and one character"),
        ("a\\256 CNAME .\n", "bad escape in 'a\\\\256': \\256 is above 255"),
        ("bü\\.x CNAME .\n", "escapes in an internationalised name are not supported: 'bü\\\\.x'"),
        ('a TXT "abc\n', "unterminated quoted string"),
        ("a TXT abc )\n", "')' without '('"),
        ("a TXT abc\\\n", "unexpected '\\\\'"),
        ("a A 192.0.2.1\nb CNAME a \udcff\n", "not UTF-8 text: invalid byte 0xff"),
    ],
)
def test_errors(body: str, message: str) -> None:
    line = 3 + body.count("\n")  # every case's error is on its last line
    assert errors_of(body) == [f"z.rpz:{line}: {message}"]


def test_long_names_are_refused() -> None:
    fits = ".".join(["a" * 60] * 3 + ["b" * 58])  # 241 characters: 255 octets with ".rpz.example."
    assert zone_of(f"{fits} CNAME .\n*.{fits[2:]} CNAME .\n").exact == {fits: NXDOMAIN_RULE}
    name = fits + "b"
    assert errors_of(f"{name} CNAME .\n") == [f"z.rpz:4: name longer than 255 octets: {name[:100]!r}…"]
    below = "*." + name[1:]
    assert errors_of(f"{below} CNAME .\n") == [f"z.rpz:4: name longer than 255 octets: {below[:100]!r}…"]


@pytest.mark.parametrize(
    ("body", "start"),
    [
        ("a A 999.1.1.1\n", "z.rpz:4: bad A data '999.1.1.1': "),
        ("a A\n", "z.rpz:4: bad A data '': "),
        ("a MX x\n", "z.rpz:4: bad MX data 'x': "),
        ("a AAAA 1.2.3.4\n", "z.rpz:4: bad AAAA data '1.2.3.4': "),
        ("ü" * 64 + ".example CNAME .\n", f"z.rpz:4: invalid internationalised name '{'ü' * 64}.example': "),
    ],
)
def test_errors_with_dnspython_reasons(body: str, start: str) -> None:
    [error] = errors_of(body)
    assert error.startswith(start)
    assert len(error) > len(start)


@pytest.mark.parametrize(
    ("head", "origin", "errors"),
    [
        (
            "$ORIGIN rpz.example.\n$TTL 60\nwww CNAME .\n",
            "rpz.example",
            ["z.rpz: no SOA record: a zone needs exactly one SOA at its origin"],
        ),
        ("", None, ["z.rpz: no SOA record: a zone needs exactly one SOA at its origin"]),
        (
            "$ORIGIN rpz.example.\n$TTL 60\nwww CNAME .\n",
            None,
            [
                "z.rpz:3: the first record must be the zone's SOA (or the zone's origin must be given)",
                "z.rpz: no SOA record: a zone needs exactly one SOA at its origin",
            ],
        ),
        (
            "www CNAME .\n",
            None,
            [
                "z.rpz:1: relative name 'www' and no $ORIGIN (write it with a trailing dot, or set $ORIGIN)",
                "z.rpz: no SOA record: a zone needs exactly one SOA at its origin",
            ],
        ),
        (
            "@ SOA ns. admin. 1 2 3 4 5\n",
            None,
            [
                "z.rpz:1: relative name '@' and no $ORIGIN (write it with a trailing dot, or set $ORIGIN)",
                "z.rpz: no SOA record: a zone needs exactly one SOA at its origin",
            ],
        ),
        (
            HEAD + "www CNAME .\n",
            "rpz.other",
            [
                "z.rpz:3: SOA record for rpz.example. is not at the zone origin rpz.other.",
                "z.rpz:4: www.rpz.example. is outside the zone rpz.other.",
                "z.rpz: no SOA record: a zone needs exactly one SOA at its origin",
            ],
        ),
        (
            "$TTL 300\n  A 192.0.2.1\n",
            "rpz.example",
            [
                "z.rpz:2: the first record has no owner name (the line starts with a blank)",
                "z.rpz: no SOA record: a zone needs exactly one SOA at its origin",
            ],
        ),
        (
            "$ORIGIN rpz.example.\na A 192.0.2.1\n@ SOA ns. admin. 1 2 3 4 5\n",
            "rpz.example",
            ["z.rpz:2: record without a TTL, and no $TTL or earlier TTL to take it from"],
        ),
        (
            "$ORIGIN rpz.example.\n@ 1 SOA ns. admin. 1 2 3\n",
            None,
            [
                "z.rpz:2: SOA takes 7 fields: mname rname serial refresh retry expire minimum",
                "z.rpz: no SOA record: a zone needs exactly one SOA at its origin",
            ],
        ),
        (
            "$ORIGIN rpz.example.\n@ 1 SOA ns. admin. x 2 3 4 5\n",
            None,
            [
                "z.rpz:2: bad SOA serial 'x': a number from 0 to 4294967295",
                "z.rpz: no SOA record: a zone needs exactly one SOA at its origin",
            ],
        ),
        (
            "$ORIGIN rpz.example.\n@ 1 SOA ns. admin. 4294967296 2 3 4 5\n",
            None,
            [
                "z.rpz:2: bad SOA serial '4294967296': a number from 0 to 4294967295",
                "z.rpz: no SOA record: a zone needs exactly one SOA at its origin",
            ],
        ),
        (
            "$ORIGIN rpz.example.\n@ 1 SOA ns. admin. 1 2 x 4 5\n",
            None,
            [
                "z.rpz:2: bad retry 'x': a number of seconds, or with units like 1h30m, 2d, 1w",
                "z.rpz: no SOA record: a zone needs exactly one SOA at its origin",
            ],
        ),
        (HEAD + "a TXT ( x\n", None, ["z.rpz:4: '(' not closed by the end of the file"]),
    ],
)
def test_zone_level_errors(head: str, origin: str | None, errors: list[str]) -> None:
    assert errors_of("", origin, head=head) == errors


def test_every_error_is_collected_with_its_line() -> None:
    body = (
        "a CNAME .\n"  # 4
        "$INCLUDE x\n"  # 5
        "b TXT ( one\n"  # 6
        "  two )\n"  # 7
        "b A 1.2.3\n"  # 8  bad data (reported at the record's line)
        "c TXT ( one\n"  # 9
        '   ( two ) "x\n'  # 10 unterminated quote: this physical line
        "d CNAME rpz-nope.\n"  # 11
        "e CH TXT x\n"  # 12
        "ok CNAME .\n"  # 13
    )
    errors = errors_of(body)
    assert [error.split(": ", 1)[0] for error in errors] == [
        "z.rpz:5",
        "z.rpz:8",
        "z.rpz:10",
        "z.rpz:11",
        "z.rpz:12",
    ]


def test_origin_argument_forms() -> None:
    for origin in ("rpz.example", "rpz.example.", "RPZ.Example."):
        assert zone_of("www CNAME .\n", origin).origin == "rpz.example"
    with pytest.raises(ValueError, match="root"):
        parse_zone_file([], "z.rpz", ".")


# --- the fast path and the general path agree --------------------------------------------------

_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12).filter(
    lambda label: not label.startswith("rpz-")
)
_names = st.lists(_label, min_size=1, max_size=4).map(".".join)
_targets = st.sampled_from([".", "*.", "rpz-passthru.", "rpz-drop.", "rpz-tcp-only."])
_spellings = st.sampled_from(
    ["{o} CNAME {t}", "{o} 60 IN CNAME {t}", "{o} IN 60 cname {t} ; c", "{o}.rpz.example.\tCNAME\t{t}"]
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), _names, _targets, _spellings), max_size=30))
def test_fast_and_general_paths_agree(entries: list[tuple[bool, str, str, str]]) -> None:
    fast = general = ""
    for star, name, target, spelling in entries:
        owner = ("*." if star else "") + name
        fast += spelling.format(o=owner, t=target) + "\n"
        # Upper-case keywords and a trailing "\\032"-free escape force the general path.
        general += spelling.format(o=owner, t=target).replace("CNAME", "CnAmE").replace("cname", "CnAmE") + "\n"
    fast_zone, fast_errors = parse(fast)
    general_zone, general_errors = parse(general)
    assert [e.split(": ", 1)[1] for e in fast_errors] == [e.split(": ", 1)[1] for e in general_errors]
    assert fast_zone == general_zone


# --- records from transfers ---------------------------------------------------------------------


def empty() -> PolicyZone:
    return new_zone("rpz.example.", SOA_RECORD)


def test_new_zone() -> None:
    zone = empty()
    assert zone.origin == ORIGIN
    assert zone.soa == SOA_RECORD
    assert (zone.exact, zone.below, zone.ip, zone.ignored, len(zone)) == ({}, {}, {}, {}, 0)
    assert list(records(zone)) == [
        (
            ORIGIN,
            SOA,
            300,
            name_wire("ns.example") + name_wire("admin.example") + struct.pack("!IIIII", 1, 3600, 600, 86400, 60),
        )
    ]


@pytest.mark.parametrize(
    ("owner", "rdata", "table", "key", "rule"),
    [
        ("www.tiktok.com.rpz.example", b"\x00", "exact", "www.tiktok.com", NXDOMAIN_RULE),
        ("*.tiktok.com.rpz.example", b"\x01*\x00", "below", "tiktok.com", NODATA_RULE),
        ("a.rpz.example", name_wire("rpz-passthru"), "exact", "a", PASSTHRU_RULE),
        ("a.rpz.example", name_wire("RPZ-PASSTHRU"), "exact", "a", PASSTHRU_RULE),
        ("a.rpz.example", name_wire("a"), "exact", "a", PASSTHRU_RULE),
        ("a.rpz.example", name_wire("rpz-drop"), "exact", "a", DROP_RULE),
        ("a.rpz.example", name_wire("rpz-tcp-only"), "exact", "a", TCP_ONLY_RULE),
        ("a.rpz.example", name_wire("garden.example"), "exact", "a", local((CNAME, 300, name_wire("garden.example")))),
        ("a\\046b.rpz.example", b"\x00", "exact", "a\\046b", NXDOMAIN_RULE),
    ],
)
def test_add_cname_records(owner: str, rdata: bytes, table: str, key: str, rule: Rule) -> None:
    zone = empty()
    assert add_record(zone, owner, CNAME, 300, rdata) is None
    assert getattr(zone, table) == {key: rule}


def test_add_and_delete_local_data() -> None:
    zone = empty()
    one, two = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
    owner = "www.tiktok.com.rpz.example"
    assert add_record(zone, owner, A, 60, one) is None
    assert add_record(zone, owner, A, 60, two) is None
    assert add_record(zone, owner, A, 60, one) is None  # the same record again
    assert add_record(zone, owner, TXT, 60, b"\x02hi") is None
    assert zone.exact["www.tiktok.com"] == local((A, 60, one), (A, 60, two), (TXT, 60, b"\x02hi"))
    assert delete_record(zone, owner, A, one) is None  # one of several
    assert zone.exact["www.tiktok.com"] == local((A, 60, two), (TXT, 60, b"\x02hi"))
    assert delete_record(zone, owner, A, one) == "cannot delete: no such A record at www.tiktok.com"
    assert delete_record(zone, owner, TXT, b"\x02hi") is None
    assert delete_record(zone, owner, A, two) is None  # the last record takes the trigger with it
    assert zone.exact == {}
    assert delete_record(zone, owner, A, two) == "cannot delete: no such A record at www.tiktok.com"


def test_add_and_delete_policy_records() -> None:
    zone = empty()
    assert add_record(zone, "a.rpz.example", CNAME, 60, b"\x00") is None
    assert add_record(zone, "*.a.rpz.example", CNAME, 60, b"\x01*\x00") is None
    assert delete_record(zone, "a.rpz.example", CNAME, b"\x01*\x00") == "cannot delete: no such CNAME record at a"
    assert delete_record(zone, "a.rpz.example", CNAME, b"\x00") is None
    assert delete_record(zone, "*.a.rpz.example", CNAME, b"\x01*\x00") is None
    assert len(zone) == 0
    # a local CNAME is deleted by its target, whatever its case
    assert add_record(zone, "b.rpz.example", CNAME, 60, name_wire("Garden.Example")) is None
    assert delete_record(zone, "b.rpz.example", CNAME, name_wire("garden.example")) is None
    assert zone.exact == {}


def test_add_and_delete_ip_triggers() -> None:
    zone = empty()
    owner = "24.0.2.0.192.rpz-ip.rpz.example"
    network = ipaddress.ip_network("192.0.2.0/24")
    assert add_record(zone, owner, A, 60, bytes([10, 0, 0, 1])) is None
    assert add_record(zone, owner, A, 60, bytes([10, 0, 0, 2])) is None
    assert zone.ip[network] == (
        "24.0.2.0.192.rpz-ip",
        local((A, 60, bytes([10, 0, 0, 1])), (A, 60, bytes([10, 0, 0, 2]))),
    )
    assert delete_record(zone, owner, A, bytes([10, 0, 0, 1])) is None
    assert zone.ip[network] == ("24.0.2.0.192.rpz-ip", local((A, 60, bytes([10, 0, 0, 2]))))
    assert delete_record(zone, owner, A, bytes([10, 0, 0, 2])) is None
    assert zone.ip == {}
    assert add_record(zone, "128.1.zz.db8.2001.rpz-ip.rpz.example", CNAME, 60, name_wire("rpz-drop")) is None
    assert zone.ip == {ipaddress.ip_network("2001:db8::1/128"): ("128.1.zz.db8.2001.rpz-ip", DROP_RULE)}
    assert delete_record(zone, "128.1.0.0.0.0.0.db8.2001.rpz-ip.rpz.example", CNAME, name_wire("rpz-drop")) is None
    assert zone.ip == {}
    assert delete_record(zone, owner, CNAME, b"\x00") == "cannot delete: no such CNAME record at 24.0.2.0.192.rpz-ip"


def test_add_and_delete_ignored_triggers() -> None:
    zone = empty()
    assert add_record(zone, "ns.evil.rpz-nsdname.rpz.example", CNAME, 60, b"\x00") is None
    assert add_record(zone, "ns.evil.rpz-nsdname.rpz.example", CNAME, 60, b"\x00") is None
    assert add_record(zone, "*.evil.rpz-nsdname.rpz.example", CNAME, 60, b"\x00") is None
    assert add_record(zone, "32.1.0.0.10.rpz-client-ip.rpz.example", A, 60, bytes(4)) is None
    assert zone.ignored == {"rpz-nsdname": 2, "rpz-client-ip": 1}
    assert len(zone) == 0
    assert delete_record(zone, "ns.evil.rpz-nsdname.rpz.example", CNAME, b"\x00") is None
    assert delete_record(zone, "32.1.0.0.10.rpz-client-ip.rpz.example", A, bytes(4)) is None
    assert zone.ignored == {"rpz-nsdname": 1}
    assert delete_record(zone, "x.rpz-nsip.rpz.example", A, bytes(4)) == "cannot delete: no such A record at x.rpz-nsip"


def test_apex_records_from_transfers() -> None:
    zone = empty()
    new_soa = name_wire("ns2.example") + name_wire("admin.example") + struct.pack("!IIIII", 7, 1, 2, 3, 4)
    assert add_record(zone, ORIGIN, SOA, 120, new_soa) is None
    assert zone.soa == Soa(120, "ns2.example", "admin.example", 7, 1, 2, 3, 4)
    assert delete_record(zone, ORIGIN, SOA, new_soa) is None  # an IXFR's old SOA: its new one follows
    assert zone.soa.serial == 7
    assert add_record(zone, ORIGIN, NS, 120, name_wire("ns.example")) is None
    assert delete_record(zone, ORIGIN, NS, name_wire("ns.example")) is None
    assert add_record(zone, "www.rpz.example", 46, 120, b"anything") is None  # RRSIG: skipped
    assert delete_record(zone, "www.rpz.example", 46, b"anything") is None
    assert len(zone) == 0
    assert zone.soa.serial == 7


@pytest.mark.parametrize(
    ("owner", "rtype", "rdata", "message"),
    [
        ("www.other.example", CNAME, b"\x00", "www.other.example. is outside the zone rpz.example."),
        ("example", CNAME, b"\x00", "example. is outside the zone rpz.example."),
        ("xrpz.example", CNAME, b"\x00", "xrpz.example. is outside the zone rpz.example."),
        (ORIGIN, A, bytes(4), "A record at the zone apex rpz.example.: only SOA and NS belong there"),
        (ORIGIN, SOA, b"\x00\x00" + bytes(19), "SOA RDATA has the wrong length"),
        ("*.rpz.example", CNAME, b"\x00", "a trigger for every name (*) is not supported"),
        ("a.rpz.example", SOA, b"\x00\x00" + bytes(20), "SOA record at a: the only SOA belongs at the zone origin"),
        (
            "a.rpz.example",
            NS,
            name_wire("ns.example"),
            "NS record at a: delegations are not supported in a policy zone",
        ),
        ("a.rpz.example", 39, name_wire("b.example"), "DNAME record at a: DNAME is not an RPZ action"),
        ("a.rpz.example", 251, b"", "IXFR at a is a meta type, not data"),
        ("a.rpz.example", CNAME, b"\xc0\x0c", "compressed or malformed name in RDATA (names must be uncompressed)"),
        ("a.rpz.example", CNAME, b"\x03ab", "name in RDATA runs past its end"),
        ("a.rpz.example", CNAME, b"\x00\x00", "CNAME RDATA longer than its name"),
        (
            "a.rpz.example",
            CNAME,
            name_wire("rpz-nope"),
            "CNAME rpz-nope. is not an RPZ action (names under rpz-* are reserved)",
        ),
        (
            "a.rpz-what.rpz.example",
            CNAME,
            b"\x00",
            "unknown RPZ trigger 'rpz-what' in a.rpz-what (known: rpz-ip, rpz-client-ip, rpz-nsdname, rpz-nsip)",
        ),
        (
            "24.1.2.0.192.rpz-ip.rpz.example",
            CNAME,
            b"\x00",
            "bad rpz-ip trigger 24.1.2.0.192.rpz-ip: host bits set in 192.0.2.1/24 (the network is 192.0.2.0/24)",
        ),
    ],
)
def test_add_record_errors(owner: str, rtype: int, rdata: bytes, message: str) -> None:
    zone = empty()
    assert add_record(zone, owner, rtype, 60, rdata) == message
    assert zone == empty()


def test_add_record_bad_rdata() -> None:
    zone = empty()
    assert (add_record(zone, "a.rpz.example", A, 60, b"\x01\x02\x03") or "").startswith("bad A RDATA: ")
    assert (add_record(zone, "a.rpz.example", MX, 60, b"\x00\x01\xc0\x0c") or "").startswith("bad MX RDATA: ")
    assert len(zone) == 0


def test_add_record_conflicts() -> None:
    zone = empty()
    assert add_record(zone, "a.rpz.example", CNAME, 60, b"\x00") is None
    assert add_record(zone, "a.rpz.example", A, 60, bytes(4)) == "CNAME and other data at a"
    assert add_record(zone, "a.rpz.example", CNAME, 60, name_wire("rpz-drop")) == "more than one CNAME at a"
    assert add_record(zone, "a.rpz.example", CNAME, 60, b"\x00") is None  # the same record again
    assert zone.exact == {"a": NXDOMAIN_RULE}


def test_copy_on_write() -> None:
    zone = zone_of("a CNAME .\n*.b CNAME .\n32.1.0.0.10.rpz-ip CNAME .\nx.rpz-nsip CNAME .\nc A 192.0.2.1\n")
    copy = zone.copy()
    assert copy == zone
    assert copy.exact["c"] is zone.exact["c"]
    assert add_record(copy, "d.rpz.example", CNAME, 60, b"\x00") is None
    assert delete_record(copy, "c.rpz.example", A, bytes([192, 0, 2, 1])) is None
    assert delete_record(copy, "x.rpz-nsip.rpz.example", CNAME, b"\x00") is None
    assert add_record(copy, "*.e.rpz.example", CNAME, 60, b"\x00") is None
    assert add_record(copy, "32.2.0.0.10.rpz-ip.rpz.example", CNAME, 60, b"\x00") is None
    assert set(zone.exact) == {"a", "c"}
    assert set(zone.below) == {"b"}
    assert len(zone.ip) == 1
    assert zone.ignored == {"rpz-nsip": 1}
    assert copy != zone


def test_records_and_render() -> None:
    zone = zone_of(
        "www CNAME .\n*.www CNAME rpz-drop.\nlegacy CNAME legacy.\ng 60 CNAME garden.example.\n"
        "32.1.0.0.10.rpz-ip A 192.0.2.1\nns.rpz-nsdname CNAME .\nsemi\\;colon CNAME *.\n"
    )
    assert list(records(zone))[1:] == [
        ("www.rpz.example", CNAME, 300, b"\x00"),
        ("legacy.rpz.example", CNAME, 300, name_wire("rpz-passthru")),
        ("g.rpz.example", CNAME, 60, name_wire("garden.example")),
        ("semi;colon.rpz.example", CNAME, 300, b"\x01*\x00"),
        ("*.www.rpz.example", CNAME, 300, name_wire("rpz-drop")),
        ("32.1.0.0.10.rpz-ip.rpz.example", A, 300, bytes([192, 0, 2, 1])),
        ("ns.rpz-nsdname.rpz.example", CNAME, 300, b"\x00"),
    ]
    assert render_zone_file(zone) == (
        "$ORIGIN rpz.example.\n"
        "@ 300 IN SOA ns.example. admin.example. 1 3600 600 86400 60\n"
        "www 300 IN CNAME .\n"
        "legacy 300 IN CNAME rpz-passthru.\n"
        "g 60 IN CNAME garden.example.\n"
        "semi\\059colon 300 IN CNAME *.\n"
        "*.www 300 IN CNAME rpz-drop.\n"
        "32.1.0.0.10.rpz-ip 300 IN A 192.0.2.1\n"
        "ns.rpz-nsdname 300 IN CNAME .\n"
    )
    assert zone_of("", head=render_zone_file(zone)) == zone


def test_render_escapes_what_a_master_file_would_misread() -> None:
    zone = empty()
    for label in (b"a;b", b"(x)", b'q"t', b"$dollar", b"@", b"sp ace", b"dot.in", b"back\\slash", b"\xc3\xbc"):
        assert add_record(zone, key_from_wire_labels([label, b"rpz", b"example"]), CNAME, 60, b"\x00") is None
    assert add_record(zone, "t.rpz.example", CNAME, 60, b"\x04a;(\xff\x07example\x00") is None
    text = render_zone_file(zone)
    assert zone_of("", head=text) == zone


def test_ip_trigger_owner() -> None:
    owner = ip_trigger_owner
    assert owner(ipaddress.IPv4Network("192.0.2.0/24")) == "24.0.2.0.192.rpz-ip"
    assert owner(ipaddress.IPv6Network("2001:db8::1/128")) == "128.1.zz.db8.2001.rpz-ip"
    assert owner(ipaddress.IPv6Network("::/0")) == "0.zz.rpz-ip"
    assert owner(ipaddress.IPv6Network("1:0:1:0:1:0:1:0/128")) == "128.0.1.0.1.0.1.0.1.rpz-ip"  # no "::" for one group
    assert owner(ipaddress.IPv6Network("1:0:0:1:0:0:0:1/128")) == "128.1.zz.1.0.0.1.rpz-ip"  # the longest run
    assert owner(ipaddress.IPv6Network("1:0:0:1:0:0:1:1/128")) == "128.1.1.0.0.1.zz.1.rpz-ip"  # the first of equals


# --- round trip -------------------------------------------------------------------------------

_owner_labels = st.lists(
    st.one_of(_label, st.binary(min_size=1, max_size=8)).filter(lambda label: not str(label).startswith("rpz-")),
    min_size=1,
    max_size=3,
)
_networks = st.one_of(
    st.builds(lambda v, p: ipaddress.IPv4Network((v, p), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 32)),
    st.builds(
        lambda v, p: ipaddress.IPv6Network((v, p), strict=False), st.integers(0, 2**128 - 1), st.integers(0, 128)
    ),
)
_policy = st.sampled_from(
    [b"\x00", b"\x01*\x00", name_wire("rpz-passthru"), name_wire("rpz-drop"), name_wire("rpz-tcp-only")]
)
_local = st.one_of(
    st.tuples(st.just(A), st.binary(min_size=4, max_size=4)),
    st.tuples(st.just(AAAA), st.binary(min_size=16, max_size=16)),
    st.tuples(
        st.just(TXT),
        st.lists(st.binary(max_size=20), min_size=1, max_size=3).map(
            lambda parts: b"".join(bytes((len(p),)) + p for p in parts)
        ),
    ),
    st.tuples(st.just(MX), st.binary(min_size=2, max_size=2).map(lambda pref: pref + name_wire("mail.example"))),
    st.tuples(st.just(CNAME), st.sampled_from([name_wire("garden.example"), b"\x01*\x06garden\x00", b"\x03A;B\x00"])),
    st.tuples(st.just(65280), st.binary(max_size=10)),
)
_rdata = st.one_of(st.tuples(st.just(CNAME), _policy), _local)
_kind = st.sampled_from(["exact", "below", "ip", "nsdname"])


def _owner(kind: str, labels: list[bytes | str], network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    raw = [label.encode() if isinstance(label, str) else label for label in labels]
    if kind == "ip":
        return ip_trigger_owner(network) + ".rpz.example"
    if kind == "below":
        raw = [b"*", *raw]
    if kind == "nsdname":
        raw = [*raw, b"rpz-nsdname"]
    return key_from_wire_labels([*raw, b"rpz", b"example"])


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(_kind, _owner_labels, _networks, _rdata, st.integers(0, 2**31 - 1)), max_size=25),
    st.integers(0, 2**32 - 1),
)
def test_render_parse_round_trip(
    entries: list[tuple[str, list[bytes | str], ipaddress.IPv4Network | ipaddress.IPv6Network, tuple[int, bytes], int]],
    serial: int,
) -> None:
    zone = new_zone(ORIGIN, Soa(3600, "ns.example", "hostmaster.example", serial, 1, 2, 3, 4))
    for kind, labels, network, (rtype, rdata), ttl in entries:
        add_record(zone, _owner(kind, labels, network), rtype, ttl, rdata)  # conflicts are refused, fine
    text = render_zone_file(zone)
    for origin in (None, ORIGIN):
        parsed, errors = parse_zone_file(text.splitlines(True), "rendered", origin)
        assert errors == []
        assert parsed == zone
    assert parsed is not None
    assert sorted(records(parsed)) == sorted(records(zone))
