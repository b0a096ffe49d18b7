"""The JSON query log: one object per line naming which client asked for what.

Config: [log] queries = "none" | "blocked" | "all" (default "blocked": the SOC's evidence;
logging allowed lookups is opt-in), path ("-" = stdout), client_ip = "full" | "truncate"
(IPv4 /24, IPv6 /48) | "hash" (keyed SHA-256, stable until restart).

Answering never waits for the disk: the hot path formats a line and appends it to a bounded
in-memory queue; a writer thread drains it a few times a second.  A full queue drops lines
(counted); a write error (disk full, unwritable file) is logged once, counted, and the daemon
keeps answering.  reopen() (on SIGHUP) makes the writer reopen the file, for logrotate.

Metrics: blockd_query_log_lines_total, blockd_query_log_dropped_total,
blockd_query_log_errors_total.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO

from twisted.logger import Logger

from blockd.metrics import QTYPE_LABELS, RCODE_NAMES
from blockd.policy import NO_GROUP, Group, Verdict
from blockd.wire import Query

_log = Logger()
QUEUE_LIMIT = 200_000
FLUSH_INTERVAL = 0.2


def client_ip_formatter(mode: str) -> Callable[[str], str]:
    if mode == "full":
        return lambda ip: ip
    if mode == "truncate":

        def truncate(ip: str) -> str:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
            if address.version == 6 and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            prefix = 24 if address.version == 4 else 48
            return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)

        return truncate
    key = secrets.token_bytes(32)
    return lambda ip: hashlib.blake2b(ip.encode(), key=key, digest_size=12).hexdigest()


class QueryLog:
    def __init__(
        self,
        mode: str,
        path: str,
        client_ip: str = "full",
        on_error: Callable[[], None] = lambda: None,
        on_drop: Callable[[], None] = lambda: None,
        on_line: Callable[[int], None] = lambda count: None,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.mode = mode
        self.path = path
        self.format_client = client_ip_formatter(client_ip)
        self.on_error = on_error
        self.on_drop = on_drop
        self.on_line = on_line
        self.wall_clock = wall_clock
        self.queue: deque[str] = deque()
        self._reopen = False
        self._stop = threading.Event()
        self._error_reported = False
        self._file: IO[str] | None = None
        self._thread: threading.Thread | None = None

    # -- hot path (reactor thread) ------------------------------------------------------------

    def __call__(
        self, client: str, group: Group | None, query: Query, verdict: Verdict | None, rcode: int, denied: bool = False
    ) -> None:
        if self.mode == "none" or (self.mode == "blocked" and verdict is None and not denied):
            return
        if len(self.queue) >= QUEUE_LIMIT:
            self.on_drop()
            return
        if verdict is not None:
            action, list_name, domain = verdict.action, verdict.list_name, verdict.domain
        else:
            action = "denied" if denied else "forward"
            list_name = domain = None
        now = self.wall_clock()
        record = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
            "client": self.format_client(client),
            "group": group.name if group is not None else NO_GROUP,
            "qname": query.key,
            "qtype": QTYPE_LABELS.get(query.qtype, str(query.qtype)),
            "action": action,
            "list": list_name,
            "domain": domain,
            "rcode": RCODE_NAMES.get(rcode, str(rcode)),
        }
        self.queue.append(json.dumps(record, separators=(",", ":")))

    # -- writer thread ----------------------------------------------------------------------

    def start(self) -> None:
        if self.mode == "none" or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="blockd-query-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None

    def reopen(self) -> None:
        """Reopen the file before the next write (logrotate renamed it)."""
        self._reopen = True

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            self.flush()
        self.flush()
        self._close()

    def flush(self) -> None:
        if self._reopen:
            self._reopen = False
            self._close()
        lines = []
        queue = self.queue
        while queue:
            lines.append(queue.popleft())
        if not lines:
            return
        try:
            handle = self._open()
            handle.write("\n".join(lines) + "\n")
            handle.flush()
        except OSError as exc:
            self.on_error()
            for _ in lines:
                self.on_drop()
            if not self._error_reported:
                self._error_reported = True
                _log.error("query log {path}: cannot write ({error}); answering continues", path=self.path, error=exc)
            self._close()
            return
        if self._error_reported:
            self._error_reported = False
            _log.info("query log {path}: writing again", path=self.path)
        self.on_line(len(lines))

    def _open(self) -> IO[str]:
        if self._file is None:
            if self.path == "-":
                self._file = sys.stdout
            else:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                self._file = os.fdopen(fd, "a", encoding="utf-8")
        return self._file

    def _close(self) -> None:
        if self._file is not None and self._file is not sys.stdout:
            try:
                self._file.close()
            except OSError:
                pass
        self._file = None
