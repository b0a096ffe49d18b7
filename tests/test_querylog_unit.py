"""blockd.querylog.QueryLog, without its writer thread: the test calls flush() itself.

Groups and verdicts are small fakes (the query log reads only their names), except for one
test that builds a real policy from a tiny config to keep the fakes honest.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from dnslib import DNSRecord
from twisted.logger import LogLevel, globalLogPublisher

from blockd import querylog, wire
from blockd.config import parse_config
from blockd.policy import build_policy
from blockd.querylog import QueryLog, client_ip_formatter

NOW = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z, exact in binary


@dataclass(frozen=True)
class FakeGroup:
    name: str


@dataclass(frozen=True)
class FakeVerdict:
    list_name: str
    domain: str
    action: str
    via: str = "question"


GOV = FakeGroup("government")
SINKHOLED = FakeVerdict("tiktok", "tiktok.com", "sinkhole")
MONITORED = FakeVerdict("tiktok", "tiktok.com", "monitor")


def query(name: str = "WWW.TikTok.com", qtype: str = "AAAA") -> wire.Query:
    parsed = wire.parse_query(DNSRecord.question(name, qtype).pack())
    assert parsed is not None
    return parsed


class Counters:
    def __init__(self) -> None:
        self.errors = 0
        self.drops = 0
        self.lines: list[int] = []

    def error(self) -> None:
        self.errors += 1

    def drop(self) -> None:
        self.drops += 1


def make_log(path: Path | str = "-", mode: str = "all", client_ip: str = "full", counters: Counters | None = None):
    counters = counters or Counters()
    log = QueryLog(
        mode,
        str(path),
        client_ip,
        on_error=counters.error,
        on_drop=counters.drop,
        on_line=counters.lines.append,
        clock_ns=lambda: round(NOW * 1000) * 1_000_000,
    )
    return log, counters


def records(log: QueryLog) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.pending_lines()]


def release(log: QueryLog) -> None:
    """Close the log's file through its public API (a reopen closes it at the next flush)."""
    log.reopen()
    log.flush()


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- what gets logged --------------------------------------------------------------------------


def test_mode_none_logs_nothing() -> None:
    log, _ = make_log(mode="none")
    log.answered("192.0.2.1", GOV, query(), SINKHOLED, wire.RCODE_NOERROR)
    log.answered("192.0.2.1", GOV, query(), None, wire.RCODE_NOERROR)
    log.answered("192.0.2.1", None, query(), None, wire.RCODE_REFUSED, denied=True)
    assert list(log.queue) == []


def test_mode_blocked_logs_listed_names_and_denied_clients_only() -> None:
    log, _ = make_log(mode="blocked")
    log.answered("192.0.2.1", GOV, query(), None, wire.RCODE_NOERROR)  # forwarded: private by default
    log.answered("192.0.2.1", GOV, query(), SINKHOLED, wire.RCODE_NOERROR)
    log.answered("192.0.2.1", GOV, query(), MONITORED, wire.RCODE_NOERROR)
    log.answered("203.0.113.9", None, query(), None, wire.RCODE_REFUSED, denied=True)
    assert [r["action"] for r in records(log)] == ["sinkhole", "monitor", "denied"]


def test_mode_all_also_logs_forwarded_queries() -> None:
    log, _ = make_log(mode="all")
    log.answered("192.0.2.1", GOV, query(), None, wire.RCODE_NOERROR)
    log.answered("192.0.2.1", GOV, query(), SINKHOLED, wire.RCODE_NOERROR)
    assert [r["action"] for r in records(log)] == ["forward", "sinkhole"]


def test_a_blocked_line_has_every_field() -> None:
    log, _ = make_log()
    log.answered("192.0.2.1", GOV, query("WWW.TikTok.com", "AAAA"), SINKHOLED, wire.RCODE_NOERROR)
    (line,) = log.pending_lines()
    assert json.loads(line) == {
        "ts": "2023-11-14T22:13:20.250Z",
        "client": "192.0.2.1",
        "group": "government",
        "qname": "www.tiktok.com",
        "qtype": "AAAA",
        "action": "sinkhole",
        "list": "tiktok",
        "domain": "tiktok.com",
        "via": "question",
        "rcode": "NOERROR",
        "transport": "udp",
        "duration_ms": 0,
    }
    assert "\n" not in line and ": " not in line  # one compact object per line


