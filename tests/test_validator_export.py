"""`blockd export`: the validator settings for the listed names (pure part and the command)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from blockd.config import parse_config
from blockd.lists import DomainList
from blockd.validator_export import listed_names, render
from tests.daemon import REPO

CONFIG = """
[upstream]
servers = ["127.0.0.1:5399"]
[lists.a]
path = "a.txt"
[lists.b]
path = "b.txt"
[lists.watch]
path = "watch.txt"
[groups.gov]
networks = ["10.0.0.0/8"]
lists = ["a", "b"]
[groups.personal]
networks = ["192.0.2.0/24"]
lists = ["watch"]
action = "monitor"
"""


def test_names_of_blocking_groups_topmost_only(tmp_path: Path) -> None:
    config = parse_config(CONFIG, "t.toml", tmp_path)
    lists = {
        "a": DomainList("a", "a.txt", frozenset({"tiktok.com", "www.tiktok.com", "byteoversea.com"})),
        "b": DomainList(
            "b", "b.txt", frozenset(), exact=frozenset({"api.tiktokv.com"}), below=frozenset({"ttwstatic.com"})
        ),
        "watch": DomainList("watch", "watch.txt", frozenset({"watched.example"})),  # monitor only: validated
    }
    assert listed_names(config, lists) == ["api.tiktokv.com", "byteoversea.com", "tiktok.com", "ttwstatic.com"]


def test_render_formats() -> None:
    names = ["tiktok.com", "byteoversea.com"]
    assert render(names, "unbound-insecure", "x.toml").splitlines() == [
        "# blockd export --format unbound-insecure: 2 names listed by x.toml",
        "server:",
        '    domain-insecure: "tiktok.com"',
        '    domain-insecure: "byteoversea.com"',
    ]
    assert render(names, "bind-validate-except", "x.toml").splitlines()[1:] == [
        "validate-except {",
        '    "tiktok.com";',
        '    "byteoversea.com";',
        "};",
    ]
    with pytest.raises(ValueError, match="unknown format"):
        render(names, "knot", "x.toml")


def run_export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockd", "export", *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_export_command_on_the_shipped_lists() -> None:
    done = run_export("--format", "bind-validate-except")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1] == "validate-except {" and lines[-1] == "};" and '    "tiktok.com";' in lines


def test_export_command_reports_a_broken_list(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("ok.example\nbad..name\n")
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "watch.txt").write_text("")
    config = tmp_path / "blockd.toml"
    config.write_text(CONFIG)
    done = run_export("--format", "unbound-insecure", "--config", str(config))
    assert done.returncode == 1 and f"{tmp_path / 'a.txt'}:2:" in done.stderr and not done.stdout
    done = run_export("--format", "nope")
    assert done.returncode == 2 and "invalid choice" in done.stderr
