"""The JSON query log: one object per line naming which client asked for what.

Config: [log] queries = "none" | "blocked" | "all" (default "blocked": the SOC's evidence;
logging allowed lookups is opt-in), path ("-" = stdout), client_ip = "full" | "truncate"
(IPv4 /24, IPv6 /48) | "hash" (keyed SHA-256, stable until restart).

Answering never waits for the disk, and does the least it can per line: the hot path appends
the line's raw fields (time, client, and the answer's facts, or for a repeated blocked query
its precomputed tail) to a bounded in-memory queue; a writer thread drains it a few times a
second, formats every line (the timestamp once per millisecond, each client's text once) and
writes them in one call.  Lines keep their order; stop() writes what is queued.  A full queue drops lines
(counted); a write error (disk full, unwritable file) is counted once per write, logged once per
outage (at most once a minute), the lines it could not write are dropped and counted, and the
daemon keeps answering.  The file only ever holds whole JSON lines: a write cut short in mid-line
(ENOSPC) is completed first thing at the next write, on the same descriptor; if the file is
closed before that can happen (reopen, stop), it is cut back to its last line end.
reopen() (on SIGHUP) makes the writer reopen the file, for logrotate.

Metrics: blockd_query_log_lines_total, blockd_query_log_dropped_total,
blockd_query_log_errors_total.
"""

from __future__ import annotations

import errno
import hashlib
import io
import ipaddress
import itertools
import json
import operator
import os
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import IO, Any

from dnslib import QTYPE
from twisted.logger import Logger

from blockd.metrics import QTYPE_LABELS, RCODE_NAMES
from blockd.policy import NO_GROUP, Group, Verdict
from blockd.wire import Query
from blockd.writer_thread import WriterThread

_log = Logger()
QUEUE_LIMIT = 200_000
FLUSH_INTERVAL = 0.2
ERROR_LOG_INTERVAL = 60.0  # seconds between two "cannot write" messages, however often writes fail


_json_string = json.encoder.encode_basestring_ascii


def _json_or_null(value: str | None) -> str:
    return "null" if value is None else _json_string(value)


def line_tail(
    group: Group | None,
    key: str | None,
    qtype: int,
    verdict: Verdict | None,
    rcode: int,
    denied: bool = False,
    error: bool = False,
    action: str | None = None,
    suppressed: int | None = None,
    transport: str | None = None,
    duration_ms: int | None = None,
) -> str:
    """Everything of a log line after the client, as JSON text.

    Assembled by hand with the C string encoder (json.dumps of a dict costs several times
    more); the same for every repetition of a blocked query, so the resolver keeps it.
    """
    list_name: str | None
    domain: str | None
    via: str | None
    if verdict is not None:
        action, list_name, domain, via = verdict.action, verdict.list_name, verdict.domain, verdict.via
    else:
        action = action or ("error" if error else "denied" if denied else "forward")
        list_name = domain = via = None
    # How the query came and how long its answer took (ms, whole: 0 for an answer given as the
    # query arrived); a sampled line (blockd.log_sampling) says how many like it went unlogged.
    more = f',"transport":"{transport}"' if transport is not None else ""
    if duration_ms is not None:
        more += f',"duration_ms":{duration_ms}'
    if suppressed is not None:
        more += f',"suppressed":{suppressed}'
    return (
        f'"group":{_json_string(group.name if group is not None else NO_GROUP)},'
        f'"qname":{_json_or_null(key)},'
        f'"qtype":{_qtype_text(qtype)},'
        f'"action":"{action}",'
        f'"list":{_json_or_null(list_name)},'
        f'"domain":{_json_or_null(domain)},'
        f'"via":{_json_or_null(via)},'
        f'"rcode":{_rcode_text(rcode)}{more}}}'
    )