def test_forwarded_denied_and_groupless_lines() -> None:
    log, _ = make_log()
    log.answered("192.0.2.1", None, query("example.com", "A"), None, wire.RCODE_SERVFAIL)
    log.answered("203.0.113.9", None, query("example.com", "MX"), None, wire.RCODE_REFUSED, denied=True)
    forwarded, denied = records(log)
    assert (forwarded["group"], forwarded["action"], forwarded["list"], forwarded["domain"]) == (
        "none",
        "forward",
        None,
        None,
    )
    assert (forwarded["qtype"], forwarded["rcode"]) == ("A", "SERVFAIL")
    assert (denied["action"], denied["qtype"], denied["rcode"], denied["client"]) == (
        "denied",
        "MX",
        "REFUSED",
        "203.0.113.9",
    )


def test_types_by_mnemonic_or_rfc3597_and_unknown_rcodes_as_numbers() -> None:
    log, _ = make_log()
    log.answered("192.0.2.1", GOV, query("example.com", "NAPTR"), None, 9)
    log.answered("192.0.2.1", GOV, query("example.com", "TYPE666"), None, 0)
    naptr, unknown = records(log)
    assert (naptr["qtype"], naptr["rcode"]) == ("NAPTR", "9")
    assert unknown["qtype"] == "TYPE666"


def test_answers_from_the_header_alone_are_logged_in_all_mode() -> None:
    log, _ = make_log(mode="all")
    log.unreadable("192.0.2.1", GOV, None, 0, 1)  # FORMERR: no question read
    log.unreadable("192.0.2.1", None, "example.com", 1, 16)  # BADVERS: the question was read
    formerr, badvers = records(log)
    assert (formerr["qname"], formerr["qtype"], formerr["action"], formerr["rcode"]) == (None, None, "error", "FORMERR")
    assert formerr["group"] == GOV.name
    assert (badvers["qname"], badvers["qtype"], badvers["rcode"], badvers["group"]) == (
        "example.com",
        "A",
        "BADVERS",
        "none",
    )
    quiet, _ = make_log(mode="blocked")
    quiet.unreadable("192.0.2.1", GOV, None, 0, 1)
    assert records(quiet) == []


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1_700_000_000.0, "2023-11-14T22:13:20.000Z"),
        (1_700_000_000.5, "2023-11-14T22:13:20.500Z"),
        (1_700_000_059.875, "2023-11-14T22:14:19.875Z"),
    ],
)
def test_timestamp_is_iso_8601_utc_with_milliseconds(now: float, expected: str) -> None:
    log = QueryLog("all", "-", clock_ns=lambda: round(now * 1000) * 1_000_000)
    log.answered("192.0.2.1", GOV, query(), None, 0)
    stamp = records(log)[0]["ts"]
    assert stamp == expected
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
    assert datetime.fromisoformat(stamp) == datetime.fromtimestamp(now, UTC)


def test_real_policy_objects(tmp_path: Path) -> None:
    (tmp_path / "tiktok.txt").write_text("tiktok.com\n")
    config = parse_config(
        """
        [upstream]
        servers = ["127.0.0.1:53"]

        [lists.tiktok]
        path = "tiktok.txt"

        [groups.government]
        networks = ["192.0.2.0/24"]
        lists = ["tiktok"]
        action = "nxdomain"
        """,
        "test.toml",
        tmp_path,
    )
    policy = build_policy(config)
    group = policy.groups["government"]
    verdict = policy.check(group, "www.tiktok.com")
    assert verdict is not None
    log, _ = make_log(mode="blocked")
    log.answered("192.0.2.1", group, query("www.tiktok.com", "A"), verdict, wire.RCODE_NXDOMAIN)
    (record,) = records(log)
    assert (record["group"], record["action"], record["list"], record["domain"], record["rcode"]) == (
        "government",
        "nxdomain",
        "tiktok",
        "tiktok.com",
        "NXDOMAIN",
    )


# --- client_ip ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ("192.0.2.77", "192.0.2.0"),
        ("10.1.2.3", "10.1.2.0"),
        ("2001:db8:abcd:1234:5678::9", "2001:db8:abcd::"),
        ("::ffff:192.0.2.77", "192.0.2.0"),
        ("fe80::1:2:3:4%eth0", "fe80::"),
    ],
)
def test_client_ip_truncate(client: str, expected: str) -> None:
    log, _ = make_log(client_ip="truncate")
    log.answered(client, GOV, query(), SINKHOLED, 0)
    assert records(log)[0]["client"] == expected


def test_client_ip_full_keeps_the_address() -> None:
    assert client_ip_formatter("full")("2001:db8::1") == "2001:db8::1"


