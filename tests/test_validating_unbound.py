"""blockd behind a validating resolver (issue 11), with real servers from Debian on loopback.

Knot serves `gov.test.`, signed by Knot itself (ECDSA keys made at start), with an unsigned
delegation `tiktok.gov.test.` (insecure: no DS) and a name `shop.gov.test.` inside the signed
zone.  blockd forwards to Knot and lists both.  A validating Unbound forwards "." to blockd,
with the zone's KSK as its only trust anchor.  What must hold:
- a blocked name under the insecure delegation gets blockd's sinkhole through the validator
  (blockd forwards the DS question, so Unbound proves the zone insecure), not SERVFAIL;
- a forwarded name in the signed zone validates (AD);
- a blocked name inside the signed zone cannot validate: SERVFAIL, until the lines printed by
  `blockd export --format unbound-insecure` are in Unbound's config: then the sinkhole;
- delv (BIND's validating stub) asking blockd directly agrees: fully validated, unsigned answer
  (insecure, accepted), insecurity proof failed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.daemon import REPO, Daemon, free_port
from tests.knot import KNOT_SERVER, KNOTD, needs_knot
from tests.rpz_secondaries import UNBOUND_SERVER

UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"
DELV = shutil.which("delv")
needs_unbound = pytest.mark.skipif(
    not os.access(UNBOUND, os.X_OK), reason="unbound is not installed (apt-get install unbound)"
)

KNOT_CONF = (
    KNOT_SERVER
    + """\
    kasp-db: "{dir}/keys"
policy:
  - id: test
    algorithm: ecdsap256sha256
    nsec3: off
zone:
  - domain: gov.test.
    storage: "{dir}"
    file: "gov.test.zone"
    dnssec-signing: on
    dnssec-policy: test
    zonefile-sync: -1
    journal-content: none
"""
)

ZONE = """\
$ORIGIN gov.test.
$TTL 300
@       SOA ns.gov.test. hostmaster.gov.test. 1 3600 600 86400 300
@       NS  ns.gov.test.
ns      A   127.0.0.1
www     A   192.0.2.10
shop    A   192.0.2.11
tiktok  NS  ns.tiktok.gov.test.
ns.tiktok A 127.0.0.1
"""

BLOCKD_CONF = """\
[server]
listen = ["127.0.0.1:{port}"]
[upstream]
servers = ["127.0.0.1:{knot_port}"]
timeout = 2.0
[metrics]
listen = ""
[log]
queries = "none"
[lists.test]
path = "{dir}/test.txt"
[groups.everyone]
networks = ["127.0.0.0/8"]
lists = ["test"]
action = "sinkhole"
"""

UNBOUND_CONF = UNBOUND_SERVER + """\
    logfile: "{dir}/unbound.log"
    module-config: "validator iterator"
    trust-anchor: "{anchor}"
    val-log-level: 2
{extra}
forward-zone:
    name: "."
    forward-addr: 127.0.0.1@{blockd_port}
"""


class Process:
    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None):
        self.log_path = log
        self.handle = open(log, "ab")
        self.popen = subprocess.Popen(command, stdout=self.handle, stderr=subprocess.STDOUT, env=env)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        self.handle.close()


def query(port: int, name: str, rdtype: str = "A", timeout: float = 5.0) -> dns.message.Message:
    message = dns.message.make_query(name, rdtype, want_dnssec=True)
    return dns.query.udp(message, "127.0.0.1", port=port, timeout=timeout)


def wait_for(check, what: str, seconds: float = 20.0) -> object:
    deadline = time.monotonic() + seconds
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        time.sleep(0.1)
    pytest.fail(f"{what}: not within {seconds} s (last: {last!r})")


def signed_ksk(knot_port: int) -> str:
    """The zone's KSK as an Unbound trust-anchor string, once Knot serves the signed zone."""
    reply = query(knot_port, "gov.test.", "DNSKEY")
    for rrset in reply.answer:
        if rrset.rdtype == dns.rdatatype.DNSKEY:
            for key in rrset:
                if key.flags == 257:
                    return f"gov.test. DNSKEY {key.to_text()}"
    return ""


