"""The real daemon over real sockets: blocking, forwarding, TCP, failures, garbage."""

from __future__ import annotations

import random
import socket
import struct
import time

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rdatatype
import pytest

from tests.daemon import GOV, OTHER, raw_udp, rcode_name

PERSONAL = "127.0.0.4"


def addresses(message: dns.message.Message) -> list[str]:
    return [item.to_text() for rrset in message.answer for item in rrset]


def test_listed_names_and_subdomains_sinkholed_for_government_only(make_daemon, upstream) -> None:
    daemon = make_daemon()
    for name in ["tiktok.com", "www.tiktok.com", "a.b.c.d.tiktokv.com", "blocked.example", "x.adblock.example"]:
        answer = daemon.query(name, "A", source=GOV)
        assert rcode_name(answer) == "NOERROR"
        assert addresses(answer) == ["0.0.0.0"], name
        assert daemon.query(name, "AAAA", source=GOV).answer[0][0].to_text() == "::"
    assert not [n for n in upstream.names_asked() if "tiktok" in n or n.endswith("blocked.example")]

    for name in ["www.tiktok.com", "blocked.example"]:
        assert addresses(daemon.query(name, "A", source=OTHER)) == ["192.0.2.1"]
    assert "www.tiktok.com" in upstream.names_asked()


def test_unlisted_names_forwarded_for_both(make_daemon, upstream) -> None:
    daemon = make_daemon()
    for source in (GOV, OTHER):
        for name in ["example.org", "nottiktok.com", "tiktok.com.example.net", "tiktok.co"]:
            assert addresses(daemon.query(name, "A", source=source)) == ["192.0.2.1"], (name, source)


def test_blocked_answer_shape(make_daemon) -> None:
    daemon = make_daemon()
    query = dns.message.make_query("WwW.TikTok.COM", "A", use_edns=0, payload=1232)
    query.flags |= dns.flags.CD
    answer = dns.query.udp(query, "127.0.0.1", port=daemon.port, source=GOV, timeout=3)
    assert answer.id == query.id
    assert answer.question[0].name.to_text() == "WwW.TikTok.COM."  # echoed exactly as asked
    assert answer.flags & dns.flags.RD and answer.flags & dns.flags.RA and answer.flags & dns.flags.CD
    assert answer.answer[0].ttl == 300
    ede = [opt for opt in answer.options if opt.otype == dns.edns.EDE]
    assert ede and ede[0].code == 15 and "tiktok" in ede[0].text

    for rdtype in ["HTTPS", "SVCB", "TXT", "MX", "ANY", "NS", "SOA", "CNAME", "SRV"]:
        nodata = daemon.query("www.tiktok.com", rdtype, source=GOV)
        assert rcode_name(nodata) == "NOERROR" and not nodata.answer, rdtype
        assert nodata.authority[0].rdtype == dns.rdatatype.SOA, rdtype
        assert nodata.authority[0].name.to_text() == "www.tiktok.com."


def test_no_edns_no_ede(make_daemon) -> None:
    answer = make_daemon().query("www.tiktok.com", "A", source=GOV, use_edns=False)
    assert answer.edns == -1 and addresses(answer) == ["0.0.0.0"]


@pytest.mark.parametrize(
    ("action", "rcode", "has_soa"),
    [("nxdomain", "NXDOMAIN", True), ("nodata", "NOERROR", True), ("refused", "REFUSED", False)],
)
def test_group_actions(make_daemon, action, rcode, has_soa) -> None:
    daemon = make_daemon(
        extra=f"""
        [groups.strict]
        networks = ["127.0.0.5/32"]
        lists = ["tiktok"]
        action = "{action}"
        ttl = 60
        """
    )
    answer = daemon.query("m.tiktok.com", "A", source="127.0.0.5")
    assert rcode_name(answer) == rcode and not answer.answer
    assert bool(answer.authority) == has_soa
    if has_soa:
        assert answer.authority[0].ttl == 60


def test_per_list_action_override(make_daemon, test_lists) -> None:
    (test_lists / "doh.txt").write_text("dns.google\n")
    daemon = make_daemon(
        extra="""
        [lists.doh]
        path = "LISTS/doh.txt"
        action = "nxdomain"

        [groups.doh-users]
        networks = ["127.0.0.6/32"]
        lists = ["tiktok", "doh"]
        """.replace("LISTS", str(test_lists))
    )
    assert rcode_name(daemon.query("dns.google", "A", source="127.0.0.6")) == "NXDOMAIN"
    assert addresses(daemon.query("www.tiktok.com", "A", source="127.0.0.6")) == ["0.0.0.0"]


