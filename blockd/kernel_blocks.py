"""Flooding clients blocked in the kernel for a while (blockd.kernel_filter on the UDP listeners).

ClientLimits calls `block(key)` for a client far over its rate; its datagrams are then dropped
below the socket for `seconds`, after which it is let in again (and blocked again at once if it
is still flooding).  Blocking only ever applies to UDP: a TCP client cannot spoof its address,
and its reading is throttled instead (blockd.server).  A spoofed flood naming a victim's address
blocks the victim's UDP for `seconds`, as it would exhaust the victim's rate anyway; over TCP the
victim is still answered.  At most kernel_filter.MAX_BLOCKED clients at once.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from blockd import kernel_filter
from blockd.upstream import TCPClientReactor

_log = Logger()


class KernelBlocks:
    def __init__(
        self,
        reactor: TCPClientReactor,
        seconds: float,
        sockets: Callable[[], Iterable[socket.socket]],
        count: Callable[[str], None] = lambda reason: None,
    ):
        self.reactor = reactor
        self.seconds = seconds
        self.sockets = sockets  # the UDP listeners' sockets, once they are open
        self.count = count
        self.blocked: dict[str, IDelayedCall] = {}
        self._broken = False  # the kernel refused a filter: blocking is off, said once

    def block(self, key: str) -> None:
        """Drop this client's UDP datagrams in the kernel for `seconds`."""
        if key in self.blocked or self._broken:
            return
        if len(self.blocked) >= kernel_filter.MAX_BLOCKED:
            self.count("kernel_block_full")
            return
        self.blocked[key] = self.reactor.callLater(self.seconds, self._unblock, key)
        self.count("kernel_block")
        _log.warn(
            "client {client} is flooding (over its rate by far): its UDP queries are dropped for {seconds} s",
            client=key,
            seconds=self.seconds,
        )
        self._install()

    def _unblock(self, key: str) -> None:
        self.blocked.pop(key, None)
        self._install()

    def _install(self) -> None:
        networks = [ipaddress.ip_network(key, strict=False) for key in self.blocked]
        program = kernel_filter.drop_program(networks)
        for sock in self.sockets():
            try:
                kernel_filter.attach(sock, program)
            except OSError as exc:
                self._broken = True
                _log.error("cannot attach a socket filter ({error}): flooding clients are only rate-limited", error=exc)
                return

    def stop(self) -> None:
        for timer in self.blocked.values():
            if timer.active():
                timer.cancel()
        self.blocked.clear()
