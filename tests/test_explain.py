"""`blockd explain`: the real policy code says why a name is blocked, for each kind of match; the
command's exit codes; the running daemon's /explain agreeing with it."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from blockd.config import load_config
from blockd.explain import ExplainError, explain, parse_qtype
from blockd.policy import build_policy
from tests.daemon import REPO

CONFIG = """
[server]
allow = ["10.0.0.0/8", "192.0.2.0/24"]

[upstream]
servers = ["127.0.0.1:5399"]

[lists.tiktok]
path = "tiktok.txt"

[lists.gov-rpz]
path = "gov.rpz"

[groups.government]
networks = ["10.120.0.0/16"]
lists = ["tiktok", "gov-rpz"]
allow = ["status.tiktok.com"]
action = "sinkhole"
ttl = 60

[groups.personal]
networks = ["192.0.2.0/25"]
lists = ["tiktok"]
action = "monitor"

[egress]
enabled = true
table = 1120
"""

RPZ = """\
$ORIGIN gov-rpz.example.
@ SOA ns.gov-rpz.example. hostmaster.gov-rpz.example. 1 3600 600 86400 300
@ NS ns.gov-rpz.example.
*.bytedance.com CNAME .
douyin.com CNAME *.
"""

GOV, PERSONAL, NO_GROUP, BARRED = "10.120.0.7", "192.0.2.50", "10.9.9.9", "203.0.113.9"


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    (tmp_path / "tiktok.txt").write_text("tiktok.com\n")
    (tmp_path / "gov.rpz").write_text(RPZ)
    path = tmp_path / "blockd.toml"
    path.write_text(CONFIG)
    return path


@pytest.mark.parametrize(
    ("name", "client", "qtype", "blocked", "group", "list_name", "entry", "action", "answer"),
    [
        ("WWW.TikTok.com.", GOV, "A", True, "government", "tiktok", "tiktok.com", "sinkhole", "A 0.0.0.0 (TTL 60)"),
        ("www.tiktok.com", GOV, "AAAA", True, "government", "tiktok", "tiktok.com", "sinkhole", "AAAA :: (TTL 60)"),
        ("www.tiktok.com", GOV, "MX", True, "government", "tiktok", "tiktok.com", "sinkhole", "NODATA"),
        ("a.bytedance.com", GOV, "A", True, "government", "gov-rpz", "*.bytedance.com", "nxdomain", "NXDOMAIN"),
        ("douyin.com", GOV, "A", True, "government", "gov-rpz", "douyin.com", "nodata", "NODATA"),
        ("bytedance.com", GOV, "A", False, "government", None, None, None, "no list of the group has it"),
        ("status.tiktok.com", GOV, "A", False, "government", None, None, None, "allow entry 'status.tiktok.com'"),
        ("www.tiktok.com", GOV, "DS", False, "government", None, None, None, "DNSSEC infrastructure"),
        ("www.tiktok.com", PERSONAL, "A", False, "personal", "tiktok", "tiktok.com", "monitor", "monitor"),
        ("www.tiktok.com", NO_GROUP, "A", False, None, None, None, None, "in no group"),
        ("www.tiktok.com", BARRED, "A", True, None, None, None, "refused", "REFUSED (EDE 18"),
    ],
)
def test_every_kind_of_match(
    config_path: Path,
    name: str,
    client: str,
    qtype: str,
    blocked: bool,
    group: str | None,
    list_name: str | None,
    entry: str | None,
    action: str | None,
    answer: str,
) -> None:
    found = explain(build_policy(load_config(config_path)), name, client, parse_qtype(qtype))
    assert (found.blocked, found.group, found.list, found.entry, found.action) == (
        blocked,
        group,
        list_name,
        entry,
        action,
    )
    assert answer in found.answer
    if name == "status.tiktok.com":
        assert found.exception == "status.tiktok.com"
    if blocked and group is not None:
        assert "table 1120" in found.egress  # egress on, learn = true (the default)


@pytest.mark.parametrize(("text", "value"), [("A", 1), ("aaaa", 28), ("TYPE666", 666), ("65", 65), ("https", 65)])
def test_types(text: str, value: int) -> None:
    assert parse_qtype(text) == value


@pytest.mark.parametrize("text", ["FOO", "TYPE0", "70000", ""])
def test_bad_types(text: str) -> None:
    with pytest.raises(ExplainError):
        parse_qtype(text)


def test_bad_name_and_client(config_path: Path) -> None:
    policy = build_policy(load_config(config_path))
    with pytest.raises(ExplainError, match="empty label"):
        explain(policy, "bad..name", GOV)
    with pytest.raises(ExplainError, match="not an IP address"):
        explain(policy, "tiktok.com", "somewhere")


def run_explain(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockd", "explain", *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_the_command_and_its_exit_codes(config_path: Path) -> None:
    blocked = run_explain("www.tiktok.com", "--client", GOV, "--config", str(config_path))
    assert blocked.returncode == 0, blocked.stderr
    assert "matched: entry tiktok.com on list tiktok, action sinkhole" in blocked.stdout
    assert "verdict: BLOCKED" in blocked.stdout
    passed = run_explain("example.org", "--client", GOV, "--qtype", "AAAA", "--config", str(config_path))
    assert passed.returncode == 1 and "verdict: not blocked" in passed.stdout
    bad = run_explain("www.tiktok.com", "--client", "nowhere", "--config", str(config_path))
    assert bad.returncode == 2 and "not an IP address" in bad.stderr and not bad.stdout
    (config_path.parent / "tiktok.txt").write_text("bad..name\n")
    broken = run_explain("www.tiktok.com", "--config", str(config_path))
    assert broken.returncode == 2 and f"{config_path.parent / 'tiktok.txt'}:1:" in broken.stderr


def get(port: int, query: dict[str, str]) -> tuple[int, dict[str, object]]:
    url = f"http://127.0.0.1:{port}/explain?{urllib.parse.urlencode(query)}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_running_daemon_says_the_same(make_daemon) -> None:
    daemon = make_daemon(server_extra='allow = ["127.0.0.0/8"]')
    policy = build_policy(load_config(daemon.config_path))
    for query in (
        {"name": "www.tiktok.com", "client": "127.0.0.2"},
        {"name": "blocked.example", "client": "127.0.0.2", "qtype": "AAAA"},
        {"name": "example.org", "client": "127.0.0.3"},
        {"name": "www.tiktok.com", "client": "127.0.0.7", "qtype": "TYPE666"},
    ):
        status, said = get(daemon.metrics_port, query)
        expected = explain(policy, query["name"], query["client"], parse_qtype(query.get("qtype", "A")))
        assert status == 200 and said == expected.as_dict()
    status, said = get(daemon.metrics_port, {"name": "bad..name"})
    assert status == 400 and "empty label" in str(said["error"])
