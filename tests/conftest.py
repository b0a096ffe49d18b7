from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon import REPO, Daemon, free_port
from tests.fakeupstream import FakeUpstream

# Network-namespace fixtures (make_ns, topology) for the egress and netlink tests.
pytest_plugins = ["tests.netns"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run the soak tests marked slow (CI=true does too)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a soak test of a minute or more; runs with --slow or CI=true")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The default run stays fast for a developer; CI (which sets CI=true) runs everything.
    if config.getoption("--slow") or os.environ.get("CI", "").lower() == "true":
        return
    skip = pytest.mark.skip(reason="soak test: run with --slow (CI=true runs it)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream()
    yield server
    server.close()


@pytest.fixture
def test_lists(tmp_path: Path) -> Path:
    """A small list directory: 'tiktok' (a copy of the shipped list) and 'extra'."""
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "tiktok.txt").write_text((REPO / "domains" / "tiktok.txt").read_text())
    (lists / "extra.txt").write_text("# test list\nblocked.example\n||adblock.example^\n0.0.0.0 hosts.example\n")
    return lists


BASE_CONFIG = """\
[server]
listen = ["127.0.0.1:{port}"]
{server_extra}

[upstream]
servers = [{upstreams}]
timeout = {timeout}

[metrics]
listen = "{metrics_listen}"

[log]
queries = "{log_queries}"
path = "{log_path}"

[lists.tiktok]
path = "{lists}/tiktok.txt"

[lists.extra]
path = "{lists}/extra.txt"

[groups.government]
networks = ["127.0.0.2/32"]
lists = ["tiktok", "extra"]
action = "sinkhole"
ttl = 300

[groups.personal]
networks = ["127.0.0.4/32"]
lists = ["tiktok", "extra"]
action = "monitor"
"""


@pytest.fixture
def make_daemon(tmp_path: Path, upstream: FakeUpstream, test_lists: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(
        extra: str = "",
        upstreams: list[str] | None = None,
        timeout: float = 1.0,
        server_extra: str = "",
        log_queries: str = "blocked",
        metrics: bool = True,
        start: bool = True,
    ) -> Daemon:
        port = free_port()
        metrics_port = free_port() if metrics else None
        servers = upstreams if upstreams is not None else [upstream.address]
        text = BASE_CONFIG.format(
            port=port,
            server_extra=server_extra,
            upstreams=", ".join(f'"{s}"' for s in servers),
            timeout=timeout,
            metrics_listen=f"127.0.0.1:{metrics_port}" if metrics else "",
            log_queries=log_queries,
            log_path=tmp_path / "queries.jsonl",
            lists=test_lists,
        )
        config = tmp_path / f"blockd-{len(started)}.toml"
        config.write_text(text + textwrap.dedent(extra))
        daemon = Daemon(config, port, metrics_port)
        started.append(daemon)
        if start:
            daemon.start()
        return daemon

    yield make
    for daemon in started:
        daemon.stop()