def test_client_ip_hash_is_stable_within_one_log_and_hides_the_address() -> None:
    log, _ = make_log(client_ip="hash")
    for client in ["192.0.2.77", "192.0.2.77", "192.0.2.78", "2001:db8::1"]:
        log.answered(client, GOV, query(), SINKHOLED, 0)
    first, again, neighbour, v6 = (r["client"] for r in records(log))
    assert first == again
    assert len({first, neighbour, v6}) == 3
    for hashed in (first, neighbour, v6):
        assert re.fullmatch(r"[0-9a-f]+", hashed)
        assert "192.0.2" not in hashed and "2001" not in hashed


def test_client_ip_hash_is_keyed_per_log() -> None:
    # A fresh random key per process: hashes cannot be reversed by hashing every IPv4 address.
    assert client_ip_formatter("hash")("192.0.2.77") != client_ip_formatter("hash")("192.0.2.77")


# --- flush, reopen, errors, limits -------------------------------------------------------------


def test_flush_writes_one_line_per_query(tmp_path: Path) -> None:
    path = tmp_path / "queries.jsonl"
    log, counters = make_log(path)
    log.answered("192.0.2.1", GOV, query("a.tiktok.com"), SINKHOLED, 0)
    log.answered("192.0.2.2", GOV, query("b.tiktok.com"), SINKHOLED, 0)
    log.flush()
    assert [r["qname"] for r in read_lines(path)] == ["a.tiktok.com", "b.tiktok.com"]
    assert path.read_text().endswith("\n")
    assert list(log.queue) == []
    assert counters.lines == [2]

    log.answered("192.0.2.3", GOV, query("c.tiktok.com"), SINKHOLED, 0)
    log.flush()
    log.flush()  # nothing queued: no empty write, no count
    assert [r["qname"] for r in read_lines(path)] == ["a.tiktok.com", "b.tiktok.com", "c.tiktok.com"]
    assert counters.lines == [2, 1]
    assert (counters.errors, counters.drops) == (0, 0)
    release(log)


def test_an_empty_flush_creates_no_file(tmp_path: Path) -> None:
    path = tmp_path / "queries.jsonl"
    log, counters = make_log(path)
    log.flush()
    assert not path.exists()
    assert counters.lines == []


def test_flush_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "queries.jsonl"
    path.write_text('{"earlier":true}\n')
    log, _ = make_log(path)
    log.answered("192.0.2.1", GOV, query(), SINKHOLED, 0)
    log.flush()
    assert len(read_lines(path)) == 2
    release(log)


def test_stdout_path(capsys: pytest.CaptureFixture[str]) -> None:
    log, counters = make_log("-")
    log.answered("192.0.2.1", GOV, query(), SINKHOLED, 0)
    log.flush()
    assert json.loads(capsys.readouterr().out)["qname"] == "www.tiktok.com"
    assert counters.lines == [1]


def test_reopen_after_a_rename_writes_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "queries.jsonl"
    rotated = tmp_path / "queries.jsonl.1"
    log, _ = make_log(path)
    log.answered("192.0.2.1", GOV, query("before.tiktok.com"), SINKHOLED, 0)
    log.flush()
    path.rename(rotated)  # logrotate

    log.answered("192.0.2.1", GOV, query("late.tiktok.com"), SINKHOLED, 0)
    log.flush()  # no SIGHUP yet: the open file (now rotated) still gets the line
    assert not path.exists()

    log.reopen()
    log.answered("192.0.2.1", GOV, query("after.tiktok.com"), SINKHOLED, 0)
    log.flush()
    assert [r["qname"] for r in read_lines(rotated)] == ["before.tiktok.com", "late.tiktok.com"]
    assert [r["qname"] for r in read_lines(path)] == ["after.tiktok.com"]
    release(log)


def test_a_write_error_is_counted_once_per_flush_and_each_line_dropped(tmp_path: Path) -> None:
    log, counters = make_log(tmp_path)  # a directory: every open fails
    for _ in range(3):
        log.answered("192.0.2.1", GOV, query(), SINKHOLED, 0)
    log.flush()
    assert (counters.errors, counters.drops, counters.lines) == (1, 3, [])
    assert list(log.queue) == []

    log.answered("192.0.2.1", GOV, query(), SINKHOLED, 0)  # the hot path never notices
    log.answered("192.0.2.1", GOV, query(), None, 0, denied=True)
    log.flush()
    assert (counters.errors, counters.drops) == (2, 5)
    log.flush()  # nothing to write: no error
    assert counters.errors == 2


