"""The processes and tools of a run: finding and installing the tools, the blockd snapshot, starting and
stopping every process by its pid, free ports, and reading CPU time and RSS from /proc."""

from __future__ import annotations

import ctypes
import hashlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common import REPO, BenchError, log

SERVER_CPU = "0"  # every server under test: taskset -c 0
CLIENT_CPU = "1"  # dnsperf and the fake upstream
TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
CLK_TCK = os.sysconf("SC_CLK_TCK")


def which(name: str) -> str | None:
    return shutil.which(name, path=TOOL_PATH)


# --------------------------------------------------------------------------------------------
# Tools


def ensure_tools(allow_install: bool) -> dict[str, str]:
    wanted = {
        "dnsperf": "dnsperf",
        "dnsmasq": "dnsmasq",
        "unbound": "unbound",
        "unbound-checkconf": "unbound",
        "taskset": "util-linux",
    }
    missing = sorted({pkg for exe, pkg in wanted.items() if which(exe) is None})
    if missing and allow_install and os.geteuid() == 0 and which("apt-get"):
        _apt_install(missing)
    paths = {exe: which(exe) for exe in wanted}
    still = sorted({wanted[exe] for exe, path in paths.items() if path is None})
    if still:
        print(
            "bench: missing tools: " + ", ".join(still) + "\n"
            "install them (Debian/Ubuntu) with:\n"
            "  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y dnsperf dnsmasq unbound\n"
            "  sudo systemctl disable --now dnsmasq unbound   # the benchmark starts its own instances\n"
            "then run this again (or run it as root and it installs them itself).",
            file=sys.stderr,
        )
        sys.exit(2)
    return {exe: path for exe, path in paths.items() if path is not None}


def ensure_knot(allow_install: bool) -> dict[str, str]:
    """knotd and knotc (Debian's `knot`), for the RPZ comparison's primary; exits 2 with instructions."""
    return _ensure_package(
        ("knotd", "knotc"),
        "knot",
        allow_install,
        "--rpz needs Knot DNS (knotd, knotc) as the primary",
        "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y knot && sudo systemctl disable --now knot",
    )


def ensure_fstrm(allow_install: bool) -> dict[str, str]:
    """fstrm_capture (Debian's `fstrm-bin`), the dnstap collector of --dnstap; exits 2 with instructions."""
    return _ensure_package(
        ("fstrm_capture",),
        "fstrm-bin",
        allow_install,
        "--dnstap needs fstrm_capture as the dnstap collector",
        "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y fstrm-bin",
    )


def _ensure_package(
    wanted: tuple[str, ...], package: str, allow_install: bool, why: str, install: str
) -> dict[str, str]:
    """The `wanted` executables of one Debian package: installed with apt-get when missing and allowed (as
    root); otherwise missing ones end the run with status 2 and the `install` command."""
    if any(which(exe) is None for exe in wanted) and allow_install and os.geteuid() == 0 and which("apt-get"):
        _apt_install([package])
    paths = {exe: which(exe) for exe in wanted}
    if any(path is None for path in paths.values()):
        print(f"bench: {why}; install it (Debian/Ubuntu) with:\n  {install}", file=sys.stderr)
        sys.exit(2)
    return {exe: path for exe, path in paths.items() if path is not None}


def _apt_install(missing: list[str]) -> None:
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", *missing]
    if subprocess.run(command, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env)
        subprocess.run(command, env=env)
    # Debian's postinst may start the system services; the benchmark wants nothing on :53.
    for service in ("dnsmasq", "unbound", "knot"):
        if service in missing:
            subprocess.run(["systemctl", "stop", service], capture_output=True)
            subprocess.run(["systemctl", "disable", service], capture_output=True)
            subprocess.run(["invoke-rc.d", service, "stop"], capture_output=True)


def ensure_py_spy(allow_install: bool) -> str | None:
    path = which("py-spy")
    if path is None and allow_install:
        log("installing py-spy with pip")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"])
        path = which("py-spy") or which(str(Path(sys.executable).parent / "py-spy"))
    if path is None:
        print("bench: py-spy not found; install it with `pip install py-spy` (profile skipped)", file=sys.stderr)
    return path


# --------------------------------------------------------------------------------------------
# The blockd snapshot


@dataclass(frozen=True)
class Snapshot:
    root: Path  # holds blockd/ and domains/; every blockd process of the run imports from here
    fingerprint: str  # what code that is, for the report


