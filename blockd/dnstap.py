"""The dnstap sink: every lookup as dnstap over Frame Streams, for the SOC's collector.

Config ([dnstap], off unless `socket` or `file` is set):
    socket = "unix:/run/blockd/dnstap.sock" | "tcp:127.0.0.1:6000"   (bidirectional fstrm)
    file = "/var/log/blockd/dnstap.fstrm"                           (unidirectional; SIGHUP reopens)
    identity = "resolver-brussels-1"   (default: the host name)
    version = "blockd 0.x"             (default: blockd's version)
    messages = "all" | "blocked" | "responses"
    forwarder = false                  (true: FORWARDER_QUERY/RESPONSE for upstream traffic)

Fed by the resolver's one report per answered query (the same step that feeds the JSON query
log), and by the upstream client per exchange when `forwarder` is on.  Per query the reactor
only appends the event's raw parts to a queue; every ENCODE_INTERVAL it encodes what is queued
into one chunk of frames (blockd.dnstap_frames, blockd.fstrm), and a writer thread writes the
chunks.  (Encoding in the writer thread was measured: the two threads fought for the GIL, which
cost more than the encoding.)  A slow or absent collector never slows answering: the writer
reconnects with backoff while the chunks wait, a chunk the collector did not take is kept for
the next connection, and beyond QUEUE_LIMIT lookups waiting the newest are dropped and counted
(blockd_dnstap_frames_total{result="dropped"}).

Which events: `all` sends CLIENT_QUERY and CLIENT_RESPONSE for every answered query, `blocked`
only for blocked, monitored and refused ones, `responses` only CLIENT_RESPONSE.  A query blockd
drops (an RPZ drop) has no response: its CLIENT_QUERY is sent in every mode.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from twisted.logger import Logger

from blockd import fstrm
from blockd.dnstap_frames import PayloadEncoder, PolicyFacts, policy_facts
from blockd.policy import Verdict
from blockd.repeats import BlockedRepeat
from blockd.writer_thread import WriterThread

_log = Logger()
QUEUE_LIMIT = 50_000  # lookups waiting (a few hundred bytes each): the backlog a collector restart can take
ENCODE_INTERVAL = 0.01  # the reactor encodes what is queued this often
WRITE_INTERVAL = 0.02  # the writer thread writes what is encoded this often
HANDSHAKE_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0

_CLIENT = 0
_FORWARDER = 1


@dataclass(frozen=True)
class DnstapSettings:
    target: str  # "unix:PATH", "tcp:HOST:PORT" or "file:PATH"
    identity: bytes
    version: bytes
    messages: str = "all"  # all | blocked | responses
    forwarder: bool = False


class Counters:
    """What the sink reports: frames by result, and whether the collector is connected."""

    def __init__(
        self,
        frames: Callable[[str, int], None] = lambda result, count: None,
        connected: Callable[[bool], None] = lambda up: None,
    ):
        self.frames = frames
        self.connected = connected


class DnstapSink:
    def __init__(
        self,
        settings: DnstapSettings,
        counters: Counters,
        clock_ns: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self.counters = counters
        self.clock_ns = clock_ns  # wall clock: dnstap times are UNIX times
        self.monotonic = monotonic  # the reconnect backoff
        self.active = True
        self.forwarder = settings.forwarder
        self._blocked_only = settings.messages == "blocked"
        self._queries = settings.messages != "responses"
        self._per_repeat = 1 + self._queries  # frames per repeated blocked query
        self.queue: deque[tuple[Any, ...]] = deque()  # events, until the reactor encodes them
        self.repeats: deque[tuple[Any, ...]] = deque()  # repeated blocked queries, the same
        self.chunks: deque[tuple[bytes, int, int]] = deque()  # (frames, frame count, event count), to write
        self._waiting = 0  # events in self.chunks (the bound counts them with the queue's)
        self._waiting_lock = threading.Lock()
        self._reopen = False
        self._writer = WriterThread("blockd-dnstap", self.write_pending, WRITE_INTERVAL, self._close)
        self._out: _Output | None = None
        self._encoder = PayloadEncoder(settings.identity, settings.version)
        self._policies = _Policies()
        self._retry_at = 0.0
        self._backoff = BACKOFF_FIRST
        self._outage_reported = False

    def now_ns(self) -> int:
        return self.clock_ns()

    # -- hot path (reactor thread) ----------------------------------------------------------

    def answered(
        self,
        client: str,
        port: int,
        transport: str,
        query: bytes,
        answer: bytes | None,
        verdict: Verdict | None,
        denied: bool,
        received_ns: int,
    ) -> None:
        """One answered (or dropped) client query; received_ns 0: it was answered on arrival."""
        if self._blocked_only and verdict is None and not denied:
            return
        self.queue.append(
            (_CLIENT, client, port, transport, query, answer, verdict, denied, received_ns, self.clock_ns())
        )

    def repeated(self, client: str, port: int, transport: str, query_id: bytes, repeat: BlockedRepeat) -> None:
        """A repeated blocked query (blockd.repeats): the hot path, so one append and nothing else
        (the bound is applied when the reactor next encodes, at most ENCODE_INTERVAL later)."""
        self.repeats.append((client, port, transport, query_id, repeat, self.clock_ns()))

    def forwarded(self, host: str, port: int, transport: str, query: bytes, sent_ns: int, answer: bytes | None) -> None:
        """One exchange with an upstream (answer None: it failed)."""
        self.queue.append((_FORWARDER, host, port, transport, query, answer, sent_ns, self.clock_ns()))

    # -- the reactor, every ENCODE_INTERVAL (DnstapService) -----------------------------------

    def encode(self) -> None:
        """Encode what is queued into one chunk of frames for the writer thread.

        On the reactor, not in the writer: encoding in a second thread made the two fight for
        the GIL (each of the reactor's send and receive calls handed it over), which cost more
        than the encoding itself (bench/RESULTS.md, "dnstap")."""
        queue, repeats = self.queue, self.repeats
        if not queue and not repeats:
            return
        events = [queue.popleft() for _ in range(len(queue))]
        repeated = [repeats.popleft() for _ in range(len(repeats))]
        room = max(QUEUE_LIMIT - self._waiting, 0)
        if len(events) + len(repeated) > room:  # the collector is slow or gone: the newest go
            keep = min(len(events), room)
            keep_repeats = room - keep
            dropped = sum(map(self._frame_count, events[keep:])) + self._per_repeat * (len(repeated) - keep_repeats)
            events, repeated = events[:keep], repeated[:keep_repeats]
            self.counters.frames("dropped", dropped)
        try:
            data, count = self._frames(events)
            repeat_data = self._repeat_frames(repeated)
        except Exception:  # noqa: BLE001 - a bug here must not stop the periodic call, nor answering
            _log.failure("dnstap: cannot encode {count} lookups; they are dropped", count=len(events) + len(repeated))
            self.counters.frames("dropped", 2 * len(events) + self._per_repeat * len(repeated))
            return
        total = len(events) + len(repeated)
        if not total:
            return
        with self._waiting_lock:
            self._waiting += total
        self.chunks.append((data + repeat_data, count + self._per_repeat * len(repeated), total))

    def _frame_count(self, event: tuple[Any, ...]) -> int:
        if event[0] == _FORWARDER:
            return 1 + (event[5] is not None)
        answer = event[5]
        return (self._queries or answer is None) + (answer is not None)

    # -- writer thread ----------------------------------------------------------------------

    def start(self) -> None:
        self._writer.start()

    def stop(self) -> None:
        """Write what is encoded (if the collector is there), STOP, and close."""
        self._writer.stop()

    def reopen(self) -> None:
        """SIGHUP: a file output that logrotate moved away is finished (STOP) and a new one started.

        A file still at its path is kept: a reload that rotated nothing changes nothing."""
        if self.settings.target.startswith("file:"):
            self._reopen = True

    def _close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def flush(self) -> None:
        """Encode and write what is queued now (tests; the daemon splits it between its threads)."""
        self.encode()
        self.write_pending()

    def write_pending(self) -> None:
        """Write the encoded chunks (the writer thread)."""
        if self._reopen:
            self._reopen = False
            if self._out is not None and self._out.moved():
                self._out.close()
                self._out = None
        chunks = self.chunks
        while chunks:
            out = self._connected()
            if out is None:
                return  # the chunks wait (bounded) for the collector
            chunk = chunks.popleft()
            data, frames, events = chunk
            try:
                out.check()
                out.write(data)
            except (OSError, fstrm.FstrmError) as exc:
                chunks.appendleft(chunk)  # for the next connection: a collector that died mid-chunk
                self._lost(f"stream failed ({_reason(exc)})")  # may so see some frames twice; none is lost
                return
            with self._waiting_lock:
                self._waiting -= events
            self.counters.frames("sent", frames)

    def _frames(self, events: list[tuple[Any, ...]]) -> tuple[bytes, int]:
        """The events as data frames, and how many frames that is."""
        encoder = self._encoder
        with_query = self._queries
        policies = self._policies
        frames: list[bytes] = []
        count = 0
        for event in events:
            if event[0] == _FORWARDER:
                _, host, port, transport, query, answer, sent_ns, answered_ns = event
                payloads = encoder.forwarder(host, port, transport, query, sent_ns, answer, answered_ns)
                frames += map(fstrm.data_frame, payloads)
                count += len(payloads)
                continue
            _, client, port, transport, query, answer, verdict, denied, received_ns, answered_ns = event
            policy: PolicyFacts | None = None
            if denied:
                policy = policy_facts(None, True, client)
            elif verdict is not None:
                policy = policies.of(verdict)
            frames.append(
                encoder.client_stream(
                    client, port, transport, query, answer, received_ns or answered_ns, answered_ns, policy, with_query
                )
            )
            count += (with_query or answer is None) + (answer is not None)
        return b"".join(frames), count

    def _repeat_frames(self, repeated: list[tuple[Any, ...]]) -> bytes:
        """Repeated blocked queries as data frames: the blocked path's loop, kept tight."""
        return self._encoder.repeat_streams(repeated, self._policies.of, self._queries)

    def _connected(self) -> _Output | None:
        if self._out is not None:
            return self._out
        now = self.monotonic()
        if now < self._retry_at:
            return None
        target = self.settings.target
        try:
            self._out = _open_output(target)
        except (OSError, fstrm.FstrmError) as exc:
            self._retry_at = now + self._backoff
            if not self._outage_reported:
                self._outage_reported = True
                _log.warn(
                    "dnstap {target}: cannot connect ({error}); events wait (up to {limit}), beyond that "
                    "they are dropped and counted; retrying with backoff",
                    target=target,
                    error=_reason(exc),
                    limit=QUEUE_LIMIT,
                )
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
            return None
        self._backoff = BACKOFF_FIRST
        self._outage_reported = False
        _log.info("dnstap {target}: streaming", target=target)
        self.counters.connected(True)
        return self._out

    def _lost(self, why: str) -> None:
        _log.warn("dnstap {target}: {why}; reconnecting", target=self.settings.target, why=why)
        if self._out is not None:
            self._out.abort()
            self._out = None
        self.counters.connected(False)
        self._retry_at = self.monotonic() + self._backoff
        self._outage_reported = True  # the outage is reported: the reconnect attempts stay quiet


class _Policies(dict[int, tuple[Verdict, PolicyFacts]]):
    """Verdict -> its dnstap Policy (verdicts are reused per group and entry: blockd.policy).

    Keyed by the verdict object's id, and holding the verdict, so the id is not reused while kept.
    """

    def of(self, verdict: Verdict) -> PolicyFacts:
        kept = self.get(id(verdict))
        if kept is not None and kept[0] is verdict:
            return kept[1]
        if len(self) >= 10_000:
            self.clear()
        facts = policy_facts(verdict)
        assert facts is not None
        self[id(verdict)] = (verdict, facts)
        return facts


def _reason(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


class _Output:
    """Where frames go: a collector's socket (after the handshake) or a file (after START)."""

    def check(self) -> None:
        """Raise OSError or FstrmError when the output is known to be gone."""

    def moved(self) -> bool:
        """Whether the output is a file that is no longer at its path (logrotate)."""
        return False

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """STOP (and FINISH from a collector), then close."""
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class _SocketOutput(_Output):
    def __init__(self, sock: socket.socket):
        self.sock = sock

    def check(self) -> None:
        # A collector sends nothing between ACCEPT and FINISH: readable means it closed (or broke
        # the protocol).  Checked before each batch, so a batch is not written into a socket whose
        # peer is gone, where TCP would accept it and lose it.
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return
        data = self.sock.recv(1, socket.MSG_PEEK)
        if not data:
            raise fstrm.FstrmError("the collector closed the connection")
        raise fstrm.FstrmError("the collector sent data mid-stream")

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.sendall(fstrm.control_frame(fstrm.STOP))
            self.sock.settimeout(1.0)
            _read_control(self.sock, fstrm.FINISH)
        except (OSError, fstrm.FstrmError):
            pass  # the collector went first: nothing left to finish
        self.abort()

    def abort(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _FileOutput(_Output):
    def __init__(self, handle: IO[bytes], path: str):
        self.handle = handle
        self.path = path

    def moved(self) -> bool:
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return True
        mine = os.fstat(self.handle.fileno())
        return (at_path.st_dev, at_path.st_ino) != (mine.st_dev, mine.st_ino)

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        self.handle.flush()

    def close(self) -> None:
        try:
            self.handle.write(fstrm.control_frame(fstrm.STOP))
            self.handle.flush()
        except OSError:
            pass
        self.abort()

    def abort(self) -> None:
        try:
            self.handle.close()
        except OSError:
            pass


def _open_output(target: str) -> _Output:
    kind, _, where = target.partition(":")
    if kind == "file":
        return _FileOutput(_open_file(where), where)
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: Any = where
    else:
        host, _, port = where.rpartition(":")
        host = host.strip("[]")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        address = (host, int(port))
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        sock.connect(address)
        sock.sendall(fstrm.control_frame(fstrm.READY, (fstrm.DNSTAP_CONTENT_TYPE,)))
        _read_control(sock, fstrm.ACCEPT)
        sock.sendall(fstrm.control_frame(fstrm.START, (fstrm.DNSTAP_CONTENT_TYPE,)))
        sock.settimeout(WRITE_TIMEOUT)
    except BaseException:
        sock.close()
        raise
    return _SocketOutput(sock)


def _read_control(sock: socket.socket, kind: int) -> None:
    reader = fstrm.ControlReader()
    while True:
        data = sock.recv(fstrm.CONTROL_FRAME_MAX + 8)
        if not data:
            raise fstrm.FstrmError(f"collector closed the connection before {fstrm.CONTROL_NAMES[kind]}")
        frames = reader.feed(data)
        if frames:
            fstrm.expect(frames[0], kind, fstrm.DNSTAP_CONTENT_TYPE)
            return


def _open_file(path: str) -> IO[bytes]:
    """A new stream file; a non-empty file already there is kept aside, never overwritten."""
    try:
        if os.path.getsize(path) > 0:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside = f"{path}.{stamp}"
            number = 1
            while os.path.lexists(aside):  # rename would replace it
                number += 1
                aside = f"{path}.{stamp}.{number}"
            os.rename(path, aside)
            _log.info("dnstap {path}: the previous stream kept as {aside}", path=path, aside=aside)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    handle = os.fdopen(fd, "wb")
    handle.write(fstrm.control_frame(fstrm.START, (fstrm.DNSTAP_CONTENT_TYPE,)))
    handle.flush()
    return handle