def test_monitor_group_resolves(make_daemon, upstream) -> None:
    daemon = make_daemon()
    answer = daemon.query("www.tiktok.com", "A", source=PERSONAL)
    assert addresses(answer) == ["192.0.2.1"]
    assert "www.tiktok.com" in upstream.names_asked()


def test_tcp_same_answers_and_pipelining(make_daemon) -> None:
    daemon = make_daemon()
    assert addresses(daemon.query("www.tiktok.com", "A", source=GOV, tcp=True)) == ["0.0.0.0"]
    assert addresses(daemon.query("www.tiktok.com", "A", source=OTHER, tcp=True)) == ["192.0.2.1"]
    assert addresses(daemon.query("example.org", "A", source=GOV, tcp=True)) == ["192.0.2.1"]

    # Several queries in one write, on one connection (RFC 7766 pipelining).
    names = ["a.tiktok.com", "example.org", "b.tiktok.com", "example.net", "blocked.example"]
    queries = [dns.message.make_query(name, "A") for name in names]
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=3, source_address=(GOV, 0)) as connection:
        connection.sendall(b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in queries)))
        answers = {}
        buffer = b""
        while len(answers) < len(queries):
            buffer += connection.recv(65535)
            while len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack_from("!H", buffer)[0]:
                length = struct.unpack_from("!H", buffer)[0]
                message = dns.message.from_wire(buffer[2 : 2 + length])
                buffer = buffer[2 + length :]
                answers[message.id] = message
    for query in queries:
        name = query.question[0].name.to_text().rstrip(".")
        expected = ["192.0.2.1"] if name.startswith("example") else ["0.0.0.0"]
        assert addresses(answers[query.id]) == expected, name


def test_tcp_idle_timeout_closes_connection(make_daemon) -> None:
    daemon = make_daemon(server_extra="tcp_idle_timeout = 0.5")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as connection:
        started = time.monotonic()
        assert connection.recv(10) == b""  # closed by the server
        assert time.monotonic() - started < 4


def test_upstream_dead_servfail_within_timeout(make_daemon) -> None:
    # A socket that receives but never answers: every attempt times out.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        daemon = make_daemon(upstreams=[f"127.0.0.1:{blackhole.getsockname()[1]}"], timeout=0.3)
        started = time.monotonic()
        answer = daemon.query("example.org", "A", source=OTHER, timeout=5)
        elapsed = time.monotonic() - started
    assert rcode_name(answer) == "SERVFAIL"
    assert 0.25 < elapsed < 1.5
    # Blocked names never need the upstream.
    assert addresses(daemon.query("www.tiktok.com", "A", source=GOV)) == ["0.0.0.0"]


def test_failover_to_second_upstream(make_daemon, upstream) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{blackhole.getsockname()[1]}"
        daemon = make_daemon(upstreams=[dead, upstream.address], timeout=0.3)
        assert addresses(daemon.query("example.org", "A", source=OTHER, timeout=5)) == ["192.0.2.1"]


def test_truncated_upstream_answer_retried_over_tcp(make_daemon, upstream) -> None:
    daemon = make_daemon()
    answer = daemon.query("tc.example", "TXT", source=OTHER, tcp=True)
    assert len(answer.answer[0]) == 40
    transports = [t for t, name, _, _ in upstream.queries if name == "tc.example"]
    assert transports == ["udp", "tcp"]


def test_client_udp_size_honoured(make_daemon) -> None:
    daemon = make_daemon()
    # Without EDNS the limit is 512: a ~3 kB answer comes back truncated, and complete over TCP.
    small = daemon.query("big.example", "TXT", source=OTHER, use_edns=False)
    assert small.flags & dns.flags.TC and not small.answer
    # A client may accept 8 kB, but no UDP answer is larger than blockd advertises (1232 by
    # default: limits.max_udp_size), so a spoofed query cannot amplify: TC, and TCP gets it all.
    large = daemon.query("big.example", "TXT", source=OTHER, use_edns=0, payload=8192)
    assert large.flags & dns.flags.TC and not large.answer
    assert len(daemon.query("big.example", "TXT", source=OTHER, tcp=True).answer[0]) == 40


def test_forged_upstream_answer_ignored(make_daemon, upstream) -> None:
    daemon = make_daemon()
    answer = daemon.query("forged.example", "A", source=OTHER)
    assert addresses(answer) == ["192.0.2.1"]  # the forgery (FORGED_A, wrong ID) came first
    assert upstream.names_asked().count("forged.example") == 1


