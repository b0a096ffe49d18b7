"""A hostile client, run as its own process so that it floods at full speed (bench/victim.py and
tests/test_limits_daemon.py).

    python bench/flood.py PORT SOURCE SECONDS KIND [ZONE]

KIND: blocked   the same blocked name (www.tiktok.com) again and again (the repeat path)
      random    unique names under ZONE (default example.org): forwarded, cache misses
      silent    unique names under silent.example (forwarded to an upstream that never answers)
      slowpath  unique names under ZONE with a space in a label (parsed by dnslib's slow path)
      junk      a blocked query followed by 60 kB of unique trailing bytes
Sends to 127.0.0.1:PORT from SOURCE without reading answers; prints the number of datagrams sent.
Bounded: stops after SECONDS.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time


def question(name: str, qtype: int = 1) -> bytes:
    labels = b"".join(bytes((len(label),)) + label.encode() for label in name.split("."))
    return labels + b"\0" + struct.pack("!HH", qtype, 1)


def query(query_id: int, name: str) -> bytes:
    return struct.pack("!HHHHHH", query_id & 0xFFFF, 0x0100, 1, 0, 0, 0) + question(name)


def main() -> None:
    port, source, seconds, kind = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
    zone = sys.argv[5] if len(sys.argv) > 5 else "example.org"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    target = ("127.0.0.1", port)
    deadline = time.monotonic() + seconds
    sent = 0
    blocked = query(0x4242, "www.tiktok.com")
    junk = os.urandom(60_000)
    while True:
        if sent % 256 == 0 and time.monotonic() >= deadline:
            break
        if kind == "blocked":
            packet = blocked
        elif kind == "random":
            packet = query(sent, f"r{sent}-{os.getpid()}.{zone}")
        elif kind == "slowpath":  # a space in a label: the fast path leaves escaped names to dnslib
            packet = query(sent, f"r{sent} x.{zone}")
        elif kind == "silent":
            packet = query(sent, f"s{sent}-{os.getpid()}.silent.example")
        else:  # junk: unique trailing bytes after a valid blocked query
            packet = blocked + struct.pack("!I", sent) + junk
        try:
            sock.sendto(packet, target)
            sent += 1
        except (BlockingIOError, ConnectionRefusedError):
            pass
    print(sent)


if __name__ == "__main__":
    main()