def _qtype_text(qtype: int) -> str:
    """The type's mnemonic (dnslib knows them all), or TYPEn for the others (RFC 3597); null when
    none was read."""
    if qtype <= 0:
        return "null"
    return f'"{QTYPE_LABELS.get(qtype) or QTYPE[qtype]}"'


def _rcode_text(rcode: int) -> str:
    if rcode < 0:
        return "null"  # no answer was given (RPZ drop)
    return f'"{RCODE_NAMES.get(rcode) or rcode}"'


# What the hot path queues: (time, client, tail), the tail being line_tail()'s text when the
# caller kept it (a repeat), or the fields to make it from: (group, name, qtype, verdict, rcode, denied).
Entry = tuple[int, str, Any]  # time in ns since the epoch


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
        clock_ns: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
        opener: Callable[[str], IO[bytes]] | None = None,
    ):
        self.mode = mode
        self.path = path
        self.format_client = client_ip_formatter(client_ip)
        self.on_error = on_error
        self.on_drop = on_drop
        self.on_line = on_line
        self.clock_ns = clock_ns  # wall clock: the log says when, in UTC
        self.logs_blocked = mode != "none"
        self.logs_allowed = mode == "all"
        self.queue: deque[Entry] = deque()
        self._reopen = False
        self._error_reported = False  # the current outage was logged
        self._monotonic = monotonic
        self._opener = opener or _open_for_append
        self._quiet_until = float("-inf")  # no "cannot write" message before then
        self._file: IO[bytes] | None = None
        # After a write cut short in mid-line: the rest of that line, and how much of it the file has.
        self._unfinished = b""
        self._partial = 0
        self._writer = WriterThread("blockd-query-log", self.flush, FLUSH_INTERVAL, self._close)
        self._formatter = _LineFormatter(self.format_client)

    # -- hot path (reactor thread): append raw fields, nothing more -------------------------

    def answered(
        self,
        client: str,
        group: Group | None,
        query: Query,
        verdict: Verdict | None,
        rcode: int,
        denied: bool = False,
        transport: str = "udp",
        duration_ms: int = 0,
    ) -> None:
        """One answered query (blocked, monitored and denied ones in `blocked` mode, all in `all`).
        duration_ms: from arrival to answer, in whole ms (a handful of values: the tails stay memoized)."""
        if not (self.logs_allowed or (self.logs_blocked and (verdict is not None or denied))):
            return
        queue = self.queue
        if len(queue) >= QUEUE_LIMIT:
            self.on_drop()
            return
        tail = (group, query.key, query.qtype, verdict, rcode, denied, False, None, None, transport, duration_ms)
        queue.append((self.clock_ns(), client, tail))

    def unreadable(
        self, client: str, group: Group | None, key: str | None, qtype: int, rcode: int, transport: str = "udp"
    ) -> None:
        """A packet answered with an error from its header alone (FORMERR, NOTIMP, BADVERS): `all` mode."""
        if not self.logs_allowed:
            return
        queue = self.queue
        if len(queue) >= QUEUE_LIMIT:
            self.on_drop()
            return
        tail = line_tail(group, key, qtype, None, rcode, error=True, transport=transport, duration_ms=0)
        queue.append((self.clock_ns(), client, tail))

    def sampled(
        self,
        client: str,
        group: Group | None,
        query: Query | None,
        action: str,
        rcode: int,
        suppressed: int,
        transport: str = "udp",
    ) -> None:
        """A refused ("denied") or rate-limited query, one line per client per interval
        (blockd.log_sampling): with how many were not logged since the last one."""
        if not self.logs_blocked:
            return
        key, qtype = (query.key, query.qtype) if query is not None else (None, 0)
        tail = line_tail(group, key, qtype, None, rcode, action=action, suppressed=suppressed, transport=transport)
        self.repeated(client, tail)

    def repeated(self, client: str, tail: str) -> None:
        """A repeated blocked query whose line tail (line_tail()) the caller kept."""
        queue = self.queue
        if len(queue) >= QUEUE_LIMIT:
            self.on_drop()
            return
        queue.append((self.clock_ns(), client, tail))

    # -- writer thread ----------------------------------------------------------------------

    def start(self) -> None:
        if self.mode != "none":
            self._writer.start()

    def stop(self) -> None:
        self._writer.stop()

    def reopen(self) -> None:
        """Reopen the file before the next write (logrotate renamed it)."""
        self._reopen = True

    def pending_lines(self) -> list[str]:
        """The queued lines as they will be written (for tests and diagnostics; removes nothing)."""
        return self._formatter.lines(list(self.queue))

    def flush(self) -> None:
        if self._reopen:
            self._reopen = False
            self._close()
        queue = self.queue
        # Only the entries present now: the reactor thread may append while this runs.
        entries = [queue.popleft() for _ in range(len(queue))]
        if not entries:
            return
        self._write(len(entries), self._formatter.text(entries))

    def _write(self, count: int, text: bytes) -> None:
        """Write count lines (text), after the rest of a line cut short last time."""
        unfinished = self._unfinished
        data = unfinished + text
        error: OSError | None
        try:
            handle = self._open()
        except OSError as exc:
            written, error = 0, exc
        else:
            written, error = _write_all(handle, data)
        completed = data.count(b"\n", 0, written)
        if completed:
            self.on_line(completed)
        if error is None:
            self._unfinished, self._partial = b"", 0
            self._recovered()
            return
        self._cut_short(data, written)
        # Lines of this batch neither written nor waiting to be completed are lost.
        kept = completed - (1 if unfinished and written >= len(unfinished) else 0)
        kept += 1 if self._unfinished and written > len(unfinished) else 0
        for _ in range(count - kept):
            self.on_drop()
        self.on_error()
        self._report(error)
        if not self._unfinished:
            self._close()  # the next write reopens: the error may have been this file's

    def _cut_short(self, data: bytes, written: int) -> None:
        """Remember what a write that stopped after `written` bytes of data left unfinished."""
        if not written:
            return  # the file is as it was
        if data[written - 1] == 0x0A:
            self._unfinished, self._partial = b"", 0
            return
        line_start = data.rfind(b"\n", 0, written) + 1
        self._partial = self._partial + written if line_start == 0 else written - line_start
        self._unfinished = data[written : data.index(b"\n", written) + 1]

    def _finish_line(self, handle: IO[bytes]) -> None:
        """Before the file is closed: complete its last line, or else cut it off."""
        written, error = _write_all(handle, self._unfinished)
        if error is None:
            self.on_line(1)
        else:
            try:
                size = handle.seek(0, io.SEEK_END)
                handle.truncate(size - self._partial - written)
            except (OSError, ValueError) as exc:  # a pipe cannot be cut
                _log.error("query log {path}: its last line stays incomplete ({error})", path=self.path, error=exc)
        self._unfinished, self._partial = b"", 0

    def _report(self, error: OSError) -> None:
        if self._error_reported:
            return
        now = self._monotonic()
        if now < self._quiet_until:
            return  # flapping: the next message once the interval is over, if it still fails
        self._error_reported = True
        self._quiet_until = now + ERROR_LOG_INTERVAL
        _log.error("query log {path}: cannot write ({error}); answering continues", path=self.path, error=error)

    def _recovered(self) -> None:
        if self._error_reported:
            self._error_reported = False
            _log.info("query log {path}: writing again", path=self.path)

    def _open(self) -> IO[bytes]:
        if self._file is None:
            if self.path == "-":
                # Unbuffered, so that a write's count says what reached the pipe.
                sys.stdout.flush()
                self._file = getattr(sys.stdout.buffer, "raw", sys.stdout.buffer)
            else:
                self._file = self._opener(self.path)
        return self._file

    def _close(self) -> None:
        if self._file is not None and self._unfinished:
            self._finish_line(self._file)
        if self._file is not None and self.path != "-":
            try:
                self._file.close()
            except OSError:
                pass
        self._file = None


