"""Files that must not hurt the daemon: FIFOs, devices, huge files and lines, NUL in a path, and a
query log on a full disk.

Unit tests for blockd.bounded_read (the same lines as open(), bounds found at any chunk boundary),
the config's path checks and list bounds, the error quoting and caps, and the query log's
partial-line recovery with a fake file that fails mid-write; then `blockd check`, `blockd run` and
a running daemon's SIGHUP and SIGTERM against the real files.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from dnslib import DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel, globalLogPublisher

from blockd import bounded_read, cli, querylog, wire, zone_store
from blockd.bounded_read import FileRefused, ReadLimits, open_regular, open_text, read_bytes
from blockd.config import ConfigError, ListConfig, load_config, parse_config
from blockd.excerpt import excerpt
from blockd.lists import MAX_LINE_ERRORS, ListLoadError, load_list
from blockd.querylog import QueryLog
from blockd.reload import status_path_for
from blockd.rpz import parse_zone_file
from blockd.sources import load_source
from blockd.tsig_key import KeyFileError, load_key_file
from tests.daemon import GOV, REPO, free_port
from tests.test_querylog_unit import Counters

FIFTY_MB = 50 * 1024 * 1024


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def zero_link(path: Path) -> Path:
    path.symlink_to("/dev/zero")
    return path


def huge_line(path: Path, size: int = FIFTY_MB) -> Path:
    with open(path, "wb") as handle:
        handle.write(b"ok.example\n")
        handle.truncate(size)  # a sparse file: the rest of it, one line of NUL bytes, costs no disk
    return path


# --- blockd.bounded_read ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "kind"),
    [(fifo, "FIFO"), (zero_link, "character device"), (lambda path: (path.mkdir(), path)[1], "directory")],
    ids=["fifo", "dev-zero", "directory"],
)
def test_only_regular_files_are_read_and_never_waited_for(tmp_path: Path, make: Any, kind: str) -> None:
    path = make(tmp_path / "list.txt")
    started = time.monotonic()
    with pytest.raises(FileRefused) as refused:
        open_regular(path, ReadLimits())
    assert refused.value.message == f"not a regular file ({kind})"
    assert time.monotonic() - started < 1.0  # a FIFO open without O_NONBLOCK would wait for a writer


def test_a_huge_line_is_refused_after_reading_the_bound_only(tmp_path: Path) -> None:
    path = huge_line(tmp_path / "huge.txt")
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(FileRefused) as refused, open_text(path, ReadLimits()) as lines:
            list(lines)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 1.0
    assert peak < 8 * 1024 * 1024  # a chunk or two, never the 50 MB line
    assert refused.value.line == 2
    assert refused.value.message == f"line longer than max_line_bytes (4096): {excerpt(chr(0) * 101)}"


def test_a_file_over_max_bytes_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_text("a.example\n" * 200)
    with pytest.raises(FileRefused) as refused:
        open_regular(path, ReadLimits(max_bytes=1000))
    assert refused.value.message == "2000 bytes, more than max_bytes (1000)"


def test_a_file_larger_than_its_size_says_is_stopped_at_max_bytes() -> None:
    # /proc files say size 0 and yield more: the bound is counted while reading as well.
    with pytest.raises(FileRefused) as refused:
        read_bytes("/proc/self/maps", ReadLimits(max_bytes=64, max_line_bytes=10**6))
    assert refused.value.message == "more than max_bytes (64) bytes"


@pytest.mark.parametrize(
    ("text", "limit", "line"),
    [
        ("abcd\n", 4, None),  # exactly the bound: the line end is not counted
        ("abcde\n", 4, 1),
        ("ab\r\nabcd\r\nab\r\nabcde", 4, 4),  # the last line has no line end
        ("ab\rab\rabcdef\r", 4, 3),  # old Mac line ends count as line ends
        ("a\n" * 3 + "b" * 9 + "\n" + "c\n", 8, 4),  # a line inside a chunk
    ],
)
def test_line_bound(tmp_path: Path, text: str, limit: int, line: int | None) -> None:
    path = tmp_path / "list.txt"
    path.write_bytes(text.encode())
    limits = ReadLimits(max_line_bytes=limit)
    if line is None:
        with open_text(path, limits) as lines:
            assert "".join(lines) == text
        return
    with pytest.raises(FileRefused) as refused, open_text(path, limits) as lines:
        list(lines)
    assert refused.value.line == line


TEXT_PIECES = ["a", "bc", "\n", "\r", "\r\n", "\x0c", "\u2028", "\x85", "é", "\udcff", "\ufeff"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TEXT_PIECES), max_size=40), st.integers(1, 9))
def test_lines_are_the_ones_open_gives(pieces: list[str], chunk: int) -> None:
    data = "".join(pieces).encode("utf-8", "surrogateescape")
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "list.txt"
        path.write_bytes(data)
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            expected = list(handle)
        old = bounded_read._CHUNK_BYTES
        bounded_read._CHUNK_BYTES = chunk  # every chunk boundary: inside "\r\n", inside a UTF-8 sequence
        try:
            with open_text(path, ReadLimits()) as lines:
                assert list(lines) == expected
        finally:
            bounded_read._CHUNK_BYTES = old


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "aa", "\n", "\r", "\r\n"]), max_size=40), st.integers(1, 5), st.integers(1, 9))
def test_the_line_bound_finds_the_first_long_line_at_any_chunk_size(pieces: list[str], limit: int, chunk: int) -> None:
    text = "".join(pieces)
    lengths = [len(line) for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    expected = next((number for number, length in enumerate(lengths, start=1) if length > limit), None)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "list.txt"
        path.write_text(text, newline="")
        old = bounded_read._CHUNK_BYTES
        bounded_read._CHUNK_BYTES = chunk
        try:
            with open_text(path, ReadLimits(max_line_bytes=limit)) as lines:
                list(lines)
            found = None
        except FileRefused as refused:
            found = refused.line
        finally:
            bounded_read._CHUNK_BYTES = old
    assert found == expected


# --- lists, zone files, key files, stored copies ----------------------------------------------


def test_list_errors_name_the_file_and_the_reason(tmp_path: Path) -> None:
    for make, reason in [(fifo, "not a regular file (FIFO)"), (zero_link, "not a regular file (character device)")]:
        path = make(tmp_path / f"{make.__name__}.txt")
        with pytest.raises(ListLoadError) as refused:
            load_source(ListConfig("x", path))
        assert [str(e) for e in refused.value.errors] == [f"{path}: cannot read list: {reason}"]


def test_a_huge_line_error_quotes_100_characters(tmp_path: Path) -> None:
    path = tmp_path / "huge.txt"
    path.write_text("ok.example\n" + "x" * 10_000 + "\n")
    with pytest.raises(ListLoadError) as refused:
        load_source(ListConfig("x", path))
    message = f"{path}:2: line longer than max_line_bytes (4096): {excerpt('x' * 101)}"
    assert [str(e) for e in refused.value.errors] == [message]
    assert len(message) < len(str(path)) + 160


def test_a_list_sets_its_own_bounds(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_text("a.example\n# " + "b" * 5000 + "\n")
    with pytest.raises(ListLoadError):
        load_source(ListConfig("x", path))
    assert load_source(ListConfig("x", path, max_line_bytes=8000)).domains == {"a.example"}
    with pytest.raises(ListLoadError) as refused:
        load_source(ListConfig("x", path, max_bytes=100))
    assert "more than max_bytes (100)" in str(refused.value)


def test_a_bad_line_is_quoted_at_most_100_characters_in_lists_and_zones(tmp_path: Path) -> None:
    bad = "bad name " + "y" * 3000
    path = tmp_path / "list.txt"
    path.write_text(f"{bad}\n{'z' * 70}..{'z' * 900}\n")
    with pytest.raises(ListLoadError) as refused:
        load_list("x", path)
    assert all(len(e.message) < 250 for e in refused.value.errors), refused.value.errors
    assert excerpt(bad) in refused.value.errors[0].message
    zone = (
        "$ORIGIN rpz.example.\n@ 300 SOA ns. host. 1 1 1 1 1\n" + f"{'q' * 2000} CNAME .\n" + f"a 300 A {'9' * 2000}\n"
    )
    _, errors = parse_zone_file(zone.splitlines(keepends=True), "z.rpz")
    assert len(errors) == 2 and all(len(e.message) < 250 for e in errors), errors


def test_a_file_of_bad_lines_keeps_the_first_hundred_errors_and_a_count(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_text("not a domain\n" * 5000)
    with pytest.raises(ListLoadError) as refused:
        load_list("x", path)
    errors = refused.value.errors
    assert len(errors) == MAX_LINE_ERRORS + 1
    assert str(errors[-1]) == f"{path}: ... and {5000 - MAX_LINE_ERRORS} more errors"
    # `blockd check` counts the ones not kept with the rest.
    assert cli.cap_per_file([str(e) for e in errors])[-1] == f"{path}: ... and 4980 more errors"


def test_an_rpz_zone_file_is_bounded_too(tmp_path: Path) -> None:
    path = tmp_path / "feed.rpz"
    path.write_text("$ORIGIN rpz.example.\n@ 300 SOA ns. host. 1 1 1 1 1\n" + "a" * 5000 + " CNAME .\n")
    with pytest.raises(ListLoadError) as refused:
        load_source(ListConfig("x", path, format="rpz"))
    assert [e.line for e in refused.value.errors] == [3]
    with pytest.raises(ListLoadError) as refused:
        load_source(ListConfig("x", fifo(tmp_path / "fifo.rpz"), format="rpz"))
    assert str(refused.value) == f"{tmp_path / 'fifo.rpz'}: cannot read zone file: not a regular file (FIFO)"


def test_an_exact_list_read_again_unchanged_keeps_its_entries(tmp_path: Path) -> None:
    path = tmp_path / "hosts.txt"
    path.write_text("0.0.0.0 a.example\n0.0.0.0 b.example\n")
    config = ListConfig("hosts", path, match="exact")
    first = load_source(config)
    again = load_source(config, first)
    assert again is first and set(again.exact) == {"a.example", "b.example"}
    # ... and read as subtree entries once the config says so, although the file is the same.
    assert set(load_source(ListConfig("hosts", path), first).domains) == {"a.example", "b.example"}


def test_key_files_and_stored_copies_must_be_regular_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as refused:
        load_key_file(fifo(tmp_path / "rpz.key"))
    assert str(refused.value) == f"{tmp_path / 'rpz.key'}: cannot read the key file: not a regular file (FIFO)"
    with pytest.raises(KeyFileError, match=r"not a regular file \(character device\)"):
        load_key_file(zero_link(tmp_path / "zero.key"))
    fifo(zone_store.copy_path(tmp_path, "feed"))
    with pytest.raises(ValueError, match=r"feed\.rpz: cannot read the stored copy: not a regular file \(FIFO\)"):
        zone_store.load(tmp_path, "feed", "rpz.example")


# --- the config ---------------------------------------------------------------------------------

NUL_PATHS = [
    ("lists.x.path", '[lists.x]\npath = "a\\u0000b"\n'),
    ("lists.x.tsig", '[lists.x]\nzone = "rpz.example"\nprimaries = ["127.0.0.1"]\ntsig = "k\\u0000"\n'),
    ("server.pidfile", '[server]\npidfile = "/run/\\u0000"\n'),
    ("server.state_dir", '[server]\nstate_dir = "/var/\\u0000"\n'),
    ("log.path", '[log]\npath = "q\\u0000.jsonl"\n'),
    ("dnstap.socket", '[dnstap]\nsocket = "unix:/run/\\u0000"\n'),
    ("dnstap.file", '[dnstap]\nfile = "t\\u0000"\n'),
    ("egress.prefixes[0]", '[egress]\nprefixes = ["p\\u0000"]\n'),
    (
        "groups.g.block_answer_prefixes[0]",
        '[groups.g]\nnetworks = ["10.0.0.0/8"]\nblock_answer_prefixes = ["p\\u0000"]\n',
    ),
]


@pytest.mark.parametrize(("key", "toml"), NUL_PATHS, ids=[key for key, _ in NUL_PATHS])
def test_a_nul_in_any_path_is_a_config_error_naming_the_key(key: str, toml: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config('[upstream]\nservers = ["127.0.0.1:5399"]\n' + toml, "blockd.toml", Path("/etc/blockd"))
    assert any(e.startswith(f"blockd.toml: {key}: ") and "NUL" in e for e in refused.value.errors), refused.value


@pytest.mark.parametrize(
    ("text", "problem"),
    [("a\\nb.txt", "control character (U+000A)"), ("", "empty path"), ("a\\u007fb", "control character (U+007F)")],
)
def test_unusable_list_paths(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(f'[upstream]\nservers = ["127.0.0.1:5399"]\n[lists.x]\npath = "{text}"\n', "c.toml", Path("/"))
    assert refused.value.errors[0].startswith("c.toml: lists.x.path: ") and problem in refused.value.errors[0]


def test_list_bound_keys() -> None:
    base = '[upstream]\nservers = ["127.0.0.1:5399"]\n'
    config = parse_config(base + '[lists.x]\npath = "x"\nmax_bytes = 1000\nmax_line_bytes = 512\n', "c", Path("/"))
    assert (config.lists["x"].max_bytes, config.lists["x"].max_line_bytes) == (1000, 512)
    default = parse_config(base + '[lists.x]\npath = "x"\n', "c", Path("/")).lists["x"]
    assert (default.max_bytes, default.max_line_bytes) == (268435456, 4096)
    with pytest.raises(ConfigError) as refused:
        parse_config(base + '[lists.x]\npath = "x"\nmax_line_bytes = 0\nmax_bytes = "big"\n', "c", Path("/"))
    assert refused.value.errors == [
        "c: lists.x.max_bytes: must be an integer, not a string",
        "c: lists.x.max_line_bytes: 0 is out of range 16..16777216",
    ]
    with pytest.raises(ConfigError) as refused:
        zone = '[lists.x]\nzone = "rpz.example"\nprimaries = ["127.0.0.1"]\nmax_bytes = 10\n'
        parse_config(base + zone, "c", Path("/"))
    assert refused.value.errors == ["c: lists.x.max_bytes: only for a list read from a file (set path)"]


def test_list_names_that_cannot_name_a_file() -> None:
    base = '[upstream]\nservers = ["127.0.0.1:5399"]\n'
    with pytest.raises(ConfigError) as refused:
        parse_config(base + '[lists."a\\u0000b"]\npath = "x"\n', "c", Path("/"))
    assert refused.value.errors == ["c: lists.'a\\x00b': a list name must be printable text"]
    with pytest.raises(ConfigError) as refused:
        parse_config(base + '[lists."../etc"]\nzone = "rpz.example"\nprimaries = ["127.0.0.1"]\n', "c", Path("/"))
    assert refused.value.errors == [
        "c: lists.../etc: '../etc': a transferred list's name names its copy in server.state_dir"
    ]


def test_the_config_file_itself_must_be_a_regular_file(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError) as refused:
        load_config(fifo(tmp_path / "blockd.toml"))
    assert refused.value.errors == [f"{tmp_path / 'blockd.toml'}: cannot read config: not a regular file (FIFO)"]
    assert time.monotonic() - started < 1.0


# --- the query log on a full disk ------------------------------------------------------------


class Disk:
    """A file system with `room` bytes left."""

    def __init__(self, room: int):
        self.room = room


class FillingFile:
    """A log file on a Disk: a write takes what fits, the next one fails with ENOSPC, as write(2)
    does on a full file system."""

    def __init__(self, path: Path, disk: Disk):
        self.real = open(path, "ab", buffering=0)
        self.disk = disk

    def write(self, data: bytes) -> int:
        if self.disk.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        part = bytes(data[: self.disk.room])
        self.disk.room -= len(part)
        return self.real.write(part)

    def flush(self) -> None:
        pass

    def seek(self, offset: int, whence: int) -> int:
        return self.real.seek(offset, whence)

    def truncate(self, size: int) -> int:
        return self.real.truncate(size)

    def close(self) -> None:
        self.real.close()


class Group:
    name = "government"


class Verdict:
    list_name, domain, action, via = "tiktok", "tiktok.com", "sinkhole", None


def disk_log(path: Path, disk: Disk, clock: list[float] | None = None) -> tuple[QueryLog, Counters]:
    counters = Counters()
    log = QueryLog(
        "blocked",
        str(path),
        on_error=counters.error,
        on_drop=counters.drop,
        on_line=counters.lines.append,
        clock_ns=lambda: 1_700_000_000_000_000_000,
        monotonic=(lambda: clock[0]) if clock is not None else time.monotonic,
        opener=lambda name: FillingFile(Path(name), disk),  # type: ignore[arg-type,return-value]
    )
    return log, counters


def log_queries(log: QueryLog, *names: str) -> None:
    for name in names:
        parsed = wire.parse_query(DNSRecord.question(name, "A").pack())
        assert parsed is not None
        log.answered("192.0.2.1", Group(), parsed, Verdict(), 0)  # type: ignore[arg-type]


def json_lines(path: Path) -> list[str]:
    """Every line's qname; fails unless the file is whole JSON lines only."""
    text = path.read_text()
    assert text == "" or text.endswith("\n"), repr(text[-80:])
    return [json.loads(line)["qname"] for line in text.splitlines()]