def test_edns_passed_through_upstream(make_daemon, upstream) -> None:
    daemon = make_daemon()
    daemon.query("edns.example", "A", source=OTHER, use_edns=0, payload=4000, want_dnssec=True)
    request = dns.message.from_wire(upstream.raw_queries[-1])
    assert request.edns == 0 and request.payload == 4000 and request.flags is not None
    assert request.ednsflags & dns.flags.DO


def test_clients_outside_allow_refused(make_daemon) -> None:
    daemon = make_daemon(server_extra='allow = ["127.0.0.2/32"]')
    assert addresses(daemon.query("example.org", source=GOV)) == ["192.0.2.1"]
    refused = daemon.query("example.org", source=OTHER)
    assert rcode_name(refused) == "REFUSED"


def test_malformed_queries(make_daemon) -> None:
    daemon = make_daemon()

    def raw(payload: bytes) -> bytes | None:
        return raw_udp(daemon.port, payload)

    good = dns.message.make_query("example.org", "A").to_wire()
    # Too short for a header: silently dropped.
    assert raw(b"\x12\x34\x01") is None
    # QDCOUNT 2: FORMERR with the ID.
    two = bytearray(good)
    two[5] = 2
    reply = raw(bytes(two))
    assert reply is not None and reply[:2] == good[:2] and reply[3] & 0xF == 1
    # Truncated question: FORMERR.
    reply = raw(good[:15])
    assert reply is not None and reply[3] & 0xF == 1
    # Opcode NOTIFY: NOTIMP.
    notify = bytearray(good)
    notify[2] = (notify[2] & 0x87) | (4 << 3)
    reply = raw(bytes(notify))
    assert reply is not None and reply[3] & 0xF == 4
    # A response (QR set) is never answered (no loops).
    response = bytearray(good)
    response[2] |= 0x80
    assert raw(bytes(response)) is None


def test_garbage_does_not_break_the_daemon(make_daemon) -> None:
    daemon = make_daemon()
    rng = random.Random(1234)
    good = dns.message.make_query("www.tiktok.com", "A").to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((GOV, 0))
        for index in range(1000):
            kind = index % 4
            if kind == 0:
                payload = rng.randbytes(rng.randint(0, 600))
            elif kind == 1:  # a valid header with random flipped bytes after it
                payload = bytearray(good)
                for _ in range(rng.randint(1, 6)):
                    payload[rng.randrange(len(payload))] = rng.randrange(256)
                payload = bytes(payload)
            elif kind == 2:  # truncated at a random point
                payload = good[: rng.randint(0, len(good))]
            else:  # random bytes with a plausible header
                payload = good[:12] + rng.randbytes(rng.randint(0, 300))
            sock.sendto(payload, ("127.0.0.1", daemon.port))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:  # garbage over TCP too
        tcp.connect(("127.0.0.1", daemon.port))
        tcp.sendall(struct.pack("!H", 40) + rng.randbytes(40) + b"\x00\x01\xff")
    time.sleep(0.3)
    assert daemon.process.poll() is None
    assert addresses(daemon.query("www.tiktok.com", "A", source=GOV)) == ["0.0.0.0"]
    assert addresses(daemon.query("example.org", "A", source=OTHER)) == ["192.0.2.1"]
    assert addresses(daemon.query("www.tiktok.com", "A", source=GOV, tcp=True)) == ["0.0.0.0"]


def test_a_query_that_cannot_be_forwarded_does_not_strand_the_name(make_daemon) -> None:
    """dnslib parses this query but cannot re-pack it (an additional record's owner grows past
    253 characters through compression pointers); the client gets SERVFAIL and later queries
    for the same name are still answered."""
    question = b"\x03www\x07example\x03com\x00\x00\x01\x00\x01"
    records = b""
    owners = []  # offsets of earlier owners, each new one is 63 'a' + a pointer to the previous
    offset = 12 + len(question)
    for _ in range(5):
        owner = b"\x3f" + b"a" * 63 + (struct.pack("!H", 0xC000 | owners[-1]) if owners else b"\x00")
        owners.append(offset)
        record = owner + struct.pack("!HHIH", 1, 1, 0, 4) + b"\x01\x02\x03\x04"
        records += record
        offset += len(record)
    cookie = struct.pack("!HH", 10, 8) + b"12345678"
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, len(cookie)) + cookie
    packet = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 6) + question + records + opt
    daemon = make_daemon()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.bind((OTHER, 0))
        sock.sendto(packet, ("127.0.0.1", daemon.port))
        reply = sock.recv(65535)
    assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F in (1, 2)  # FORMERR or SERVFAIL, not silence
    for source in (OTHER, GOV):
        assert addresses(daemon.query("www.example.com", "A", source=source, use_edns=0)) == ["192.0.2.1"]