def snapshot_blockd(tmp: Path, lists: tuple[str, ...]) -> Snapshot:
    """Copy blockd/ and the shipped `lists` once, so every process of the run uses the same code and lists
    even while people edit the working tree; this process and its children import blockd from the copy."""
    root = tmp / "src"
    shutil.copytree(REPO / "blockd", root / "blockd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "domains").mkdir()
    for name in lists:
        shutil.copy2(REPO / "domains" / f"{name}.txt", root / "domains" / f"{name}.txt")
    sys.path.insert(0, str(root))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    digest = hashlib.sha256()
    for path in sorted([*(root / "blockd").glob("*.py"), *(root / "blockd").glob("*.c")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    compiled = any((root / "blockd").glob("_dnstap_fast*.so"))
    probe = subprocess.run(
        [sys.executable, "-c", "import blockd; print(blockd.__file__)"], capture_output=True, text=True, cwd=root
    )
    if not probe.stdout.strip().startswith(str(root)):
        raise BenchError(f"blockd imports from {probe.stdout.strip() or probe.stderr.strip()}, not the snapshot")
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "blockd"], capture_output=True, text=True
    )
    fingerprint = (
        f"git {git.stdout.strip() or '?'}"
        + (" + uncommitted changes in blockd/" if dirty.stdout.strip() else "")
        + f", copied at the start of the run (sha256 of blockd/*.py and *.c {digest.hexdigest()[:12]}; the C "
        + ("dnstap loop built" if compiled else "dnstap loop NOT built: its Python fallback ran")
        + "); every blockd process of the run used that copy"
    )
    return Snapshot(root, fingerprint)


# --------------------------------------------------------------------------------------------
# Processes


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the child if this script dies (even by SIGKILL)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Procs:
    """Every process this script starts; stop_all() ends each one by its pid."""

    def __init__(self) -> None:
        self.running: list[Proc] = []

    def start(self, name: str, command: list[str], log_path: Path, cwd: Path | None = None) -> Proc:
        handle = open(log_path, "wb")
        try:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,  # Ctrl-C reaches this script only; it stops them in order
                preexec_fn=die_with_parent,
                env={**os.environ, "PATH": TOOL_PATH},
            )
        finally:
            handle.close()
        proc = Proc(name, popen, log_path)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        if proc.popen.poll() is None:
            try:
                proc.popen.send_signal(signal.SIGTERM)
                proc.popen.wait(grace)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)
            except ProcessLookupError:
                pass
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            try:
                self.stop(proc)
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                print(f"bench: could not stop {proc.name} (pid {proc.pid}): {exc}", file=sys.stderr)


def free_port() -> int:
    """A loopback port free for both UDP and TCP."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise BenchError("no free loopback port")


# --------------------------------------------------------------------------------------------
# CPU time and memory, from /proc


def cpu_ticks(pid: int, user_only: bool = False) -> int:
    """utime + stime (or utime alone) of a process, all its threads, in clock ticks."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + (0 if user_only else int(fields[12]))


def cpu_user(cpu: int) -> tuple[int, int]:
    """(user + nice, all) clock ticks of one CPU, from /proc/stat."""
    with open("/proc/stat") as handle:
        for line in handle:
            if line.startswith(f"cpu{cpu} "):
                values = [int(v) for v in line.split()[1:9]]
                return values[0] + values[1], sum(values)
    return 0, 0


def others_on(cpu: int, first: tuple[int, int], ours: int) -> float:
    """The share of `cpu` since `first` (cpu_user(cpu) then) that processes outside the benchmark spent in user
    mode: its user ticks minus `ours` (the user ticks of the benchmark's process pinned to it)."""
    user, total = (a - b for a, b in zip(cpu_user(cpu), first, strict=True))
    return max(0.0, (user - ours) / total) if total else 0.0


def children_user_ticks() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime * CLK_TCK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def hwm_mb(pid: int) -> float:
    """Peak resident set size so far (VmHWM)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def settle(pid: int, limit: float = 60.0) -> float:
    """Wait until a process has used no CPU for a second (at most `limit` s); returns the seconds waited."""
    started = time.monotonic()
    last, idle_since = cpu_ticks(pid), time.monotonic()
    while time.monotonic() - started < limit:
        time.sleep(0.25)
        now = cpu_ticks(pid)
        if now > last + 1:
            last, idle_since = now, time.monotonic()
        elif time.monotonic() - idle_since >= 1.0:
            break
    return time.monotonic() - started


class ConnectionWatch:
    """When the first new TCP connection to 127.0.0.1:`port` appeared (polling /proc/net/tcp every 5 ms), to split
    a secondary's time to its first answer into "until it connected to the primary" and "the transfer".
    Connections that existed before the watch started (TIME_WAIT of an earlier transfer) are not new."""

    def __init__(self, port: int):
        self.remote = f"0100007F:{port:04X}"
        self.first: float | None = None  # time.monotonic()
        self._before = self._connections()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"tcp-watch-{port}", daemon=True)
        self._thread.start()

    def _connections(self) -> set[str]:
        """The local address:port of every TCP socket connected (or connecting) to the port."""
        try:
            with open("/proc/net/tcp") as handle:
                next(handle)
                fields = [line.split() for line in handle]
        except (OSError, StopIteration):
            return set()
        return {f[1] for f in fields if len(f) > 3 and f[2] == self.remote and f[3] not in ("06", "07")}

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self._connections() - self._before:
                self.first = time.monotonic()
                return
            self._stop.wait(0.005)

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join(2)
        return self.first
