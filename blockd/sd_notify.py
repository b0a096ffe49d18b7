"""systemd's service notification protocol (sd_notify(3)): READY, RELOADING, STOPPING, WATCHDOG.

A notification is one datagram of KEY=value lines to the unix socket named by $NOTIFY_SOCKET: a
path, or an abstract name when it starts with '@'.  With the variable unset (not started by
systemd with Type=notify) every send is a no-op.  Sending never raises into the caller: a
failure is logged once (then counted silently in `failures`), because a notification that
cannot be sent must not take DNS down with it.

Implemented here rather than taken from PyPI: `sdnotify` (last release 2017) swallows every
error without a word and knows nothing of the watchdog variables; `systemd-python` is a C
extension that needs libsystemd's headers to build.  The protocol is a dozen lines.

Messages blockd sends (blockd.daemon): READY=1 once the listeners read and the first policy is
live; RELOADING=1 with MONOTONIC_USEC= when a SIGHUP reload starts and READY=1 with STATUS=
when it ends (success or refused: the reload states of systemd 253's Type=notify-reload, which
Type=notify of older versions accepts too); STOPPING=1 at shutdown; WATCHDOG=1 every half of
$WATCHDOG_USEC, from the reactor, when the watchdog is meant for this process.
Config keys: none.  Metrics: none.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from twisted.logger import Logger

_log = Logger()

SEND_TIMEOUT = 0.25  # seconds: systemd reads promptly; a stuck manager must not hold the reactor
STATUS_LIMIT = 400  # characters of STATUS= (a one-line summary, not a log)


# -- pure: the message and the environment ---------------------------------------------------


def message(**fields: object) -> bytes:
    """KEY=value lines, in the order given; a value is folded to one line (a newline would end it)."""
    lines = []
    for key, value in fields.items():
        text = " ".join(str(value).split())
        if key == "STATUS" and len(text) > STATUS_LIMIT:
            text = text[: STATUS_LIMIT - 3] + "..."
        lines.append(f"{key}={text}\n")
    return "".join(lines).encode("utf-8", "replace")


def socket_address(value: str | None) -> str | bytes | None:
    """The address to send to: a path, an abstract name ('@name' -> b'\\0name'), or None."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # systemd passes only these two forms (vsock addresses are not for us)


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) advises.

    None when the watchdog is off, or meant for another process ($WATCHDOG_PID set and not ours,
    e.g. inherited from a parent that systemd watches).
    """
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    watched = environ.get("WATCHDOG_PID")
    if watched:
        try:
            if int(watched) != pid:
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


def monotonic_usec(clock_ns: Callable[[], int] = time.monotonic_ns) -> int:
    """CLOCK_MONOTONIC in microseconds, as MONOTONIC_USEC= wants it (time.monotonic is that clock on Linux)."""
    return clock_ns() // 1000


# -- I/O: the datagram -------------------------------------------------------------------------


class Datagrams(Protocol):
    """What Notifier needs of a socket (a unix datagram socket; a fake in tests)."""

    def sendto(self, data: bytes, address: str | bytes, /) -> int: ...

    def close(self) -> None: ...


def _unix_datagram_socket() -> Datagrams:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(SEND_TIMEOUT)
    return sock


class Notifier:
    """Sends notifications to one address; a no-op without one.  Never raises."""

    def __init__(self, address: str | bytes | None, make_socket: Callable[[], Datagrams] = _unix_datagram_socket):
        self.address = address
        self.make_socket = make_socket
        self.failures = 0
        self._socket: Datagrams | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        return cls(socket_address((os.environ if environ is None else environ).get("NOTIFY_SOCKET")))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> bool:
        """Send one notification; True when it was sent."""
        if self.address is None:
            return False
        data = message(**fields)
        try:
            if self._socket is None:
                self._socket = self.make_socket()
            self._socket.sendto(data, self.address)
        except (OSError, ValueError) as exc:  # ValueError: a NUL in a path
            self.failures += 1
            if self.failures == 1:
                where = self.address.decode(errors="replace") if isinstance(self.address, bytes) else self.address
                _log.warn(
                    "cannot notify systemd at {where!r} ({error}); later failures are not logged",
                    where=where.replace("\0", "@"),
                    error=exc,
                )
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def reloading(self, status: str = "reloading config and lists") -> bool:
        return self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS=status)

    def stopping(self) -> bool:
        return self.send(STOPPING=1, STATUS="stopping")

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)  # for a LoopingCall: returns nothing, raises nothing

    def close(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()