def _open_for_append(path: str) -> IO[bytes]:
    # Unbuffered: a write's count is what reached the file (and one write per flush anyway).
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640), "ab", buffering=0)


def _write_all(handle: IO[bytes], data: bytes) -> tuple[int, OSError | None]:
    """(bytes written, None), or (bytes written before it, the error): a write can stop short."""
    view = memoryview(data)
    written = 0
    try:
        while written < len(data):
            count = handle.write(view[written:])
            if not count:  # None: a non-blocking file that would block
                raise BlockingIOError(errno.EAGAIN, "the file takes no more bytes now")
            written += count
        handle.flush()
    except OSError as exc:
        return written, exc
    return written, None


class _Heads(dict[int, bytes]):
    """Millisecond -> the line up to the client: strftime once a second, the text once a millisecond."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._second_text = ""

    def __missing__(self, milli: int) -> bytes:
        if len(self) > _TEXT_MEMO_LIMIT:
            self.clear()
        second, fraction = divmod(milli, 1000)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        head = self[milli] = f'{{"ts":"{self._second_text}.{fraction:03d}Z","client":'.encode()
        return head


class _Clients(dict[str, bytes]):
    """Client address -> its JSON text (formatted for privacy) and the comma after it."""

    def __init__(self, format_client: Callable[[str], str]):
        super().__init__()
        self.format_client = format_client

    def __missing__(self, client: str) -> bytes:
        if len(self) > _TEXT_MEMO_LIMIT:
            self.clear()
        text = self[client] = (_json_string(self.format_client(client)) + ",").encode()
        return text


class _Tails(dict[Any, bytes]):
    """A line's tail (line_tail()'s text, or the fields to make it from) -> its bytes and newline."""

    def __missing__(self, tail: Any) -> bytes:
        if len(self) > _TEXT_MEMO_LIMIT:
            self.clear()
        text = self[tail] = ((tail if isinstance(tail, str) else line_tail(*tail)) + "\n").encode()
        return text


_TEXT_MEMO_LIMIT = 100_000
_CHUNK = 50  # lines per step between GIL hand-offs: tens of microseconds on a slow core
_NS_PER_MS = 1_000_000
_time = operator.itemgetter(0)
_client = operator.itemgetter(1)
_tail = operator.itemgetter(2)


class _LineFormatter:
    """Turns queued entries into JSON lines (writer thread).

    Lines repeat: the same clients ask the same names, many lines fall in one millisecond.  So
    a line is three memo lookups, run through map() and joined once, and no Python code runs
    per line unless a part is new (~0.6 us a line instead of ~1.5 us for a formatting loop).
    """

    def __init__(self, format_client: Callable[[str], str]):
        self._heads = _Heads()
        self._clients = _Clients(format_client)
        self._tails = _Tails()

    def text(self, entries: list[Entry]) -> bytes:
        """Every entry as one JSON line, each ending in a newline."""
        # In chunks, letting the reactor have the GIL between them: a C-level join holds the GIL
        # throughout, and without the sleep(0) the reactor would wait a whole switch interval.
        chunks = []
        for at in range(0, len(entries), _CHUNK):
            chunks.append(self._chunk(entries[at : at + _CHUNK]))
            time.sleep(0)  # releases the GIL: a reactor waiting for it takes it now
        return b"".join(chunks)

    def _chunk(self, entries: list[Entry]) -> bytes:
        millis = map(operator.floordiv, map(_time, entries), itertools.repeat(_NS_PER_MS))
        heads = map(self._heads.__getitem__, millis)
        clients = map(self._clients.__getitem__, map(_client, entries))
        tails = map(self._tails.__getitem__, map(_tail, entries))
        return b"".join(itertools.chain.from_iterable(zip(heads, clients, tails, strict=True)))

    def lines(self, entries: list[Entry]) -> list[str]:
        return self.text(entries).decode().splitlines()
