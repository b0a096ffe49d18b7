"""server.user / server.group: dropping root after binding port 53, keeping CAP_NET_ADMIN for egress only.

The decisions run on a recording fake System.  The real drop runs as root (CI does): blockd in
a throwaway network namespace on 127.0.0.1:53 with user = "nobody", then every thread's
/proc/PID/task/TID/status is read (uids, gids, groups, capability sets, no_new_privs) and the
daemon is used as the user: answers, a reload (status file), the query log, netlink rules for
egress, the pidfile removed at exit.

Python may live where "nobody" cannot read it (pyenv under /root, mode 0700); blockd refuses to
start then (a lazily imported module would fail later).  The tests give the daemon a private
mount namespace in which such a directory is a tmpfs of mode 0755 holding bind mounts of just
the parts Python needs: nothing on the host changes.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import pytest

from blockd import privileges
from blockd.config import parse_config
from blockd.privileges import CAP_NET_ADMIN, READ, WRITE, Account, PrivilegeError, drop_to
from tests.daemon import REPO, free_port, stop_process
from tests.netns import blockd_rules, needs_netns, netns_socket, table_routes

NOBODY = Account("nobody", 65534, "nogroup", 65534)

# -- the drop, on a fake System ----------------------------------------------------------------


class FakeSystem:
    def __init__(self, euid: int = 0, threads: int = 1, fail: str | None = None):
        self.euid = euid
        self.threads = threads
        self.fail = fail
        self.calls: list[tuple[str, object]] = []
        self.uid, self.gid, self.permitted, self.effective = 0, 0, (1 << 41) - 1, (1 << 41) - 1
        self.keepcaps = False

    def _call(self, name: str, value: object) -> None:
        self.calls.append((name, value))
        if name == self.fail:
            raise PermissionError(1, "Operation not permitted")

    def geteuid(self) -> int:
        return self.euid

    def thread_count(self) -> int:
        return self.threads

    def set_keepcaps(self, keep: bool) -> None:
        self._call("keepcaps", keep)
        self.keepcaps = keep

    def setgroups(self, gids: list[int]) -> None:
        self._call("setgroups", gids)

    def setresgid(self, gid: int) -> None:
        self._call("setresgid", gid)
        self.gid = gid

    def setresuid(self, uid: int) -> None:
        self._call("setresuid", uid)
        self.uid = uid
        # The kernel's rule: leaving uid 0 empties the effective set, and the permitted set too
        # unless keepcaps is on.
        self.effective = 0
        if not self.keepcaps:
            self.permitted = 0

    def set_capabilities(self, mask: int) -> None:
        self._call("capset", mask)
        if mask & ~self.permitted:
            raise PermissionError(1, "Operation not permitted")
        self.permitted = self.effective = mask

    def set_no_new_privs(self) -> None:
        self._call("no_new_privs", True)

    def credentials(self) -> tuple[set[int], set[int], int, int]:
        return {self.uid}, {self.gid}, self.permitted, self.effective


def test_drop_keeping_cap_net_admin_for_egress() -> None:
    system = FakeSystem()
    assert drop_to(NOBODY, frozenset({CAP_NET_ADMIN}), system)
    assert system.calls == [
        ("keepcaps", True),
        ("setgroups", [65534]),
        ("setresgid", 65534),
        ("setresuid", 65534),
        ("capset", 1 << 12),
        ("keepcaps", False),
        ("no_new_privs", True),
    ]
    assert system.credentials() == ({65534}, {65534}, 0x1000, 0x1000)


def test_drop_without_egress_keeps_no_capability() -> None:
    system = FakeSystem()
    assert drop_to(NOBODY, frozenset(), system)
    assert system.calls[0] == ("keepcaps", False)  # setuid itself then empties every set
    assert ("capset", 0) in system.calls
    assert system.credentials() == ({65534}, {65534}, 0, 0)


def test_already_running_as_the_user_is_nothing_to_do() -> None:
    system = FakeSystem(euid=65534)  # systemd's User=nobody with server.user = "nobody"
    assert not drop_to(NOBODY, frozenset({CAP_NET_ADMIN}), system)
    assert system.calls == []


def test_not_root_and_another_user_is_an_error_naming_the_key() -> None:
    with pytest.raises(PrivilegeError, match=r"^server\.user: blockd runs as uid 1000, not root, and cannot become"):
        drop_to(NOBODY, frozenset(), FakeSystem(euid=1000))


def test_threads_already_running_refuse_the_drop() -> None:
    system = FakeSystem(threads=3)
    with pytest.raises(PrivilegeError, match="3 threads"):
        drop_to(NOBODY, frozenset(), system)
    assert system.calls == []


@pytest.mark.parametrize("step", ["setgroups", "setresgid", "setresuid", "capset"])
def test_a_failed_step_is_an_error_naming_the_key(step: str) -> None:
    with pytest.raises(PrivilegeError, match=r"^server\.user: cannot become nobody:nogroup: Operation not permitted"):
        drop_to(NOBODY, frozenset({CAP_NET_ADMIN}), FakeSystem(fail=step))


def test_credentials_not_as_asked_are_an_error() -> None:
    class Stubborn(FakeSystem):
        def credentials(self) -> tuple[set[int], set[int], int, int]:
            return {0, 65534}, {65534}, 0, 0  # a saved uid still 0 would let the process back to root

    with pytest.raises(PrivilegeError, match="after the drop"):
        drop_to(NOBODY, frozenset(), Stubborn())


def test_resolve_names_the_key_of_an_unknown_account() -> None:
    assert privileges.resolve("nobody", None) == NOBODY
    assert privileges.resolve("nobody", "root").gid == 0
    with pytest.raises(PrivilegeError, match=r"^server\.user: no such user 'no-such-user-blockd'"):
        privileges.resolve("no-such-user-blockd", None)
    with pytest.raises(PrivilegeError, match=r"^server\.group: no such group 'no-such-group-blockd'"):
        privileges.resolve("nobody", "no-such-group-blockd")


def test_capability_sets_from_proc_status() -> None:
    status = "Name:\tpython3\nCapInh:\t0000000000000000\nCapPrm:\t0000000000001000\nCapEff:\t0000000000001000\n"
    assert privileges.capability_sets(status) == {"CapInh": 0, "CapPrm": 0x1000, "CapEff": 0x1000}


def test_kept_capabilities_follow_egress(tmp_path: Path) -> None:
    base = '[upstream]\nservers = ["127.0.0.1:5399"]\n'
    assert privileges.kept_capabilities(parse_config(base, "t.toml", tmp_path)) == frozenset()
    egress = parse_config(base + "[egress]\nenabled = true\n", "t.toml", tmp_path)
    assert privileges.kept_capabilities(egress) == {CAP_NET_ADMIN}


# -- what the user must reach ------------------------------------------------------------------

ACCESS_CONFIG = """
[server]
pidfile = "run/blockd.pid"
state_dir = "state"
[upstream]
servers = ["127.0.0.1:5399"]
[log]
path = "log/queries.jsonl"
[lists.ads]
path = "ads.txt"
[lists.gov-rpz]
zone = "rpz.example"
primaries = ["127.0.0.1:5300"]
[groups.gov]
networks = ["10.0.0.0/8"]
lists = ["ads", "gov-rpz"]
block_answer_prefixes = ["answers.txt"]
[egress]
prefixes = ["prefixes.txt"]
"""


def test_needed_access_lists_every_file_read_and_directory_written(tmp_path: Path) -> None:
    config = parse_config(ACCESS_CONFIG, str(tmp_path / "blockd.toml"), tmp_path)
    checks = privileges.needed_access(config, tmp_path / "blockd.toml", [Path("/usr/lib/python3.11")])
    assert checks == [
        ("the config file", tmp_path / "blockd.toml", READ),
        ("lists.ads.path", tmp_path / "ads.txt", READ),
        ("groups.gov.block_answer_prefixes", tmp_path / "answers.txt", READ),
        ("egress.prefixes", tmp_path / "prefixes.txt", READ),
        ("server.pidfile", tmp_path / "run", WRITE),
        ("log.path", tmp_path / "log", WRITE),
        ("server.state_dir", tmp_path / "state", WRITE),
        ("Python's modules", Path("/usr/lib/python3.11"), READ | os.X_OK),
    ]


def test_a_directory_not_there_yet_is_checked_at_its_nearest_parent(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    checks = [("server.pidfile", tmp_path / "run", WRITE), ("server.state_dir", tmp_path / "a" / "b", WRITE)]
    checks.append(("lists.ads.path", tmp_path / "missing.txt", READ))  # a file must be there
    assert privileges.existing(checks, Path.exists) == [
        ("server.pidfile", tmp_path / "run", WRITE),
        ("server.state_dir", tmp_path, WRITE),
        ("lists.ads.path", tmp_path / "missing.txt", READ),
    ]


def test_access_problems_say_what_and_which_key() -> None:
    checks = [("lists.ads.path", Path("/etc/blockd/ads.txt"), READ), ("server.pidfile", Path("/run/blockd"), WRITE)]
    assert privileges.access_problems(checks, lambda path, mode: False) == [
        "read /etc/blockd/ads.txt (lists.ads.path)",
        "write in /run/blockd (server.pidfile)",
    ]
    assert privileges.access_problems(checks, lambda path, mode: True) == []


def test_module_roots_are_the_search_path_entries_holding_loaded_modules(tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "unused").mkdir()

    class Module:
        __file__ = str(tmp_path / "used" / "pkg" / "__init__.py")

    search = [str(tmp_path / "used"), str(tmp_path / "unused"), "", str(tmp_path / "used"), str(tmp_path / "gone")]
    assert privileges.module_roots([Module(), sys], search) == [tmp_path / "used"]


# -- the real drop (root) ------------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping root needs root (CI runs as root)")


def _traversable_by_others(path: Path) -> bool:
    return bool(path.stat().st_mode & 0o001)


def readable_python_wrapper() -> list[str]:
    """A command prefix giving the daemon a mount namespace in which nobody can reach Python and the
    repository: each directory on the way that others cannot enter becomes a 0755 tmpfs holding
    bind mounts of just the entries needed.  [] when nothing is in the way."""
    needed = {Path(entry).resolve() for entry in sys.path if entry and os.path.isdir(entry)}
    needed |= {REPO, Path(sys.executable).resolve().parent}
    hidden: dict[Path, set[str]] = {}
    for path in needed:
        closed = [parent for parent in [*reversed(path.parents), path] if not _traversable_by_others(parent)]
        if not closed:
            continue
        if len(closed) > 1 or closed[0] == path:
            pytest.skip(f"{path}: closed to other users in a way these tests do not work around")
        hidden.setdefault(closed[0], set()).add(path.relative_to(closed[0]).parts[0])
    if not hidden:
        return []
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is needed to give the daemon a readable Python")
    lines = ["set -e"]
    for parent, children in sorted(hidden.items()):
        stage = "$(mktemp -d)"
        lines.append(f"stage={stage}")
        lines.append(f'mount --bind {shlex.quote(str(parent))} "$stage"')
        lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(parent))}")
        for child in sorted(children):
            target = shlex.quote(str(parent / child))
            lines.append(f'mkdir {target} && mount --bind "$stage"/{shlex.quote(child)} {target}')
        lines.append('umount "$stage" && rmdir "$stage"')
    lines.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines), "sh"]


def dropped_config(directory: Path, egress: bool) -> Path:
    """A config in a directory "nobody" can read, its run/ and log/ directories nobody's."""
    for name in ("run", "log"):
        (directory / name).mkdir()
        os.chown(directory / name, 65534, 65534)
    (directory / "listed.txt").write_text("listed.example\n")
    (directory / "prefixes.txt").write_text("198.51.100.0/24\n")
    text = f"""
[server]
listen = ["127.0.0.1:53"]
pidfile = "{directory}/run/blockd.pid"
user = "nobody"

[upstream]
servers = ["127.0.0.1:5399"]
timeout = 0.5

[metrics]
listen = ""

[log]
queries = "blocked"
path = "{directory}/log/queries.jsonl"

[lists.test]
path = "listed.txt"

[groups.gov]
networks = ["127.0.0.0/8", "10.120.0.0/24"]
lists = ["test"]
"""
    if egress:
        text += '\n[egress]\nenabled = true\nprefixes = ["prefixes.txt"]\n'
    config = directory / "blockd.toml"
    config.write_text(text)
    return config


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A temp directory other users can enter (pytest's tmp_path is under a 0700 directory)."""
    directory = Path(tempfile.mkdtemp(prefix="blockd-t-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


class Dropped:
    def __init__(self, namespace: str, config: Path):
        self.namespace = namespace
        self.config = config
        self.log_path = config.with_suffix(".log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Dropped:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, *readable_python_wrapper(), sys.executable, "-m", "blockd",
                 "run", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO)),
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"blockd exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.query("listed.example", timeout=0.3) == ["0.0.0.0"]:
                    return self
            except (OSError, dns.exception.Timeout):
                time.sleep(0.05)
        raise AssertionError(f"blockd did not start:\n{self.log()}")

    def query(self, name: str, timeout: float = 2.0) -> list[str]:
        sock = netns_socket(self.namespace, socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)  # dnspython waits with select() on a socket it is given
        try:
            answer = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=53, timeout=timeout, sock=sock)
        finally:
            sock.close()
        return [item.to_text() for rrset in answer.answer for item in rrset]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def threads(self) -> dict[int, dict[str, str]]:
        """Every thread's /proc status, as {tid: {field: value}}."""
        assert self.process is not None
        result = {}
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            lines = (task / "status").read_text().splitlines()
            result[int(task.name)] = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
        return result

    def stop(self) -> int:
        return stop_process(self.process) if self.process is not None else 0


@pytest.fixture
def dropped(make_ns: Callable[[], str], open_dir: Path) -> Iterator[Callable[[bool], Dropped]]:
    started: list[Dropped] = []

    def start(egress: bool) -> Dropped:
        daemon = Dropped(make_ns(), dropped_config(open_dir, egress))
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()


def assert_every_thread(daemon: Dropped, capabilities: int) -> None:
    threads = daemon.threads()
    assert len(threads) >= 2  # the query-log writer started after the drop, and inherited it
    for tid, status in threads.items():
        assert status["Uid"].split() == ["65534"] * 4, (tid, status["Uid"])
        assert status["Gid"].split() == ["65534"] * 4, (tid, status["Gid"])
        assert status["Groups"].split() == ["65534"], (tid, status["Groups"])
        for name in ("CapPrm", "CapEff"):
            assert int(status[name], 16) == capabilities, (tid, name, status[name])
        assert int(status["CapInh"], 16) == 0 and int(status["CapAmb"], 16) == 0
        assert status["NoNewPrivs"] == "1"


@needs_root
@needs_netns
@pytest.mark.timeout(120)
def test_started_as_root_it_serves_port_53_as_nobody_without_capabilities(
    dropped: Callable[[bool], Dropped], open_dir: Path
) -> None:
    daemon = dropped(False)
    assert "now running as nobody:nogroup without capabilities" in daemon.log()
    assert_every_thread(daemon, 0)
    # What the user does from now on works: the pidfile and reload status, a reload, the query log.
    pidfile = open_dir / "run" / "blockd.pid"
    assert pidfile.stat().st_uid == 65534
    (open_dir / "listed.txt").write_text("listed.example\nnew.example\n")
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while daemon.query("new.example") != ["0.0.0.0"]:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.1)
    assert '"result": "success"' in (open_dir / "run" / "blockd.reload.json").read_text()
    assert daemon.stop() == 0
    assert not pidfile.exists()  # removed by nobody at exit
    queries = open_dir / "log" / "queries.jsonl"
    assert queries.stat().st_uid == 65534 and "new.example" in queries.read_text()


