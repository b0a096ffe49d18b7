"""Mutated packets over UDP and TCP against the real daemon: no traceback, no internal error,
and correct answers afterwards.

A seeded mutator (reproducible: the seed is in the test id) derives packets from a corpus of
valid queries that reach every parser path: the fast path, dnslib's slow path, EDNS options
(ECS, cookie, NSID, unknown), the CH class, NOTIFY, ANY, compression pointers, long names.
BLOCKD_FUZZ_PACKETS sets how many (10,000 by default; .ci/run sends 100,000), sent within at
most MAX_SECONDS per transport.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import time

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rdataclass
import dns.rdatatype
import pytest

from tests.daemon import GOV, OTHER, Daemon
from tests.test_metrics import scrape

PACKETS = int(os.environ.get("BLOCKD_FUZZ_PACKETS", "10000"))
MAX_SECONDS = 120.0  # per transport
SEED = 20261201


def corpus() -> list[bytes]:
    messages = [
        dns.message.make_query("www.tiktok.com", "A"),
        dns.message.make_query("example.org", "AAAA", use_edns=0, payload=1232),
        dns.message.make_query("a.b.c.tiktokv.com", "HTTPS", use_edns=0, want_dnssec=True),
        dns.message.make_query("example.org", "ANY", use_edns=0),
        dns.message.make_query("version.bind", "TXT", rdclass=dns.rdataclass.CH),
        dns.message.make_query("x" * 63 + "." + "y" * 63 + ".example", "TXT", use_edns=0),
        dns.message.make_query(
            "ecs.example.org",
            "A",
            use_edns=0,
            options=[
                dns.edns.ECSOption("192.0.2.0", 24),
                dns.edns.GenericOption(dns.edns.COOKIE, b"12345678"),
                dns.edns.GenericOption(dns.edns.NSID, b""),
                dns.edns.GenericOption(65001, b"\x00" * 5),
            ],
        ),
    ]
    notify = dns.message.make_query("zone.example", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    messages.append(notify)
    packets = [m.to_wire() for m in messages]
    header = struct.pack("!HHHHHH", 0x1111, 0x0100, 1, 0, 0, 0)
    # A compression pointer in the question (the fast path declines it; this one loops).
    packets.append(header + b"\x03www\xc0\x0c" + struct.pack("!HH", 1, 1))
    # A space in a label: valid, and read by dnslib's slow path.
    packets.append(header + b"\x03a b\x07example\x03org\x00" + struct.pack("!HH", 1, 1))
    return packets


def mutate(rng: random.Random, packet: bytes) -> bytes:
    data = bytearray(packet)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.3 and data:  # flip bits
            at = rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8)
        elif choice < 0.5 and data:  # a random byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice < 0.6:  # cut
            del data[rng.randrange(len(data) + 1) :]
        elif choice < 0.7:  # insert junk
            at = rng.randrange(len(data) + 1)
            data[at:at] = os.urandom(rng.randint(1, 64))
        elif choice < 0.8 and len(data) >= 12:  # header counts
            struct.pack_into("!H", data, 4 + 2 * rng.randrange(4), rng.choice([0, 1, 2, 255, 65535]))
        elif choice < 0.9 and len(data) > 12:  # a label length byte
            data[12] = rng.choice([0, 63, 64, 102, 191, 192, 255])
        else:  # trailing bytes
            data += os.urandom(rng.randint(1, 600))
    return bytes(data)


def fuzz_udp(daemon: Daemon, rng: random.Random, packets: list[bytes], count: int, deadline: float) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((OTHER, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.settimeout(0.02)
        for sent in range(count):
            if sent % 100 == 0 and time.monotonic() > deadline:
                return sent
            sock.sendto(mutate(rng, rng.choice(packets)), ("127.0.0.1", daemon.port))
            if sent % 100 == 99:  # paced by the answers, so the socket buffers never drop
                with contextlib.suppress(TimeoutError):
                    while sock.recv(65535):
                        pass
    return count


def fuzz_tcp(daemon: Daemon, rng: random.Random, packets: list[bytes], count: int, deadline: float) -> int:
    sent = 0
    while sent < count and time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=2) as conn:
            conn.settimeout(0.05)
            for _ in range(rng.randint(1, 200)):  # until a mutated length prefix desyncs the stream
                message = mutate(rng, rng.choice(packets))
                prefix = len(message) if rng.random() < 0.97 else rng.randrange(65536)
                try:
                    conn.sendall(struct.pack("!H", prefix) + message)
                except OSError:
                    break
                sent += 1
                with contextlib.suppress(TimeoutError, OSError):
                    if sent % 20 == 0:
                        conn.recv(65535)
    return sent


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_mutated_packets_never_raise_and_the_daemon_still_answers(make_daemon, transport: str) -> None:
    daemon = make_daemon(extra="[limits]\nenabled = false\n", log_queries="all")
    rng = random.Random(f"{SEED}-{transport}")
    packets = corpus()
    count = PACKETS // 2
    # Bounded in time as well (CI must stay short on a loaded machine): most of the packets still go.
    deadline = time.monotonic() + MAX_SECONDS
    fuzz = fuzz_udp if transport == "udp" else fuzz_tcp
    sent = fuzz(daemon, rng, packets, count, deadline)
    assert sent >= min(count, 10_000), f"only {sent} packets sent in {MAX_SECONDS} s"
    log = daemon.log()
    assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]
    assert scrape(daemon)[("blockd_query_errors_total", ())] == 0
    for tcp in (False, True):
        blocked = daemon.query("www.tiktok.com", "A", source=GOV, tcp=tcp)
        assert [r.to_text() for rrset in blocked.answer for r in rrset] == ["0.0.0.0"]
        forwarded = daemon.query("after-fuzz.example.org", "A", source=OTHER, tcp=tcp)
        assert [r.to_text() for rrset in forwarded.answer for r in rrset] == ["192.0.2.1"]
