"""blockd.settings: one table says which keys a reload applies and which need a restart."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import task
from twisted.logger import LogLevel, globalLogPublisher

from blockd.config import Config, parse_config
from blockd.daemon import Daemon
from blockd.policy import build_policy
from blockd.settings import LIVE_KEYS, SETTINGS, live_values, needs_restart

BASE = """
[server]
listen = ["127.0.0.1:5353"]
tcp_idle_timeout = 10.0
[upstream]
servers = ["127.0.0.1:5399"]
timeout = 2.0
[cache]
size = 1000
[metrics]
listen = ""
[log]
queries = "none"
"""


def config(text: str = BASE, replace: tuple[str, str] | None = None) -> Config:
    if replace is not None:
        assert replace[0] in text
        text = text.replace(*replace)
    return parse_config(text, "test.toml", Path("/nonexistent"))


def test_keys_are_unique_and_named_as_in_the_config() -> None:
    keys = [s.key for s in SETTINGS]
    assert len(keys) == len(set(keys))
    sections = {
        "server", "upstream", "cache", "metrics", "log", "groups", "egress", "lists", "dnstap", "limits", "publish",
    }  # fmt: skip
    assert {key.split(".")[0] for key in keys} <= sections


@pytest.mark.parametrize(
    ("replace", "restart"),
    [
        (("timeout = 2.0", "timeout = 3.0"), []),
        (("size = 1000", "size = 10"), []),
        (('listen = ["127.0.0.1:5353"]', 'listen = ["127.0.0.1:5354"]'), ["server.listen"]),
        (('queries = "none"', 'queries = "all"'), ["log.queries"]),
        (('listen = ""', 'listen = "127.0.0.1:9999"'), ["metrics.listen"]),
    ],
)
def test_needs_restart_names_only_restart_keys_that_changed(replace: tuple[str, str], restart: list[str]) -> None:
    assert needs_restart(config(), config(replace=replace)) == restart


def test_a_reload_applies_every_live_key_and_warns_for_restart_keys(tmp_path: Path) -> None:
    old = config()
    daemon = Daemon(task.Clock(), old, build_policy(old))
    new = config(
        BASE.replace("timeout = 2.0", "timeout = 0.5")
        .replace("size = 1000", "size = 7")
        .replace("tcp_idle_timeout = 10.0", "tcp_idle_timeout = 3.0")
        .replace('servers = ["127.0.0.1:5399"]', 'servers = ["127.0.0.1:5398", "127.0.0.1:5397"]')
        .replace('listen = ["127.0.0.1:5353"]', 'listen = ["127.0.0.1:5354"]')
    )
    warnings: list[str] = []

    def observe(event: dict[str, object]) -> None:
        if event.get("log_level") == LogLevel.warn:
            warnings.append(str(event.get("key")))

    globalLogPublisher.addObserver(observe)
    try:
        daemon._apply(new, build_policy(new))
    finally:
        globalLogPublisher.removeObserver(observe)
    assert daemon.upstreams.timeout == 0.5
    assert [str(s) for s in daemon.upstreams.servers] == ["127.0.0.1:5398", "127.0.0.1:5397"]
    assert daemon.cache.size == 7
    assert daemon.stream_factory.settings.idle_timeout == 3.0
    assert warnings == ["server.listen"]
    assert {key for key, _ in live_values(new)} == LIVE_KEYS
