"""A real Knot DNS primary for the tests: knotd from Debian, its own config and zone in a temp dir.

Started by the test, on loopback, stopped by PID.  The tests skip (with the reason) where knotd and
knotc are not installed; .ci/run installs them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# The start of every test's knot.conf: one worker each, a log, storage and a control socket in the
# test's dir (format with dir= and port=; database: and control: may be extended by the caller).
KNOT_SERVER = """\
server:
    rundir: "{dir}/run"
    listen: 127.0.0.1@{port}
    background-workers: 1
    tcp-workers: 1
    udp-workers: 1
log:
  - target: "{dir}/knot.log"
    any: info
control:
    listen: "{dir}/run/knot.sock"
database:
    storage: "{dir}/storage"
"""

KNOTD = shutil.which("knotd") or "/usr/sbin/knotd"
KNOTC = shutil.which("knotc") or "/usr/sbin/knotc"
needs_knot = pytest.mark.skipif(
    not (os.access(KNOTD, os.X_OK) and os.access(KNOTC, os.X_OK)),
    reason="Knot DNS is not installed (apt-get install knot): knotd and knotc are needed",
)


@dataclass
class Knot:
    """knotd -c conf for one zone; write_zone() formats `zone_template` with serial= and extra=."""

    dir: Path
    port: int
    conf: Path
    zone: str
    zone_template: str
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [KNOTD, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)

    def knotc(self, *args: str) -> str:
        done = subprocess.run([KNOTC, "-c", str(self.conf), *args], capture_output=True, text=True, timeout=20)
        return done.stdout + done.stderr

    def write_zone(self, serial: int, extra: str = "") -> None:
        (self.dir / f"{self.zone}.zone").write_text(self.zone_template.format(serial=serial, extra=extra))

    def wait_for_serial(self, serial: int) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"knotd exited with {self.process.returncode}: {self.log()}")
            if f"serial: {serial}" in self.knotc("zone-status", f"{self.zone}."):
                return
            time.sleep(0.05)
        pytest.fail(f"knotd did not load serial {serial}: {self.log()}")

    def log(self) -> str:
        path = self.dir / "knot.log"
        return path.read_text()[-3000:] if path.exists() else "(no log)"