def delv(delv_path: str, directory: Path, anchor: str, port: int) -> dict[str, str]:
    """What delv says of three names with the zone's KSK as its only trust anchor."""
    _owner, _type, flags, protocol, algorithm, key = anchor.split(None, 5)
    anchors = directory / "delv-anchors.conf"
    anchors.write_text(
        f'trust-anchors {{\n  gov.test. static-key {flags} {protocol} {algorithm} "{key.replace(" ", "")}";\n}};\n'
    )
    said = {}
    for name in ("www.gov.test", "www.tiktok.gov.test", "shop.gov.test"):
        command = [delv_path, "@127.0.0.1", "-p", str(port), "-a", str(anchors), "+root=gov.test", name, "A"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        text = done.stdout + done.stderr
        said[name] = next(
            (line for line in ("; fully validated", "; unsigned answer", "insecurity proof failed") if line in text),
            text,
        )
    return said


@needs_knot
@needs_unbound
def test_blocked_names_behind_a_validating_unbound(tmp_path: Path) -> None:
    knot_dir, unbound_dir = tmp_path / "knot", tmp_path / "unbound"
    for directory in (knot_dir / "run", knot_dir / "storage", knot_dir / "keys", unbound_dir):
        directory.mkdir(parents=True)
    knot_port, blockd_port, unbound_port = free_port(), free_port(), free_port()
    (knot_dir / "gov.test.zone").write_text(ZONE)
    (knot_dir / "knot.conf").write_text(KNOT_CONF.format(dir=knot_dir, port=knot_port))
    (tmp_path / "test.txt").write_text("tiktok.gov.test\nshop.gov.test\n")
    blockd_conf = tmp_path / "blockd.toml"
    blockd_conf.write_text(BLOCKD_CONF.format(port=blockd_port, knot_port=knot_port, dir=tmp_path))
    started: list[Process] = []
    blockd = Daemon(blockd_conf, blockd_port)
    try:
        started.append(Process([KNOTD, "-c", str(knot_dir / "knot.conf")], knot_dir / "knotd.out"))
        anchor = str(wait_for(lambda: signed_ksk(knot_port), "Knot serving the signed zone"))
        blockd.start()

        def start_unbound(extra: str) -> Process:
            conf = unbound_dir / "unbound.conf"
            conf.write_text(
                UNBOUND_CONF.format(
                    port=unbound_port, dir=unbound_dir, anchor=anchor, blockd_port=blockd_port, extra=extra
                )
            )
            process = Process([UNBOUND, "-c", str(conf)], unbound_dir / "unbound.out")
            started.append(process)
            wait_for(lambda: query(unbound_port, "www.gov.test.", timeout=1).rcode() is not None, "unbound up")
            return process

        unbound = start_unbound("")
        # A forwarded name in the signed zone validates.
        www = query(unbound_port, "www.gov.test.")
        assert www.rcode() == dns.rcode.NOERROR and www.flags & dns.flags.AD, www
        # A blocked name under the insecure delegation: blockd's sinkhole, accepted as insecure.
        blocked = query(unbound_port, "www.tiktok.gov.test.")
        assert blocked.rcode() == dns.rcode.NOERROR, (blocked, (unbound_dir / "unbound.log").read_text()[-3000:])
        assert [r.to_text() for rrset in blocked.answer for r in rrset] == ["0.0.0.0"]
        assert not blocked.flags & dns.flags.AD
        # The DS question of the blocked zone went to Knot, answered with its signed proof.
        ds = query(blockd_port, "tiktok.gov.test.", "DS")
        assert ds.rcode() == dns.rcode.NOERROR and not ds.answer
        assert any(rrset.rdtype == dns.rdatatype.NSEC for rrset in ds.authority), ds
        # A blocked name inside the signed zone cannot validate ...
        assert query(unbound_port, "shop.gov.test.").rcode() == dns.rcode.SERVFAIL
        if DELV is not None:  # ... and delv (BIND's validating stub, asking blockd itself) agrees
            assert delv(DELV, tmp_path, anchor, blockd_port) == {
                "www.gov.test": "; fully validated",
                "www.tiktok.gov.test": "; unsigned answer",
                "shop.gov.test": "insecurity proof failed",
            }
        unbound.stop()
        # ... until blockd's export is in Unbound's config.
        exported = subprocess.run(
            [sys.executable, "-m", "blockd", "export", "--format", "unbound-insecure", "--config", str(blockd_conf)],
            capture_output=True,
            text=True,
            timeout=30,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            check=True,
        ).stdout
        assert '    domain-insecure: "shop.gov.test"' in exported.splitlines()
        lines = [line for line in exported.splitlines() if line.startswith("    domain-insecure:")]
        start_unbound("\n".join(lines))
        shop = query(unbound_port, "shop.gov.test.")
        assert shop.rcode() == dns.rcode.NOERROR and [r.to_text() for rrset in shop.answer for r in rrset] == [
            "0.0.0.0"
        ]
        assert query(unbound_port, "www.gov.test.").flags & dns.flags.AD  # the rest still validates
    finally:
        blockd.stop()
        for process in reversed(started):
            process.stop()
    assert "Traceback" not in blockd.log()
