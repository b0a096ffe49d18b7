"""Reload on SIGHUP: build a new policy off the event loop, validate it, swap one reference.

All or nothing: any error (bad list line, bad config key, unreadable file, a list that shrank
by more than half) keeps the serving policy, logs every error and counts a failure.  A SIGHUP
that arrives while a build runs is not lost: one more build runs after it (so the latest files
win), never two at once.

`blockd reload` learns the outcome of its own signal from a status file next to the pidfile
(<pidfile stem>.reload.json): `signals` counts SIGHUPs received, `covered` is the signal count
when the last finished build started; a build started after signal N covers it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger

from blockd.config import Config, ConfigError, load_config
from blockd.policy import Policy, PolicyError, build_policy

_log = Logger()


def status_path_for(pidfile: Path) -> Path:
    return pidfile.with_name(pidfile.stem + ".reload.json")


@dataclass
class ReloadState:
    signals: int = 0
    covered: int = 0
    result: str = "none"
    errors: list[str] = field(default_factory=list)
    finished_at: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "signals": self.signals,
            "covered": self.covered,
            "result": self.result,
            "errors": self.errors,
            "finished_at": self.finished_at,
        }


def build_for_reload(config_path: Path | None, previous: Policy) -> tuple[Config, Policy]:
    """Runs in a worker thread: read everything, validate, compile.  Raises with every error."""
    config = load_config(config_path)
    return config, build_policy(config, previous)


class Reloader:
    def __init__(
        self,
        current: Callable[[], Policy],
        build: Callable[[Policy], tuple[Config, Policy]],
        apply: Callable[[Config, Policy], None],
        on_result: Callable[[bool, float], None],
        status_path: Path | None = None,
        run_in_thread: Callable[..., defer.Deferred[Any]] = threads.deferToThread,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.current = current
        self.build = build
        self.apply = apply
        self.on_result = on_result
        self.status_path = status_path
        self.run_in_thread = run_in_thread
        self.wall_clock = wall_clock
        self.monotonic = monotonic
        self.state = ReloadState()
        self.building = False
        self.pending = False
        self.idle: defer.Deferred[None] | None = None

    def announce(self) -> None:
        """Write the status of a fresh process (no signals yet), replacing any older file."""
        self._write_status()

    def request(self) -> None:
        """A SIGHUP (called on the reactor thread)."""
        self.state.signals += 1
        self._write_status()
        if self.building:
            self.pending = True
            _log.info("reload requested while one is running: will reload again when it finishes")
            return
        self._start()

    def _start(self) -> None:
        self.building = True
        self.pending = False
        covering = self.state.signals
        started = self.monotonic()
        _log.info("reloading config and lists")
        deferred = self.run_in_thread(self.build, self.current())
        # Errback after callback: an exception while applying a built policy is a failed reload too.
        deferred.addCallback(self._succeeded, covering, started)
        deferred.addErrback(self._failed, covering, started)
        deferred.addErrback(lambda failure: _log.failure("reload bookkeeping failed", failure))
        deferred.addBoth(self._finished)

    def _succeeded(self, result: tuple[Config, Policy], covering: int, started: float) -> None:
        config, policy = result
        self.apply(config, policy)
        duration = self.monotonic() - started
        sizes = ", ".join(f"{name}={len(lst.domains)}" for name, lst in policy.lists.items())
        _log.info("reload succeeded in {seconds:.3f}s: {sizes}", seconds=duration, sizes=sizes)
        self._record(covering, "success", [], duration)

    def _failed(self, failure: Any, covering: int, started: float) -> None:
        duration = self.monotonic() - started
        if failure.check(ConfigError, PolicyError):
            errors = list(failure.value.errors)
        else:
            errors = [f"unexpected error: {failure.getErrorMessage()}"]
            _log.failure("reload failed unexpectedly", failure)
        for line in errors:
            _log.error("reload refused: {error}", error=line)
        _log.error("reload failed: still serving the previous policy")
        self._record(covering, "failure", errors, duration)

    def _record(self, covering: int, result: str, errors: list[str], duration: float) -> None:
        self.state.covered = covering
        self.state.result = result
        self.state.errors = errors
        self.state.finished_at = self.wall_clock()
        self.on_result(result == "success", duration)
        self._write_status()

    def _finished(self, _: object) -> None:
        self.building = False
        if self.pending:
            self._start()
        elif self.idle is not None:
            idle, self.idle = self.idle, None
            idle.callback(None)

    def wait_idle(self) -> defer.Deferred[None]:
        """Fires when no reload is running or pending (for tests and shutdown)."""
        if not self.building:
            return defer.succeed(None)
        if self.idle is None:
            self.idle = defer.Deferred()
        return self.idle

    def _write_status(self) -> None:
        if self.status_path is None:
            return
        temporary = self.status_path.with_name(self.status_path.name + ".tmp")
        try:
            temporary.write_text(json.dumps(self.state.as_json()))
            temporary.replace(self.status_path)
        except OSError as exc:
            _log.warn("cannot write reload status {path}: {error}", path=str(self.status_path), error=exc)
