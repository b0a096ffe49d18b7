"""systemd notifications: blockd.sd_notify, the daemon's READY/RELOADING/STOPPING/WATCHDOG, the unit.

The real daemon runs with NOTIFY_SOCKET naming a unix datagram socket the test binds in tmp_path
(with SO_PASSCRED, so each message carries the sender's pid, which NotifyAccess=main checks);
the unit tests use a fake socket, and the daemon's reload bookkeeping runs in-process on a
synchronous reloader.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import pytest
from twisted.internet import defer, task
from twisted.logger import LogLevel, globalLogPublisher

from blockd import sd_notify
from blockd.config import ConfigError, parse_config
from blockd.daemon import Daemon as InProcessDaemon
from blockd.daemon import reload_status
from blockd.policy import PolicyError, build_policy
from blockd.sd_notify import Notifier, message, socket_address, watchdog_interval
from tests.daemon import GOV, REPO, Daemon

# -- blockd.sd_notify ------------------------------------------------------------------------


def test_message_is_key_value_lines_and_status_stays_one_line() -> None:
    assert message(READY=1, STATUS="serving") == b"READY=1\nSTATUS=serving\n"
    assert message(STATUS="refused:\nline 2\tand more") == b"STATUS=refused: line 2 and more\n"
    long = message(STATUS="x" * 1000)
    assert len(long) == len("STATUS=\n") + sd_notify.STATUS_LIMIT and long.endswith(b"...\n")


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@blockd/notify", b"\0blockd/notify"),
        ("", None),
        (None, None),
        ("relative/path", None),
        ("vsock:2:1234", None),
    ],
)
def test_socket_address(value: str | None, address: str | bytes | None) -> None:
    assert socket_address(value) == address


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4242"}, 0.5),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only(
    environ: dict[str, str], interval: float | None
) -> None:
    assert watchdog_interval(environ, pid=4242) == interval


def test_monotonic_usec_is_clock_monotonic_in_microseconds() -> None:
    before = time.monotonic_ns() // 1000
    assert before <= sd_notify.monotonic_usec() <= time.monotonic_ns() // 1000
    assert sd_notify.monotonic_usec(lambda: 1_234_567_891) == 1_234_567


class FakeSocket:
    def __init__(self, fail: OSError | None = None):
        self.sent: list[tuple[bytes, str | bytes]] = []
        self.fail = fail
        self.closed = False

    def sendto(self, data: bytes, address: str | bytes, /) -> int:
        if self.fail is not None:
            raise self.fail
        self.sent.append((data, address))
        return len(data)

    def close(self) -> None:
        self.closed = True


def test_notifier_without_notify_socket_sends_nothing() -> None:
    made: list[FakeSocket] = []
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    notifier.make_socket = lambda: made.append(FakeSocket()) or made[-1]
    assert not notifier.ready("serving")
    notifier.watchdog()
    assert made == []


def test_notifier_sends_each_message_as_one_datagram() -> None:
    fake = FakeSocket()
    notifier = Notifier("/run/systemd/notify", make_socket=lambda: fake)
    assert notifier.ready("serving")
    assert notifier.reloading()
    notifier.watchdog()
    assert notifier.stopping()
    notifier.close()
    sent = [data.decode() for data, address in fake.sent if address == "/run/systemd/notify"]
    assert sent[0] == "READY=1\nSTATUS=serving\n"
    assert sent[1].startswith("RELOADING=1\nMONOTONIC_USEC=") and "STATUS=reloading" in sent[1]
    assert sent[2:] == ["WATCHDOG=1\n", "STOPPING=1\nSTATUS=stopping\n"]
    assert fake.closed


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn:
            seen.append(str(event.get("log_format")))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_a_failing_socket_never_raises_and_is_logged_once(warnings: list[str]) -> None:
    fake = FakeSocket(fail=ConnectionRefusedError(111, "Connection refused"))
    notifier = Notifier("@gone", make_socket=lambda: fake)
    for _ in range(5):
        assert not notifier.ready("serving")
        notifier.watchdog()  # what a LoopingCall runs: must not raise, or the pings stop for good
    assert notifier.failures == 10
    assert len([w for w in warnings if "cannot notify systemd" in w]) == 1
    fake.fail = None
    assert notifier.ready("serving")  # a socket that comes back is used again


def test_a_socket_that_cannot_be_made_is_a_failure_too(warnings: list[str]) -> None:
    def refuse() -> FakeSocket:
        raise OSError(24, "Too many open files")

    notifier = Notifier("/run/systemd/notify", make_socket=refuse)
    assert not notifier.ready("serving")
    assert notifier.failures == 1 and len(warnings) == 1


def test_abstract_socket_names_reach_a_real_abstract_socket() -> None:
    name = f"blockd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(b"\0" + name.encode())
        receiver.settimeout(2)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready("serving")
        notifier.close()
        assert receiver.recv(4096) == b"READY=1\nSTATUS=serving\n"


# -- the daemon's bookkeeping, in-process ------------------------------------------------------

IN_PROCESS = """
[server]
listen = ["127.0.0.1:5353"]
[upstream]
servers = ["127.0.0.1:5399"]
[metrics]
listen = ""
[log]
queries = "none"
"""


class RecordingNotifier(Notifier):
    def __init__(self) -> None:
        super().__init__("/nonexistent")
        self.messages: list[dict[str, str]] = []

    def send(self, **fields: object) -> bool:
        self.messages.append({key: str(value) for key, value in fields.items()})
        return True


@dataclass
class Builds:
    """The reloader's worker thread, by hand: each build waits until the test fires it."""

    pending: list[defer.Deferred[Any]] = field(default_factory=list)

    def __call__(self, build: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        waiting: defer.Deferred[Any] = defer.Deferred()
        self.pending.append(waiting)
        return waiting

    def succeed(self, daemon: InProcessDaemon) -> None:
        config = daemon.config
        self.pending.pop(0).callback((config, build_policy(config)))

    def refuse(self, errors: list[str]) -> None:
        self.pending.pop(0).errback(PolicyError(errors))


def in_process_daemon(tmp_path: Path) -> tuple[InProcessDaemon, RecordingNotifier, Builds]:
    config = parse_config(IN_PROCESS, "test.toml", tmp_path)
    notifier = RecordingNotifier()
    daemon = InProcessDaemon(task.Clock(), config, build_policy(config), notifier=notifier)
    builds = Builds()
    daemon.reloader.run_in_thread = builds
    return daemon, notifier, builds


def test_a_reload_is_reloading_then_ready_with_its_outcome(tmp_path: Path) -> None:
    daemon, notifier, builds = in_process_daemon(tmp_path)
    daemon.sighup()
    assert notifier.messages[-1]["RELOADING"] == "1" and int(notifier.messages[-1]["MONOTONIC_USEC"]) > 0
    builds.succeed(daemon)
    assert notifier.messages[-1] == {"READY": "1", "STATUS": "serving: reload succeeded"}
    daemon.sighup()
    builds.refuse(["lists/x.txt:3: 'bad..name' is not a valid name", "lists/x.txt:9: another"])
    assert notifier.messages[-2]["RELOADING"] == "1"
    first = "lists/x.txt:3: 'bad..name' is not a valid name"
    assert notifier.messages[-1] == {
        "READY": "1",
        "STATUS": f"serving the previous policy: reload refused (2 errors): {first}",
    }


def test_sighups_during_a_build_stay_reloading_until_the_last_build(tmp_path: Path) -> None:
    daemon, notifier, builds = in_process_daemon(tmp_path)
    daemon.sighup()
    daemon.sighup()  # while the first build runs: one more build follows it
    assert [m.get("RELOADING") for m in notifier.messages] == ["1", "1"]
    builds.succeed(daemon)
    assert "READY" not in notifier.messages[-1]  # the second build has started: still reloading
    assert len(builds.pending) == 1
    builds.refuse(["blockd.toml: groups.gov.colour: unknown key"])
    assert notifier.messages[-1]["READY"] == "1"
    assert notifier.messages[-1]["STATUS"].endswith("reload refused: blockd.toml: groups.gov.colour: unknown key")


def test_reload_status() -> None:
    assert reload_status(True, []) == "serving: reload succeeded"
    assert reload_status(False, []) == "serving the previous policy: reload refused"
    assert reload_status(False, ["a:1: x"]) == "serving the previous policy: reload refused: a:1: x"


def test_config_keys_user_and_group_must_exist(tmp_path: Path) -> None:
    config = parse_config(IN_PROCESS.replace("[upstream]", 'user = "nobody"\n[upstream]'), "t.toml", tmp_path)
    assert (config.server.user, config.server.group) == ("nobody", None)
    text = IN_PROCESS.replace("[upstream]", 'user = "no-such-user-blockd"\ngroup = "no-such-group-blockd"\n[upstream]')
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "t.toml", tmp_path)
    assert raised.value.errors == [
        "t.toml: server.user: no such user 'no-such-user-blockd'",
        "t.toml: server.group: no such group 'no-such-group-blockd'",
    ]
    with pytest.raises(ConfigError, match=r"server\.group: is the group of server\.user: set user too"):
        parse_config(IN_PROCESS.replace("[upstream]", 'group = "nogroup"\n[upstream]'), "t.toml", tmp_path)


