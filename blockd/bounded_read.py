"""Reading the files the config names without letting any of them hurt the daemon.

Lists, RPZ zone files, stored zone copies, TSIG key files, prefix files and the config file itself
are read through here:
- only regular files: a FIFO would block the reload thread (and with it SIGTERM) forever, a link
  to /dev/zero would fill memory, a directory says nothing useful;
- opened with O_NONBLOCK, so that even the open of a FIFO returns at once, and checked with fstat
  on the open descriptor, not the path (no race with a rename in between);
- read streaming with a bound on the whole file and on each line, checked as the bytes arrive,
  so a huge file or line is refused after reading at most the bound, never held in memory whole.

Config: [lists.X] max_bytes (default 256 MiB) and max_line_bytes (default 4096) for lists and RPZ
zone files (blockd.config.ListConfig); fixed limits for the other files.  No metrics.
"""

from __future__ import annotations

import io
import itertools
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from blockd.excerpt import excerpt

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_LINE_BYTES = 4096
_CHUNK_BYTES = 1024 * 1024
_HEAD_BYTES = 400  # of an over-long line, kept for the error's excerpt (100 characters of UTF-8)


# What str.splitlines() cuts at besides "\n" and "\r" (text mode does not).
_OTHER_LINE_ENDS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


@dataclass(frozen=True)
class ReadLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES  # without the line end


class FileRefused(Exception):
    """Why a file is not read: message says it, line is where (0: the whole file)."""

    def __init__(self, message: str, line: int = 0):
        super().__init__(message)
        self.message = message
        self.line = line


_KINDS = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISDIR, "directory"),
    (stat.S_ISSOCK, "socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a file")


def open_regular(path: str | Path, limits: ReadLimits) -> int:
    """A descriptor of path open for reading, once it is known to be a regular file within
    max_bytes.  Raises FileRefused, or OSError (missing, no permission...)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except ValueError:  # a NUL in the path (the config refuses those; other callers might not)
        raise FileRefused("the path contains a NUL byte") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused(f"not a regular file ({_kind(info.st_mode)})")
        if info.st_size > limits.max_bytes:
            raise FileRefused(f"{info.st_size} bytes, more than max_bytes ({limits.max_bytes})")
        os.set_blocking(fd, True)  # means nothing for a regular file: plain reads from here on
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_text(path: str | Path, limits: ReadLimits, errors: str = "surrogateescape") -> TextLines:
    """The file's lines as UTF-8 text (universal newlines, as open() gives them), refused with
    FileRefused while they are read as soon as the file passes a bound.  Raises OSError too."""
    return TextLines(open_regular(path, limits), limits, errors)


def read_bytes(path: str | Path, limits: ReadLimits) -> bytes:
    """The whole file (a small one: a key file, the config).  Raises FileRefused or OSError."""
    fd = open_regular(path, limits)
    try:
        counter = _Counter(limits)
        chunks = []
        while data := os.read(fd, _CHUNK_BYTES):
            counter.check(data)
            chunks.append(data)
        return b"".join(chunks)
    finally:
        os.close(fd)


class TextLines:
    """The lines of an open file, read a chunk at a time (a context manager; fileno() for fstat).

    Chunks are cut at line ends in the raw bytes (so UTF-8 is never split), then decoded and split
    whole: no Python code runs per line, so this reads as fast as open() does."""

    def __init__(self, fd: int, limits: ReadLimits, errors: str):
        self._fd = fd
        self._counter = _Counter(limits)
        self._errors = errors
        self._lines: Iterator[str] = itertools.chain.from_iterable(self._chunks())

    def fileno(self) -> int:
        return self._fd

    def __iter__(self) -> Iterator[str]:
        return self._lines

    def __enter__(self) -> TextLines:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _chunks(self) -> Iterator[list[str]]:
        tail = b""  # a line not ended yet (at most max_line_bytes: the counter saw it)
        while data := os.read(self._fd, _CHUNK_BYTES):
            self._counter.check(data)
            data = tail + data
            # Cut after the last line end, holding back a final "\r": it may be half of a "\r\n".
            cut = max(data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - 1)) + 1
            tail = data[cut:]
            if cut:
                yield self._lines_of(data[:cut])
        if tail:
            yield self._lines_of(tail)

    def _lines_of(self, data: bytes) -> list[str]:
        if b"\r" in data:  # "\r\n" and "\r" read as "\n", as text mode translates them
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        text = data.decode("utf-8", self._errors)
        # Each test is a memchr, or nothing for a character above the text's widest.
        if not any(end in text for end in _OTHER_LINE_ENDS):
            return text.splitlines(keepends=True)  # the fast way, when it cuts only at "\n"
        return io.StringIO(text, newline="\n").readlines()


class _Counter:
    """Counts a file's bytes as they are read: raises FileRefused past max_bytes in all, or past
    max_line_bytes between two line ends ("\\n", "\\r\\n" or "\\r", as text mode reads them)."""

    def __init__(self, limits: ReadLimits):
        self._limits = limits
        self._total = 0
        self._line = 1  # the number of the line being read
        self._run = 0  # its bytes so far
        self._head = b""  # its first bytes
        self._cr = False  # the last chunk ended in "\r" (maybe half of a "\r\n")

    def check(self, data: bytes) -> None:
        self._total += len(data)
        if self._total > self._limits.max_bytes:  # it grew since the fstat, or /proc says size 0
            raise FileRefused(f"more than max_bytes ({self._limits.max_bytes}) bytes")
        if self._cr or b"\r" in data:
            if self._cr and data.startswith(b"\n"):
                data = data[1:]  # the "\n" of a "\r\n" the chunk boundary split: that line ended already
            self._cr = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        first = data.find(b"\n")
        if first < 0:
            self._extend(data)
            return
        self._extend(data[:first])
        last = data.rfind(b"\n")
        too_long = _long_line(data, first + 1, last, self._limits.max_line_bytes)
        if too_long >= 0:
            number = self._line + data.count(b"\n", first, too_long)
            raise self._too_long(number, data[too_long : too_long + _HEAD_BYTES])
        self._line += data.count(b"\n", first, last + 1)
        self._run, self._head = 0, b""
        self._extend(data[last + 1 :])

    def _extend(self, piece: bytes) -> None:
        """More bytes of the line being read."""
        if len(self._head) < _HEAD_BYTES:
            self._head += piece[: _HEAD_BYTES - len(self._head)]
        self._run += len(piece)
        if self._run > self._limits.max_line_bytes:
            raise self._too_long(self._line, self._head)

    def _too_long(self, number: int, head: bytes) -> FileRefused:
        text = excerpt(head.decode("utf-8", "replace"))
        text += "" if text.endswith("…") else "…"  # the line goes on past what is kept of it
        return FileRefused(f"line longer than max_line_bytes ({self._limits.max_line_bytes}): {text}", number)


def _long_line(data: bytes, start: int, end: int, limit: int) -> int:
    """Where a line longer than limit starts in data[start:end] (whole lines), or -1.

    Jumps a window of limit + 1 bytes at a time to the last line end inside it: a window
    without one holds part of a line that is too long.  No copies, len / limit steps."""
    at = start
    while end - at > limit:
        line_end = data.rfind(b"\n", at, at + limit + 1)
        if line_end < 0:
            return at
        at = line_end + 1
    return -1
