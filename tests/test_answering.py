"""Answering as a recursive service does (issue 11), checked with dnspython against the real
daemon: forwarded answers with AA cleared and RA set whatever the upstream's flags; CH-class
queries (version.bind, hostname.bind, id.server) answered locally, REFUSED unless configured,
never forwarded; NSID (RFC 5001) on every kind of answer when `[server] nsid` is set, never
forwarded upstream; an OPT record owned by another name than the root is FORMERR; FORMERR and
NOTIMP go out without RA, as BIND 9.18 and Unbound 1.17 send them (measured on loopback)."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
from dnslib import QTYPE, RR, A

from tests.daemon import GOV, OTHER, raw_udp

NSID_REQUEST = dns.edns.GenericOption(dns.edns.NSID, b"")


def ask(daemon, name: str, rdtype: str = "A", rdclass: str = "IN", source: str = OTHER, tcp: bool = False, **kw):
    query = dns.message.make_query(name, rdtype, rdclass, **kw)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(query, "127.0.0.1", port=daemon.port, source=source, timeout=3)


def nsid_of(message: dns.message.Message) -> bytes | None:
    for option in message.options:
        if option.otype == dns.edns.NSID:
            return option.to_wire()
    return None


def raw(daemon, payload: bytes) -> bytes | None:
    return raw_udp(daemon.port, payload, timeout=1)


def test_forwarded_answers_clear_aa_and_set_ra(make_daemon, upstream) -> None:
    def authoritative(request, transport):
        reply = request.reply()
        reply.header.aa = 1  # an authoritative upstream (nsd, Knot) answers AA, without RA
        reply.header.ra = 0
        reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("192.0.2.77"), ttl=60))
        return reply

    upstream.responders["auth.example"] = authoritative
    daemon = make_daemon()
    for tcp in (False, True):
        for _ in range(2):  # fresh, then from the cache
            reply = ask(daemon, "www.auth.example", tcp=tcp)
            assert reply.rcode() == dns.rcode.NOERROR
            assert [r.to_text() for rrset in reply.answer for r in rrset] == ["192.0.2.77"]
            assert not reply.flags & dns.flags.AA and reply.flags & dns.flags.RA
    blocked = ask(daemon, "www.tiktok.com", source=GOV)
    assert not blocked.flags & dns.flags.AA and blocked.flags & dns.flags.RA


def test_chaos_queries_are_refused_by_default_and_never_forwarded(make_daemon, upstream) -> None:
    daemon = make_daemon()
    for name in ("version.bind", "hostname.bind", "id.server", "version.server", "authors.bind"):
        for tcp in (False, True):
            reply = ask(daemon, name, "TXT", "CH", tcp=tcp)
            assert reply.rcode() == dns.rcode.REFUSED, name
            assert not reply.answer
    assert not [n for n in upstream.names_asked() if n.endswith(".bind") or n.endswith(".server")]


def test_chaos_queries_answered_with_the_configured_strings(make_daemon, upstream) -> None:
    daemon = make_daemon(server_extra='version = "blockd"\nidentity = "resolver-brussels-1"')
    expected = {
        "version.bind": '"blockd"',
        "version.server": '"blockd"',
        "hostname.bind": '"resolver-brussels-1"',
        "id.server": '"resolver-brussels-1"',
    }
    for name, text in expected.items():
        reply = ask(daemon, name, "TXT", "CH")
        assert reply.rcode() == dns.rcode.NOERROR
        (rrset,) = reply.answer
        assert rrset.rdclass == dns.rdataclass.CH and [r.to_text() for r in rrset] == [text]
    assert ask(daemon, "authors.bind", "TXT", "CH").rcode() == dns.rcode.REFUSED
    assert ask(daemon, "version.bind", "A", "CH").rcode() == dns.rcode.REFUSED
    assert not upstream.names_asked() or all(n.endswith("example.org") for n in upstream.names_asked())


def test_nsid_on_every_kind_of_answer_and_not_forwarded(make_daemon, upstream) -> None:
    daemon = make_daemon(server_extra='nsid = "resolver-brussels-1"\nallow = ["127.0.0.2/32", "127.0.0.3/32"]')
    want = b"resolver-brussels-1"
    asked = {"use_edns": 0, "options": [NSID_REQUEST]}
    assert nsid_of(ask(daemon, "www.tiktok.com", source=GOV, **asked)) == want  # blocked
    assert nsid_of(ask(daemon, "www.tiktok.com", source=GOV, **asked)) == want  # blocked, repeated
    assert nsid_of(ask(daemon, "nsid.example.org", **asked)) == want  # forwarded
    assert nsid_of(ask(daemon, "nsid.example.org", tcp=True, **asked)) == want  # from the cache, TCP
    assert nsid_of(ask(daemon, "version.bind", "TXT", "CH", **asked)) == want  # CH, refused
    assert nsid_of(ask(daemon, "example.org", source="127.0.0.4", **asked)) == want  # client refused
    assert nsid_of(ask(daemon, "nsid.example.org", use_edns=0)) is None  # not asked: not given
    for data in upstream.raw_queries:  # hop by hop: the upstream is never asked for its NSID
        assert all(o.otype != dns.edns.NSID for o in dns.message.from_wire(data).options)


def test_no_nsid_unless_configured(make_daemon) -> None:
    daemon = make_daemon()
    assert nsid_of(ask(daemon, "www.tiktok.com", source=GOV, use_edns=0, options=[NSID_REQUEST])) is None


def test_formerr_and_notimp_without_ra_and_opt_owner_checked(make_daemon, upstream) -> None:
    daemon = make_daemon()
    good = dns.message.make_query("example.org", "A").to_wire()
    two = bytearray(good)
    two[5] = 2  # QDCOUNT 2
    status = bytearray(good)
    status[2] = (status[2] & 0x87) | (2 << 3)  # opcode STATUS
    for payload, rcode in ((bytes(two), dns.rcode.FORMERR), (bytes(status), dns.rcode.NOTIMP)):
        reply = raw(daemon, payload)
        assert reply is not None and reply[3] & 0x0F == rcode and not reply[3] & 0x80
    with_opt = bytearray(dns.message.make_query("owner.example.org", "A", use_edns=0).to_wire())
    at = with_opt.rfind(b"\x00\x00\x29")  # the OPT record: root owner, type 41
    owned = bytes(with_opt[:at]) + b"\x01x\x00" + bytes(with_opt[at + 1 :])  # owner "x."
    reply = raw(daemon, owned)
    assert reply is not None and reply[3] & 0x0F == dns.rcode.FORMERR
    assert "owner.example.org" not in upstream.names_asked()
    assert "Traceback" not in daemon.log()
