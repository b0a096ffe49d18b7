"""Metrics over HTTP as Prometheus scrapes them, the query log, and /healthz."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request

import dns.message
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import GOV, OTHER, raw_udp

Sample = tuple[str, tuple[tuple[str, str], ...]]


def fetch(daemon, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(daemon) -> dict[Sample, float]:
    status, text = fetch(daemon, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def blocked(samples: dict[Sample, float], group: str, list_name: str, action: str) -> float:
    key = ("blockd_dns_blocked_total", (("action", action), ("group", group), ("list", list_name)))
    return samples.get(key, -1.0)


def test_blocked_counter_rises_by_exactly_n(make_daemon) -> None:
    daemon = make_daemon()
    before = scrape(daemon)
    assert blocked(before, "government", "tiktok", "sinkhole") == 0  # series exist at zero from start
    assert blocked(before, "government", "extra", "sinkhole") == 0
    assert blocked(before, "personal", "tiktok", "monitor") == 0
    n = 37
    for index in range(n):
        daemon.query(f"h{index}.tiktok.com", "A" if index % 2 else "HTTPS", source=GOV)
    for _ in range(3):
        daemon.query("www.tiktok.com", source=OTHER)  # not in a blocking group: not counted
        daemon.query("www.tiktok.com", source="127.0.0.4")  # monitor group: counted as monitor
    after = scrape(daemon)
    assert blocked(after, "government", "tiktok", "sinkhole") == n
    assert blocked(after, "personal", "tiktok", "monitor") == 3
    queries = ("blockd_dns_queries_total", (("group", "government"), ("transport", "udp")))
    assert after[queries] - before[queries] == n
    assert after[("blockd_list_domains", (("list", "extra"),))] == 3
    assert after[("blockd_build_info", (("version", "0.1.0"),))] == 1
    upstream = [k for k in after if k[0] == "blockd_upstream_requests_total" and ("result", "success") in k[1]]
    assert upstream and after[upstream[0]] >= 1  # repeated names come from the cache
    # No client address or query name ever appears as a label value.
    _, text = fetch(daemon, "/metrics")
    for client in (GOV, OTHER, "127.0.0.4"):
        assert client not in text
    assert "tiktok.com" not in text


def test_healthz(make_daemon) -> None:
    daemon = make_daemon()
    assert fetch(daemon, "/healthz") == (200, "ok\n")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_check_metrics_is_clean(make_daemon) -> None:
    daemon = make_daemon()
    daemon.query("www.tiktok.com", source=GOV)
    daemon.query("example.org", source=OTHER)
    _, text = fetch(daemon, "/metrics")
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_query_log_lines_are_json(make_daemon, tmp_path) -> None:
    daemon = make_daemon(log_queries="all")
    daemon.query("WWW.TikTok.com", "AAAA", source=GOV)
    daemon.query("example.org", "A", source=OTHER)
    daemon.query("www.tiktok.com", "A", source="127.0.0.4")
    path = tmp_path / "queries.jsonl"
    deadline = time.monotonic() + 5
    lines: list[str] = []
    records: list[dict] = []
    while time.monotonic() < deadline and len(records) < 3:
        lines = path.read_text().splitlines() if path.exists() else []
        records = [r for r in map(json.loads, lines) if r["client"] != "127.0.0.1"]  # not the start-up probe
        time.sleep(0.05)
    assert len(records) == 3
    first = records[0]
    assert {"ts", "client", "group", "qname", "qtype", "action", "list", "rcode"} <= set(first)
    assert first["client"] == GOV and first["group"] == "government" and first["qname"] == "www.tiktok.com"
    assert first["qtype"] == "AAAA" and first["action"] == "sinkhole" and first["list"] == "tiktok"
    assert first["domain"] == "tiktok.com" and first["rcode"] == "NOERROR"
    assert records[1]["action"] == "forward" and records[1]["group"] == "none" and records[1]["list"] is None
    assert records[2]["action"] == "monitor" and records[2]["group"] == "personal"


def test_query_log_unwritable_keeps_answering(make_daemon, tmp_path) -> None:
    (tmp_path / "queries.jsonl").mkdir()  # a directory where the log file should be: every write fails
    daemon = make_daemon()
    for _ in range(5):
        assert daemon.query("www.tiktok.com", source=GOV).answer[0][0].to_text() == "0.0.0.0"
    deadline = time.monotonic() + 5
    errors = 0.0
    while time.monotonic() < deadline and not errors:
        errors = scrape(daemon).get(("blockd_query_log_errors_total", ()), 0.0)
        time.sleep(0.1)
    assert errors >= 1
    assert daemon.log().count("cannot write") == 1  # logged once, not once per line


def test_query_log_all_mode_logs_error_answers_and_names_every_type(make_daemon, tmp_path) -> None:
    """FORMERR, NOTIMP and BADVERS answers are logged in `all` mode; types by mnemonic or TYPEn."""
    daemon = make_daemon(log_queries="all")
    good = dns.message.make_query("example.org", "A").to_wire()
    two = bytearray(good)
    two[5] = 2  # QDCOUNT 2: FORMERR
    assert raw_udp(daemon.port, bytes(two), source=GOV) is not None
    badvers = dns.message.make_query("edns1.example.org", "A", use_edns=1).to_wire()
    assert raw_udp(daemon.port, badvers, source=GOV) is not None
    daemon.query("odd.example.org", "TYPE666", source=GOV)
    path = tmp_path / "queries.jsonl"
    deadline = time.monotonic() + 5
    records: list[dict] = []
    while time.monotonic() < deadline and len(records) < 3:
        lines = path.read_text().splitlines() if path.exists() else []
        records = [r for r in map(json.loads, lines) if r["client"] != "127.0.0.1"]  # not the start-up probe
        time.sleep(0.05)
    formerr, bad, odd = records
    assert (formerr["action"], formerr["rcode"], formerr["qname"]) == ("error", "FORMERR", None)
    assert formerr["group"] == "government"
    assert (bad["action"], bad["rcode"], bad["qname"], bad["qtype"]) == ("error", "BADVERS", "edns1.example.org", "A")
    assert odd["qtype"] == "TYPE666"
