"""Real RPZ secondaries for the tests: Unbound and BIND from Debian, transferring a policy zone.

Each server gets its own config, zone file, pid file and log in a temp dir, listens on 127.0.0.1
at a free port, forwards everything the policy does not rewrite to a loopback upstream (a
FakeUpstream), and is stopped by its PID (SIGTERM, SIGKILL after 10 s).  Used to check what a
client of an existing resolver sees once that resolver consumes blockd's published zone.

The config lines that matter, and why:
- Unbound 1.17 (`rpz:` clause):
  `module-config: "respip validator iterator"`: the `respip` module applies rpz-ip (answer
  address) triggers, and unbound will not start an `rpz:` zone without it, even one with QNAME
  triggers only ("fatal error: RPZ requires the respip module").  No trust anchor: nothing validates.
  `primary: 127.0.0.1@P` + `allow-notify: 127.0.0.1`: transfer from, and take NOTIFY from, the
  primary.  Unbound cannot sign transfers (no TSIG), so the primary must allow it by address.
  `zonefile:` in the temp dir (unbound writes each transferred version there);
  `do-not-query-localhost: no` (else the 127.0.0.1 forwarder is never asked);
  `local-zone: "test." nodefault` (else unbound answers the RFC 6761 `test.` names itself);
  `control-interface: <dir>/unbound.sock` + `control-use-cert: no`: `unbound-control
  list_auth_zones` shows the serial of the RPZ zone: an SOA query through unbound does not (it
  never serves a policy zone), so that is how wait_serial() sees a transfer land.
- BIND 9.18 (`named -g`: foreground, log to stderr, as root: no `-u` needed, no AppArmor here):
  `response-policy { zone "Z"; } min-update-interval 0;`: BIND rebuilds the policy summary at most
  every 60 s by default, which would hold back every IXFR for up to a minute.
  `zone "Z" { type secondary; primaries { 127.0.0.1 port P key "K"; }; allow-notify {...}; }`;
  the key statement comes from an `include`d file as `tsig-keygen -a hmac-sha256 K` writes it.
  `forward only; forwarders {...}; dnssec-validation no; notify no; controls { };` and every path
  (directory, pid-file, session-keyfile, managed-keys-directory, dump-file...) in the temp dir, so
  /etc/bind and /var/cache/bind are never touched.  BIND answers the SOA of its secondary zone
  authoritatively, which is how wait_serial() sees a transfer land.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import dns.exception
import dns.message
import dns.query
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import pytest

from tests.daemon import free_port, stop_process

UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"
UNBOUND_CONTROL = shutil.which("unbound-control") or "/usr/sbin/unbound-control"
NAMED = shutil.which("named") or "/usr/sbin/named"
needs_unbound = pytest.mark.skipif(
    not (os.access(UNBOUND, os.X_OK) and os.access(UNBOUND_CONTROL, os.X_OK)),
    reason="unbound is not installed (apt-get install unbound): unbound and unbound-control are needed",
)
needs_named = pytest.mark.skipif(
    not os.access(NAMED, os.X_OK), reason="BIND is not installed (apt-get install bind9): named is needed"
)

# Every test's Unbound: on loopback, in the foreground, as root, every file in its temp dir, the
# 127.0.0.1 upstream allowed (Unbound skips localhost servers by default) and the RFC 6761 "test."
# names the tests use resolved rather than answered by Unbound itself.  Format with port= and dir=.
UNBOUND_SERVER = """\
server:
    interface: 127.0.0.1
    port: {port}
    do-daemonize: no
    use-syslog: no
    verbosity: 1
    username: ""
    chroot: ""
    directory: "{dir}"
    pidfile: "{dir}/unbound.pid"
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    local-zone: "test." nodefault
"""

UNBOUND_CONF = UNBOUND_SERVER + """\
    num-threads: 1
    module-config: "respip validator iterator"
remote-control:
    control-enable: yes
    control-interface: "{dir}/unbound.sock"
    control-use-cert: no
rpz:
    name: "{zone}"
    primary: 127.0.0.1@{primary_port}
    allow-notify: 127.0.0.1
    zonefile: "{dir}/{zone}rpz"
    rpz-log: yes
    rpz-log-name: "{zone}"
forward-zone:
    name: "."
    forward-addr: 127.0.0.1@{upstream_port}
