"""Reload on SIGHUP: build a new policy off the event loop, validate it, swap one reference.

All or nothing: any error (bad list line, bad config key, unreadable file, a list that shrank
by more than half) keeps the serving policy, logs every error and counts a failure.  A SIGHUP
that arrives while a build runs is not lost: one more build runs after it (so the latest files
win), never two at once.

Updates of one list (an applied zone transfer) take the same path: `update(build, done)` builds
a new snapshot from the serving one in a worker thread and swaps it in, queued behind (never
beside) a running reload, so no build starts from a snapshot another is about to replace.  They
do not re-read the config file and do not touch the signal status below.

`blockd reload` learns the outcome of its own signal from a status file next to the pidfile
(<pidfile stem>.reload.json): `signals` counts SIGHUPs received, `covered` is the signal count
when the last finished build started; a build started after signal N covers it.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger

from blockd.config import Config, ConfigError, load_config
from blockd.policy import Policy, PolicyError, build_policy

_log = Logger()

# What a list update reports: (the new policy, []) once live, or (None, every error).
UpdateDone = Callable[[Policy | None, list[str]], None]


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
        self.updates: deque[tuple[Callable[[Policy], Policy], UpdateDone]] = deque()
        self.swap: Callable[[Policy], None] | None = None  # how an update's snapshot goes live

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
        sizes = ", ".join(f"{name}={len(lst)}" for name, lst in policy.lists.items())
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

    def update(self, build: Callable[[Policy], Policy], done: UpdateDone) -> None:
        """Build a snapshot from the serving one (worker thread) and swap it in; then done(policy,
        []) on the reactor thread, or done(None, errors) when the build failed (nothing changed)."""
        self.updates.append((build, done))
        if not self.building:
            self._next()

    def _start_update(self, build: Callable[[Policy], Policy], done: UpdateDone) -> None:
        self.building = True
        deferred = self.run_in_thread(build, self.current())
        deferred.addCallback(self._update_built, done)
        deferred.addErrback(self._update_failed, done)
        deferred.addErrback(lambda failure: _log.failure("list update bookkeeping failed", failure))
        deferred.addBoth(self._finished)

    def _update_built(self, policy: Policy, done: UpdateDone) -> None:
        if self.swap is None:
            raise RuntimeError("Reloader.swap is not set: list updates cannot go live")
        self.swap(policy)
        done(policy, [])

    def _update_failed(self, failure: Any, done: UpdateDone) -> None:
        if failure.check(ConfigError, PolicyError):
            errors = list(failure.value.errors)
        else:
            errors = [f"unexpected error: {failure.getErrorMessage()}"]
            _log.failure("list update failed unexpectedly", failure)
        done(None, errors)

    def _finished(self, _: object) -> None:
        self.building = False
        self._next()

    def _next(self) -> None:
        if self.pending:
            self._start()
        elif self.updates:
            self._start_update(*self.updates.popleft())
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