def test_a_write_cut_short_is_completed_at_the_next_write(tmp_path: Path) -> None:
    path, disk = tmp_path / "queries.jsonl", Disk(0)
    log, counters = disk_log(path, disk)
    log_queries(log, "a.example", "b.example", "c.example")
    line = len(log.pending_lines()[0]) + 1
    disk.room = line + line // 2  # one line and half of the next fit
    log.flush()
    assert path.read_bytes().count(b"\n") == 1 and not path.read_bytes().endswith(b"\n")  # b cut in two
    assert (counters.errors, counters.lines, counters.drops) == (1, [1], 1)  # c lost, b waits

    disk.room = 10**6  # space again
    log_queries(log, "d.example")
    log.flush()
    assert json_lines(path) == ["a.example", "b.example", "d.example"]
    assert (counters.errors, counters.lines, counters.drops) == (1, [1, 2], 1)


def test_a_full_disk_keeps_failing_without_a_partial_line_growing(tmp_path: Path) -> None:
    path, disk = tmp_path / "queries.jsonl", Disk(10)
    log, counters = disk_log(path, disk)
    log_queries(log, "a.example")
    log.flush()
    for _ in range(3):
        log_queries(log, "more.example")
        log.flush()  # the disk stays full: nothing written, each batch dropped and counted
    assert (counters.errors, counters.drops) == (4, 3)
    disk.room = 10**6
    log_queries(log, "b.example")
    log.flush()
    assert json_lines(path) == ["a.example", "b.example"]