"""

NAMED_CONF = """\
{include}options {{
    directory "{dir}";
    pid-file "{dir}/named.pid";
    session-keyfile "{dir}/session.key";
    managed-keys-directory "{dir}";
    dump-file "{dir}/named_dump.db";
    statistics-file "{dir}/named.stats";
    memstatistics-file "{dir}/named.memstats";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    forwarders {{ 127.0.0.1 port {upstream_port}; }};
    forward only;
    recursion yes;
    allow-query {{ 127.0.0.0/8; }};
    dnssec-validation no;
    notify no;
    max-cache-size 16m;
    serial-query-rate 1000;  // the default 20/s holds each NOTIFY's refresh back ~0.25 s
    response-policy {{ zone "{zone}"; }} min-update-interval 0;
}};
controls {{ }};
zone "{zone}" {{
    type secondary;
    primaries {{ 127.0.0.1 port {primary_port}{key}; }};
    file "{dir}/{zone}db";
    allow-notify {{ 127.0.0.1; }};
    allow-query {{ 127.0.0.0/8; }};
}};
"""


class _Secondary:
    """One server process: start, stop, query; a context manager that stops it on the way out."""

    name = "server"

    def __init__(self, dir: Path, zone: str, primary_port: int, upstream_port: int):
        self.dir = dir
        self.zone = zone if zone.endswith(".") else zone + "."
        self.primary_port = primary_port
        self.upstream_port = upstream_port
        self.port = free_port()
        self.log_path = dir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        dir.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 20.0) -> None:
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                # Any answer to a CHAOS question means the listener is up; never forwarded upstream.
                self.query("id.server.", "TXT", rdclass="CH", timeout=0.2)
                return
            except (TimeoutError, dns.exception.Timeout, OSError):
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start:\n{self.log()}")

    def stop(self) -> int:
        return stop_process(self.process) if self.process is not None else 0

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def query(
        self, name: str, rdtype: str = "A", rdclass: str = "IN", tcp: bool = False, timeout: float = 3.0
    ) -> dns.message.Message:
        message = dns.message.make_query(name, rdtype, rdclass)
        if tcp:
            return dns.query.tcp(message, "127.0.0.1", port=self.port, timeout=timeout)
        return dns.query.udp(message, "127.0.0.1", port=self.port, timeout=timeout)

    def serial(self) -> int | None:
        """The serial of the zone the server has loaded, None before the first transfer."""
        raise NotImplementedError

    def wait_serial(self, serial: int, timeout: float = 10.0) -> float:
        """Poll until the zone is loaded at `serial` (or later): the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            self._check_alive()
            loaded = self.serial()
            if loaded is not None and loaded >= serial:
                return time.monotonic() - start
            time.sleep(0.02)
        raise AssertionError(f"{self.name} did not load {self.zone} serial {serial}:\n{self.log()}")

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else "(no log)"

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")


class UnboundRpzSecondary(_Secondary):
    """unbound -d -c conf with an `rpz:` zone transferred from 127.0.0.1@primary_port."""

    name = "unbound"

    def __init__(self, dir: Path, zone: str, primary_port: int, upstream_port: int):
        super().__init__(dir, zone, primary_port, upstream_port)
        self.conf = dir / "unbound.conf"
        self.conf.write_text(
            UNBOUND_CONF.format(
                dir=dir, port=self.port, zone=self.zone, primary_port=primary_port, upstream_port=upstream_port
            )
        )

    def command(self) -> list[str]:
        return [UNBOUND, "-d", "-c", str(self.conf)]

    def control(self, *args: str) -> str:
        done = subprocess.run(
            [UNBOUND_CONTROL, "-c", str(self.conf), *args], capture_output=True, text=True, timeout=10
        )
        return done.stdout + done.stderr

    def serial(self) -> int | None:
        # One line per auth/rpz zone: "tiktok.rpz.test.\tserial 2"; no line before the first transfer.
        found = re.search(rf"^{re.escape(self.zone)}\s+serial (\d+)", self.control("list_auth_zones"), re.M)
        return int(found.group(1)) if found else None


class BindRpzSecondary(_Secondary):
    """named -g -c conf: a secondary zone used as its response-policy zone; TSIG with key_file."""

    name = "named"

    def __init__(self, dir: Path, zone: str, primary_port: int, upstream_port: int, key_file: Path | None = None):
        super().__init__(dir, zone, primary_port, upstream_port)
        include, key = "", ""
        if key_file is not None:
            found = re.search(r'key\s+"?([^"\s{]+)"?\s*\{', key_file.read_text())
            if found is None:
                raise ValueError(f"{key_file}: no key statement")
            include, key = f'include "{key_file}";\n', f' key "{found.group(1)}"'
        self.conf = dir / "named.conf"
        self.conf.write_text(
            NAMED_CONF.format(
                include=include,
                dir=dir,
                port=self.port,
                zone=self.zone,
                primary_port=primary_port,
                upstream_port=upstream_port,
                key=key,
            )
        )

    def command(self) -> list[str]:
        return [NAMED, "-g", "-c", str(self.conf)]

    def serial(self) -> int | None:
        # BIND rebuilds the policy after the zone version is committed, on another task: the SOA
        # shows the new serial a moment before the policy applies.  Each load or transfer logs
        # "zone Z/IN: transferred serial N", each rebuild "rpz: Z: reload done".
        log = self.log(10**7)
        zone = re.escape(self.zone.rstrip("."))
        loads = len(re.findall(rf"zone {zone}/IN: (?:transferred|loaded) serial", log))
        if loads == 0 or len(re.findall(rf"rpz: {zone}: reload done", log)) < loads:
            return None
        try:
            reply = self.query(self.zone, "SOA", timeout=0.5)
        except (TimeoutError, dns.exception.Timeout, OSError):
            return None
        # Before the first transfer the zone is not loaded: SERVFAIL, no SOA in the answer.
        for rrset in reply.answer:
            for rdata in rrset:
                if isinstance(rdata, dns.rdtypes.ANY.SOA.SOA):
                    return int(rdata.serial)
        return None