def test_writing_resumes_when_the_error_clears(tmp_path: Path) -> None:
    path = tmp_path / "not-yet" / "queries.jsonl"
    log, counters = make_log(path)
    log.answered("192.0.2.1", GOV, query("lost.tiktok.com"), SINKHOLED, 0)
    log.flush()
    assert (counters.errors, counters.drops) == (1, 1)

    path.parent.mkdir()
    log.answered("192.0.2.1", GOV, query("kept.tiktok.com"), SINKHOLED, 0)
    log.flush()
    assert [r["qname"] for r in read_lines(path)] == ["kept.tiktok.com"]
    assert counters.lines == [1]
    assert counters.errors == 1
    release(log)


def test_a_lasting_write_error_is_logged_once(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "blockd.querylog" and event.get("log_level") == LogLevel.error:
            events.append(event)

    log, _ = make_log(tmp_path)
    globalLogPublisher.addObserver(observe)
    try:
        for _ in range(3):
            log.answered("192.0.2.1", GOV, query(), SINKHOLED, 0)
            log.flush()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert len(events) == 1


def test_a_full_queue_drops_and_counts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(querylog, "QUEUE_LIMIT", 3)
    path = tmp_path / "queries.jsonl"
    log, counters = make_log(path)
    for index in range(5):
        log.answered("192.0.2.1", GOV, query(f"n{index}.tiktok.com"), SINKHOLED, 0)
    assert len(log.queue) == 3
    assert counters.drops == 2

    log.flush()
    log.answered("192.0.2.1", GOV, query("n5.tiktok.com"), SINKHOLED, 0)
    log.flush()
    assert [r["qname"] for r in read_lines(path)] == [
        "n0.tiktok.com",
        "n1.tiktok.com",
        "n2.tiktok.com",
        "n5.tiktok.com",
    ]
    assert counters.drops == 2
    release(log)


def test_filtered_queries_never_count_as_drops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(querylog, "QUEUE_LIMIT", 0)
    log, counters = make_log(mode="blocked")
    log.answered("192.0.2.1", GOV, query(), None, 0)  # not logged in this mode, so not dropped either
    assert counters.drops == 0
    log.answered("192.0.2.1", GOV, query(), SINKHOLED, 0)
    assert counters.drops == 1


def test_the_writer_thread_keeps_order_and_loses_nothing_on_stop(tmp_path: Path) -> None:
    """Repeats (kept tails) and full entries interleave; stop() writes all that is queued, in order."""
    path = tmp_path / "queries.jsonl"
    log, counters = make_log(path, mode="blocked")
    log.start()
    tail = querylog.line_tail(GOV, "kept.tiktok.com", 1, SINKHOLED, 0)
    for index in range(5000):
        if index % 2:
            log.repeated(f"192.0.2.{index % 200}", tail)
        else:
            log.answered(f"192.0.2.{index % 200}", GOV, query(f"n{index}.tiktok.com"), SINKHOLED, 0)
    log.stop()
    lines = read_lines(path)
    assert len(lines) == 5000 and sum(counters.lines) == 5000
    assert [line["client"] for line in lines] == [f"192.0.2.{index % 200}" for index in range(5000)]
    assert [line["qname"] for line in lines[:3]] == ["n0.tiktok.com", "kept.tiktok.com", "n2.tiktok.com"]


def test_lines_queued_across_a_reopen_all_reach_the_new_file(tmp_path: Path) -> None:
    path = tmp_path / "queries.jsonl"
    log, _ = make_log(path)
    log.answered("192.0.2.1", GOV, query("a.tiktok.com"), SINKHOLED, 0)
    log.flush()
    path.rename(tmp_path / "queries.jsonl.1")
    log.answered("192.0.2.1", GOV, query("b.tiktok.com"), SINKHOLED, 0)
    log.reopen()
    log.answered("192.0.2.1", GOV, query("c.tiktok.com"), SINKHOLED, 0)
    log.flush()
    assert [line["qname"] for line in read_lines(path)] == ["b.tiktok.com", "c.tiktok.com"]
    release(log)


def test_lines_say_the_transport_and_how_long_the_answer_took() -> None:
    log, _ = make_log(mode="all")
    log.answered("192.0.2.1", GOV, query(), None, wire.RCODE_NOERROR, transport="tcp", duration_ms=37)
    log.answered("192.0.2.1", GOV, query(), SINKHOLED, wire.RCODE_NOERROR)
    assert [(r["transport"], r["duration_ms"]) for r in records(log)] == [("tcp", 37), ("udp", 0)]