@pytest.mark.parametrize("close", ["reopen", "stop"])
def test_a_partial_line_is_cut_off_when_the_file_is_closed_still_full(tmp_path: Path, close: str) -> None:
    path = tmp_path / "queries.jsonl"
    path.write_text('{"qname":"earlier.example"}\n')
    log, _ = disk_log(path, Disk(50))
    log_queries(log, "a.example", "b.example")
    log.flush()
    assert not path.read_text().endswith("\n")
    if close == "reopen":  # logrotate's SIGHUP
        log.reopen()
        log.flush()
    else:
        log.start()  # the writer thread's last step and finish: what stop() runs
        log.stop()
    assert json_lines(path) == ["earlier.example"]


def test_a_real_full_device_counts_each_failed_write_once(tmp_path: Path) -> None:
    counters = Counters()
    log = QueryLog("blocked", "/dev/full", on_error=counters.error, on_drop=counters.drop)
    log_queries(log, "a.example", "b.example")
    log.flush()
    log_queries(log, "c.example")
    log.flush()
    assert (counters.errors, counters.drops) == (2, 3)


def test_write_errors_are_logged_once_a_minute_however_they_flap(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "blockd.querylog" and event.get("log_level") == LogLevel.error:
            events.append(event)

    clock, disk = [1000.0], Disk(0)
    log, _ = disk_log(tmp_path / "queries.jsonl", disk, clock)
    globalLogPublisher.addObserver(observe)
    try:
        for step in range(20):  # fails, works, fails...: every 2 s for 40 s
            disk.room = 0 if step % 2 == 0 else 10**6
            log_queries(log, "a.example")
            log.flush()
            clock[0] += 2
        assert len(events) == 1
        clock[0] += querylog.ERROR_LOG_INTERVAL
        disk.room = 0
        log_queries(log, "a.example")
        log.flush()
        assert len(events) == 2
    finally:
        globalLogPublisher.removeObserver(observe)


# --- the real daemon: blockd check, blockd run, SIGHUP, SIGTERM -------------------------------


def write_config(tmp_path: Path, list_path: Path | str, list_extra: str = "", server_extra: str = "") -> Path:
    config = tmp_path / "blockd.toml"
    config.write_text(
        textwrap.dedent(
            f"""\
            [server]
            listen = ["127.0.0.1:{free_port()}"]
            {server_extra}
            [upstream]
            servers = ["127.0.0.1:{free_port()}"]
            [metrics]
            listen = ""
            [lists.bad]
            path = "{list_path}"
            {list_extra}
            [groups.government]
            networks = ["127.0.0.2/32"]
            lists = ["bad"]
            """
        )
    )
    return config


def blockd(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "blockd", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=timeout,
    )
    return result, time.monotonic() - started


HOSTILE = {
    "fifo": (lambda d: fifo(d / "list.txt"), "", "list.txt: cannot read list: not a regular file (FIFO)"),
    "dev-zero": (
        lambda d: zero_link(d / "list.txt"),
        "",
        "list.txt: cannot read list: not a regular file (character device)",
    ),
    "huge-line": (
        lambda d: huge_line(d / "list.txt"),
        "",
        "list.txt:2: line longer than max_line_bytes (4096): '\\x00\\x00",
    ),
    "over-max-bytes": (
        lambda d: (d / "list.txt", (d / "list.txt").write_text("a.example\n" * 500))[0],
        "max_bytes = 1000",
        "list.txt: cannot read list: 5000 bytes, more than max_bytes (1000)",
    ),
    "nul-in-path": (lambda d: "a\\u0000b.txt", "", "lists.bad.path: 'a\\x00b.txt': a path cannot contain a NUL byte"),
}


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_check_and_run_refuse_a_hostile_list_quickly(tmp_path: Path, command: str, case: str) -> None:
    make, extra, message = HOSTILE[case]
    config = write_config(tmp_path, make(tmp_path), extra)
    result, seconds = blockd(command, "--config", str(config))
    assert result.returncode == 1, result
    assert seconds < 15, seconds  # the Python start-up and imports; the refusal itself is immediate
    assert "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr
    assert len(result.stderr) < 2000, len(result.stderr)  # never the 50 MB line


def reload_and_wait(pidfile: Path) -> subprocess.CompletedProcess[str]:
    result, _ = blockd("reload", "--pidfile", str(pidfile), "--timeout", "30")
    return result


def test_a_running_daemon_refuses_a_hostile_reload_keeps_serving_and_stops_promptly(
    make_daemon: Any, tmp_path: Path, test_lists: Path
) -> None:
    pidfile = tmp_path / "blockd.pid"
    daemon = make_daemon(server_extra=f'pidfile = "{pidfile}"')
    assert [r.to_text() for rrset in daemon.query("blocked.example").answer for r in rrset] == ["0.0.0.0"]
    extra = test_lists / "extra.txt"
    status = status_path_for(pidfile)

    extra.unlink()
    fifo(extra)
    result = reload_and_wait(pidfile)
    assert result.returncode == 1 and f"{extra}: cannot read list: not a regular file (FIFO)" in result.stderr
    assert [r.to_text() for rrset in daemon.query("blocked.example", source=GOV).answer for r in rrset] == ["0.0.0.0"]

    extra.unlink()
    huge_line(extra)
    result = reload_and_wait(pidfile)
    assert result.returncode == 1 and f"{extra}:2: line longer than max_line_bytes (4096)" in result.stderr
    assert status.stat().st_size < 2000  # the status file quotes 100 characters, not 50 MB
    assert [r.to_text() for rrset in daemon.query("blocked.example").answer for r in rrset] == ["0.0.0.0"]

    extra.unlink()
    fifo(extra)  # SIGTERM while a reload meets a FIFO again
    daemon.signal()
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 5
    assert "Traceback" not in daemon.log()
