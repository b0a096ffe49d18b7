"""A programmable upstream resolver on loopback (UDP and TCP), built on dnslib and threads.

Tests point blockd at it so no query ever leaves the machine.  It answers from `records`
(name -> list of dnslib RRs), falls back to A 192.0.2.1 / AAAA 2001:db8::1, and has a few
behaviours keyed on the query name's first label:
  tc.*      UDP answer with TC set and no records; TCP gets the full answer
  big.*     a ~3 kB TXT answer (for client-size truncation)
  forged.*  first a datagram with the wrong ID and address FORGED_A, then the real answer
  silent.*  never answered

Run as a script (`python -m tests.fakeupstream --port P --records FILE`), it serves the same
inside a network namespace for the egress tests; FILE is JSON {name: [[type, address, ttl]]}.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable

from dnslib import AAAA, QTYPE, RR, TXT, A, DNSRecord

DEFAULT_A = "192.0.2.1"
DEFAULT_AAAA = "2001:db8::1"
FORGED_A = "203.0.113.66"


class FakeUpstream:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.udp, self.tcp = self._bind(host, port)
        self.port = self.udp.getsockname()[1]
        self.tcp.listen(64)
        self.records: dict[str, list[RR]] = {}
        self.responders: dict[str, Callable[[DNSRecord, str], DNSRecord | None]] = {}
        self.queries: list[tuple[str, str, int, str]] = []  # (transport, name, qtype, source)
        self.raw_queries: list[bytes] = []
        self.lock = threading.Lock()
        self.stopping = False
        self.threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    @staticmethod
    def _bind(host: str, port: int) -> tuple[socket.socket, socket.socket]:
        """UDP and TCP on one port.  With port 0 the kernel picks a free UDP port, which a TCP
        connection (a test's client, a transfer) may hold as its local port: then try another."""
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((host, port))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((host, udp.getsockname()[1]))
            except OSError:
                udp.close()
                tcp.close()
                if port:
                    raise
                continue
            return udp, tcp
        raise OSError(f"no port free for both UDP and TCP on {host}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def names_asked(self) -> list[str]:
        with self.lock:
            return [name for _, name, _, _ in self.queries]

    def clear(self) -> None:
        with self.lock:
            self.queries.clear()
            self.raw_queries.clear()

    def answer(self, request: DNSRecord, transport: str) -> DNSRecord | None:
        qname = str(request.q.qname).rstrip(".").lower()
        first = qname.split(".", 1)[0]
        for suffix, responder in self.responders.items():
            if qname == suffix or qname.endswith("." + suffix):
                return responder(request, transport)
        if first == "silent":
            return None
        reply = request.reply()
        if first == "tc" and transport == "udp":
            reply.header.tc = 1
            return reply
        if first == "big" or (first == "tc" and transport == "tcp"):
            for index in range(40):
                reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT("x" * 60 + f"{index:04d}"), ttl=60))
            return reply
        if qname in self.records:
            for record in self.records[qname]:
                reply.add_answer(record)
            return reply
        if request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(DEFAULT_A), ttl=300))
        elif request.q.qtype == QTYPE.AAAA:
            reply.add_answer(RR(request.q.qname, QTYPE.AAAA, rdata=AAAA(DEFAULT_AAAA), ttl=300))
        elif request.q.qtype in (QTYPE.TXT, QTYPE.HTTPS, QTYPE.MX):
            reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT("upstream-data"), ttl=300))
        return reply

    def _record(self, transport: str, data: bytes, source: str) -> DNSRecord | None:
        try:
            request = DNSRecord.parse(data)
        except Exception:  # noqa: BLE001 - garbage from a test: ignore it like a real server would
            return None
        with self.lock:
            self.queries.append((transport, str(request.q.qname).rstrip(".").lower(), request.q.qtype, source))
            self.raw_queries.append(data)
        return request

    def _serve_udp(self) -> None:
        while not self.stopping:
            try:
                data, peer = self.udp.recvfrom(65535)
            except OSError:
                return
            if self.stopping or not peer:
                return
            request = self._record("udp", data, peer[0])
            if request is None:
                continue
            reply = self.answer(request, "udp")
            if reply is None:
                continue
            packed = reply.pack()
            if str(request.q.qname).lower().startswith("forged."):
                # A spoofer's guess at the ID, with an address of its own: accepting it would
                # answer FORGED_A instead of the real one.
                forged = request.reply()
                forged.header.id = (request.header.id + 1) % 65536
                forged.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(FORGED_A), ttl=300))
                self.udp.sendto(forged.pack(), peer)
                time.sleep(0.05)
            self.udp.sendto(packed, peer)

    def _serve_tcp(self) -> None:
        while not self.stopping:
            try:
                connection, peer = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_connection, args=(connection, peer), daemon=True).start()

    def _serve_connection(self, connection: socket.socket, peer: tuple[str, int]) -> None:
        with connection:
            connection.settimeout(5)
            buffer = b""
            try:
                while True:
                    chunk = connection.recv(65535)
                    if not chunk:
                        return
                    buffer += chunk
                    while len(buffer) >= 2:
                        (length,) = struct.unpack_from("!H", buffer)
                        if len(buffer) < 2 + length:
                            break
                        message, buffer = buffer[2 : 2 + length], buffer[2 + length :]
                        request = self._record("tcp", message, peer[0])
                        if request is None:
                            continue
                        reply = self.answer(request, "tcp")
                        if reply is not None:
                            packed = reply.pack()
                            connection.sendall(struct.pack("!H", len(packed)) + packed)
            except OSError:
                return

    def close(self) -> None:
        self.stopping = True
        for sock in (self.udp, self.tcp):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def main() -> None:
    import argparse
    import json
    import signal
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--records", help="JSON file: {name: [[type, address, ttl], ...]}")
    args = parser.parse_args()
    server = FakeUpstream(args.host, args.port)
    if args.records:
        with open(args.records) as handle:
            for name, entries in json.load(handle).items():
                server.records[name] = [
                    RR(name, getattr(QTYPE, kind), rdata=(A if kind == "A" else AAAA)(address), ttl=ttl)
                    for kind, address, ttl in entries
                ]
    print(f"ready {server.address}", flush=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        signal.pause()
    finally:
        server.close()


if __name__ == "__main__":
    main()
