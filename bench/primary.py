"""The RPZ comparison's real primary: Knot (knotd/knotc from Debian) on loopback, serving the generated zone
by AXFR and IXFR and sending NOTIFY, and the bench's own NOTIFY listener, which timestamps when Knot sent it.

Knot runs on the client CPU (as the fake upstream and dnsperf do) from its own config, zone file, rundir and
storage in the temp dir (templates/knot.conf), and is stopped by its pid like every other process.  Its
NOTIFY goes to the listener first and to the DNS ports of blockd and unbound, fixed before Knot starts; the
one of those two that is not running at the time gets an ICMP port unreachable, which Knot only logs.
"""

from __future__ import annotations

import re
import selectors
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common import BenchError, log
from data import RpzZone
from procs import CLIENT_CPU, Proc, free_port, rss_mb
from servers import Context, ask, template

TYPE_SOA = 6
OPCODE_NOTIFY = 4


class NotifyListener:
    """UDP and TCP on one 127.0.0.1 port (Knot 3.2 sends NOTIFY over TCP): answers NOTIFY as a secondary would
    and records when each arrived."""

    def __init__(self) -> None:
        self.port = free_port()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", self.port))
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.1", self.port))
        self.tcp.listen(16)
        self.seen: list[tuple[float, int | None]] = []  # (time.monotonic(), SOA serial in the NOTIFY)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="notify-listener", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.udp, selectors.EVENT_READ)
            selector.register(self.tcp, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(0.2):
                    try:
                        if key.fileobj is self.udp:
                            data, peer = self.udp.recvfrom(65535)
                            reply = self._answer(data)
                            if reply:
                                self.udp.sendto(reply, peer)
                        else:
                            self._serve_tcp()
                    except OSError:
                        pass

    def _serve_tcp(self) -> None:
        conn, _ = self.tcp.accept()
        with conn:
            conn.settimeout(2.0)
            buffer = b""
            while True:
                chunk = conn.recv(65535)
                if not chunk:
                    return
                buffer += chunk
                while len(buffer) >= 2 and len(buffer) >= 2 + int.from_bytes(buffer[:2], "big"):
                    size = int.from_bytes(buffer[:2], "big")
                    data, buffer = buffer[2 : 2 + size], buffer[2 + size :]
                    reply = self._answer(data)
                    if reply:
                        conn.sendall(len(reply).to_bytes(2, "big") + reply)

    def _answer(self, data: bytes) -> bytes | None:
        """Record a NOTIFY; its answer (None for anything else)."""
        from dnslib import DNSRecord

        arrived = time.monotonic()
        try:
            message = DNSRecord.parse(data)
        except Exception:  # noqa: BLE001 - anything unreadable is not a NOTIFY
            return None
        if message.header.opcode != OPCODE_NOTIFY or message.header.qr:
            return None
        serial = next((rr.rdata.times[0] for rr in message.rr if rr.rtype == TYPE_SOA), None)
        self.seen.append((arrived, serial))
        return message.reply().pack()

    def arrival(self, serial: int, after: float, limit: float = 0.0) -> float | None:
        """When the first NOTIFY for `serial` (or without a serial) came after `after`, waiting up to `limit` s."""
        deadline = time.monotonic() + limit
        while True:
            for arrived, seen in list(self.seen):
                if arrived >= after and seen in (serial, None):
                    return arrived
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.udp.close()
        self.tcp.close()


@dataclass
class Knot:
    dir: Path
    port: int
    conf: Path
    zone_file: Path
    origin: str
    proc: Proc
    knotc: str
    startup: float = 0.0  # seconds until it served the zone's serial
    rss_load: float = 0.0  # MB, then

    @property
    def log_path(self) -> Path:
        return self.dir / "knot.log"

    def control(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.knotc, "-c", str(self.conf), *args], capture_output=True, text=True, timeout=timeout
        )

    def reload(self) -> subprocess.Popen[str]:
        """`knotc -b zone-reload ZONE` (blocking: it exits when Knot has loaded the new file), started."""
        return subprocess.Popen(
            [self.knotc, "-c", str(self.conf), "-b", "zone-reload", self.origin],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def serial(self) -> int | None:
        """The SOA serial Knot serves now."""
        from dnslib import DNSRecord

        query = DNSRecord.question(self.origin, "SOA")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            try:
                sock.sendto(query.pack(), ("127.0.0.1", self.port))
                reply = DNSRecord.parse(sock.recv(65535))
            except (TimeoutError, OSError):
                return None
        return next((rr.rdata.times[0] for rr in reply.rr if rr.rtype == TYPE_SOA), None)

    def wait_for_serial(self, serial: int, limit: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < limit:
            if self.proc.popen.poll() is not None:
                raise BenchError(f"knotd exited with {self.proc.popen.returncode}:\n{self.log_tail()}")
            if self.serial() == serial:
                return time.monotonic() - started
            time.sleep(0.05)
        raise BenchError(f"knotd did not serve serial {serial} within {limit:g}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return self.proc.log_tail(lines)

    def log_offset(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def transfers_since(self, offset: int) -> list[str]:
        """Knot's log lines about outgoing transfers since `offset`, shortened: 'AXFR started, serial 1', ..."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(offset)
                text = handle.read().decode(errors="replace")
        except OSError:
            return []
        found = []
        for line in text.splitlines():
            match = re.search(r"\b([AI]XFR), outgoing, remote [^,]+, (.*)", line)
            if match:
                found.append(f"{match.group(1)} {match.group(2)}")
        return found


def start_knot(ctx: Context, zone: RpzZone, notify: dict[str, int], limit: float) -> Knot:
    """knotd on the client CPU serving `zone` (copied to its storage), NOTIFY to each of `notify` (name -> port)."""
    knot_dir = ctx.tmp / "knot"
    for sub in ("run", "storage"):
        (knot_dir / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    zone_file = knot_dir / "rpz.zone"
    zone.write(zone_file)
    remotes = "".join(f"  - id: {name}\n    address: 127.0.0.1@{p}\n" for name, p in notify.items())
    conf = knot_dir / "knot.conf"
    conf.write_text(
        template(
            "knot.conf",
            dir=knot_dir,
            port=port,
            remotes=remotes.rstrip("\n"),
            origin=zone.origin,
            file=zone_file.name,
            notify=", ".join(notify),
        )
    )
    knotd, knotc = ctx.tools["knotd"], ctx.tools["knotc"]
    check = subprocess.run([knotc, "-c", str(conf), "conf-check"], capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        raise BenchError(f"knotc conf-check {conf} failed:\n{check.stdout}{check.stderr}")
    started = time.monotonic()
    proc = ctx.procs.start("knot", ["taskset", "-c", CLIENT_CPU, knotd, "-c", str(conf)], knot_dir / "knotd.out")
    knot = Knot(knot_dir, port, conf, zone_file, zone.origin, proc, knotc)
    knot.wait_for_serial(zone.serial, limit)
    knot.startup = time.monotonic() - started
    knot.rss_load = rss_mb(proc.pid)
    probe = ask(port, f"{zone.probe}.{zone.origin}", "CNAME")
    if probe is None or probe[0] != 0 or probe[1] != ["."]:
        raise BenchError(f"knotd serves {probe!r} for the probe trigger {zone.probe}, not CNAME .")
    log(
        f"knot: serving {zone.origin} serial {zone.serial} ({zone.triggers:,} triggers) on 127.0.0.1:{port}, CPU "
        f"{CLIENT_CPU}, after {knot.startup:.1f}s, RSS {knot.rss_load:.0f} MB"
    )
    return knot