# -- the real daemon -----------------------------------------------------------------------------


@dataclass
class Notification:
    fields: dict[str, str]
    pid: int | None
    at: float  # time.monotonic() when received


class NotifySocket:
    """What systemd's notify socket is to blockd: a unix datagram socket, credentials passed."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        os.chmod(path, 0o777)  # as /run/systemd/notify: a daemon that dropped root can still send
        self.seen: list[Notification] = []

    def next(self, timeout: float) -> Notification | None:
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("iII")))
        except TimeoutError:
            return None
        pid = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[: struct.calcsize("iII")])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        notification = Notification(fields, pid, time.monotonic())
        self.seen.append(notification)
        return notification

    def wait_for(self, key: str, timeout: float = 20.0, process: subprocess.Popen[bytes] | None = None) -> Notification:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if process is not None and process.poll() is not None:
                raise AssertionError(f"blockd exited with {process.returncode} before {key}")
            got = self.next(min(left, 0.5))
            if got is not None and key in got.fields:
                return got
        raise AssertionError(f"no {key} within {timeout} s; seen {[n.fields for n in self.seen]}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(tmp_path / "notify.sock")
    yield receiver
    receiver.close()


class NotifiedDaemon(Daemon):
    """blockd run with NOTIFY_SOCKET set; start() returns at READY=1, not at the first answer."""

    def __init__(self, config_path: Path, port: int, notify: NotifySocket, env: dict[str, str] | None = None):
        super().__init__(config_path, port)
        self.notify = notify
        self.env = {"NOTIFY_SOCKET": str(notify.path), **(env or {})}
        self.ready: Notification | None = None

    def start(self, timeout: float = 20.0) -> NotifiedDaemon:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "blockd", "run", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(REPO), **self.env),
        )
        try:
            self.ready = self.notify.wait_for("READY", timeout, self.process)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log()}") from None
        return self


@pytest.fixture
def notified(make_daemon: Callable[..., Daemon], notify: NotifySocket) -> Iterator[Callable[..., NotifiedDaemon]]:
    started: list[NotifiedDaemon] = []

    def make(env: dict[str, str] | None = None, **kwargs: Any) -> NotifiedDaemon:
        template = make_daemon(start=False, **kwargs)  # the config, its port and the fake upstream
        daemon = NotifiedDaemon(template.config_path, template.port, notify, env)
        started.append(daemon)
        return daemon.start()

    yield make
    for daemon in started:
        daemon.stop()


def addresses(answer: dns.message.Message) -> list[str]:
    return [item.to_text() for rrset in answer.answer for item in rrset]


pytestmark = pytest.mark.timeout(120)


def test_ready_arrives_once_the_daemon_answers_with_the_first_policy(
    notified: Callable[..., NotifiedDaemon], notify: NotifySocket
) -> None:
    daemon = notified()
    assert daemon.process is not None and daemon.ready is not None
    assert daemon.ready.pid == daemon.process.pid  # from the main process: NotifyAccess=main takes it
    assert daemon.ready.fields["STATUS"] == f"serving on 127.0.0.1:{daemon.port}"
    # The very first query after READY=1 is answered (one try, no retry), by the policy.
    assert addresses(daemon.query("www.tiktok.com", source=GOV, timeout=1.0)) == ["0.0.0.0"]
    assert [n.fields for n in notify.seen].count(daemon.ready.fields) == 1


def test_sighup_is_reloading_then_ready_also_when_refused(
    notified: Callable[..., NotifiedDaemon], notify: NotifySocket, test_lists: Path
) -> None:
    daemon = notified()
    before = time.monotonic_ns() // 1000
    daemon.signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING")
    assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
    ready = notify.wait_for("READY")
    assert ready.fields["STATUS"] == "serving: reload succeeded"

    with open(test_lists / "extra.txt", "a") as handle:
        handle.write("bad..name\n")
    daemon.signal(signal.SIGHUP)
    notify.wait_for("RELOADING")
    refused = notify.wait_for("READY")
    status = refused.fields["STATUS"]
    assert status.startswith(f"serving the previous policy: reload refused: {test_lists / 'extra.txt'}:5:"), status
    assert addresses(daemon.query("blocked.example", source=GOV)) == ["0.0.0.0"]  # the previous policy serves


@pytest.mark.parametrize(("watchdog_pid", "expect_pings"), [(None, True), ("1", False)])
def test_watchdog_pings_every_half_watchdog_usec(
    notified: Callable[..., NotifiedDaemon], notify: NotifySocket, watchdog_pid: str | None, expect_pings: bool
) -> None:
    env = {"WATCHDOG_USEC": "1000000", **({"WATCHDOG_PID": watchdog_pid} if watchdog_pid else {})}
    notified(env=env)
    deadline = time.monotonic() + 2.2
    while (left := deadline - time.monotonic()) > 0:
        notify.next(left)
    pings = [n for n in notify.seen if "WATCHDOG" in n.fields]
    if not expect_pings:  # WATCHDOG_PID names another process: the watchdog is not blockd's
        assert pings == []
        return
    assert len(pings) >= 4, [n.fields for n in notify.seen]  # one at start, then every 0.5 s
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(pings)]
    assert 0.35 < sum(gaps) / len(gaps) < 0.75, gaps
    assert max(gaps) < 1.0, gaps  # never a whole WATCHDOG_USEC without a ping: systemd would kill it


def test_stopping_on_sigterm(notified: Callable[..., NotifiedDaemon], notify: NotifySocket) -> None:
    daemon = notified()
    assert daemon.process is not None
    daemon.signal(signal.SIGTERM)
    stopping = notify.wait_for("STOPPING", timeout=10)
    assert stopping.fields == {"STOPPING": "1", "STATUS": "stopping"} and stopping.pid == daemon.process.pid
    assert daemon.process.wait(timeout=10) == 0


def test_without_notify_socket_nothing_changes(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon()  # the harness's own start: no NOTIFY_SOCKET, answers as always
    assert addresses(daemon.query("www.tiktok.com", source=GOV)) == ["0.0.0.0"]
    assert "cannot notify systemd" not in daemon.log()