@needs_root
@needs_netns
@pytest.mark.timeout(120)
def test_with_egress_it_keeps_cap_net_admin_alone_and_installs_its_routes(dropped: Callable[[bool], Dropped]) -> None:
    daemon = dropped(True)
    assert "now running as nobody:nogroup with CAP_NET_ADMIN (egress)" in daemon.log()
    deadline = time.monotonic() + 10
    while table_routes(daemon.namespace) != ["prohibit 198.51.100.0/24 proto 120"]:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.1)
    assert "11200: from 10.120.0.0/24 lookup 1120 proto 120" in blockd_rules(daemon.namespace)
    assert_every_thread(daemon, 1 << CAP_NET_ADMIN)  # the netlink worker too: it did the routing


@needs_root
@pytest.mark.timeout(60)
def test_a_list_the_user_cannot_read_refuses_the_start_naming_the_key(open_dir: Path) -> None:
    config = dropped_config(open_dir, egress=False)
    config.write_text(config.read_text().replace('["127.0.0.1:53"]', f'["127.0.0.1:{free_port()}"]'))
    (open_dir / "listed.txt").chmod(0o600)
    result = subprocess.run(
        [*readable_python_wrapper(), sys.executable, "-m", "blockd", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=30, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert result.returncode == 1
    assert f"blockd: server.user: nobody cannot read {open_dir / 'listed.txt'} (lists.test.path)" in result.stderr
