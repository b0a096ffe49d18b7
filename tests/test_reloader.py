"""blockd.reload.Reloader, driven by hand: no threads, no files but the status file.

The "worker thread" is a fake run_in_thread that queues each job; the test decides when a job
runs and so when its Deferred fires.  The monotonic clock is a task.Clock the test advances.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from blockd.config import ConfigError
from blockd.policy import PolicyError
from blockd.reload import Reloader, status_path_for

WALL = 1_700_000_000.0


@dataclass
class FakeList:
    domains: frozenset[str]

    def __len__(self) -> int:
        return len(self.domains)


@dataclass
class FakePolicy:
    version: int
    lists: dict[str, FakeList] = field(default_factory=lambda: {"tiktok": FakeList(frozenset({"tiktok.com"}))})


@dataclass
class FakeConfig:
    version: int


@dataclass
class Job:
    function: Callable[..., Any]
    args: tuple[Any, ...]
    deferred: defer.Deferred[Any]
    done: bool = False

    def run(self) -> None:
        """What deferToThread does: call the function, fire the Deferred with its outcome."""
        assert not self.done, "job ran twice"
        self.done = True
        try:
            result = self.function(*self.args)
        except BaseException:  # noqa: BLE001 - a worker thread hands every exception to the Deferred
            self.deferred.errback(Failure())
        else:
            self.deferred.callback(result)


class FakeThreads:
    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def __call__(self, function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        job = Job(function, args, defer.Deferred())
        self.jobs.append(job)
        return job.deferred

    @property
    def running(self) -> list[Job]:
        return [job for job in self.jobs if not job.done]


class Files:
    """The state a build reads: a version number, or an exception to raise instead."""

    def __init__(self) -> None:
        self.version = 1
        self.error: BaseException | None = None
        self.previous_seen: list[FakePolicy] = []

    def build(self, previous: FakePolicy) -> tuple[FakeConfig, FakePolicy]:
        self.previous_seen.append(previous)
        if self.error is not None:
            raise self.error
        return FakeConfig(self.version), FakePolicy(self.version)


class Harness:
    def __init__(self, status_path: Path | None) -> None:
        self.files = Files()
        self.threads = FakeThreads()
        self.clock = task.Clock()
        self.serving = FakePolicy(0)
        self.applied: list[tuple[FakeConfig, FakePolicy]] = []
        self.results: list[tuple[bool, float]] = []
        self.status_path = status_path
        self.reloader = Reloader(
            current=lambda: self.serving,
            build=self.files.build,
            apply=self.apply,
            on_result=lambda ok, duration: self.results.append((ok, duration)),
            status_path=status_path,
            run_in_thread=self.threads,
            wall_clock=lambda: WALL + self.clock.seconds(),
            monotonic=self.clock.seconds,
        )

    def apply(self, config: FakeConfig, policy: FakePolicy) -> None:
        self.applied.append((config, policy))
        self.serving = policy

    def status(self) -> dict[str, Any]:
        assert self.status_path is not None
        return json.loads(self.status_path.read_text())


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(status_path_for(tmp_path / "blockd.pid"))


def test_status_path_sits_next_to_the_pidfile(tmp_path: Path) -> None:
    assert status_path_for(tmp_path / "blockd.pid") == tmp_path / "blockd.reload.json"


def test_one_request_starts_one_build_with_the_serving_policy(harness: Harness) -> None:
    harness.reloader.request()
    assert len(harness.threads.jobs) == 1
    job = harness.threads.jobs[0]
    assert job.function == harness.files.build
    assert job.args == (harness.serving,)
    assert harness.reloader.building
    assert not harness.reloader.pending
    status = harness.status()
    assert (status["signals"], status["covered"], status["result"]) == (1, 0, "none")


def test_success_applies_and_reports_the_duration_from_the_monotonic_clock(harness: Harness) -> None:
    harness.clock.advance(100)
    harness.reloader.request()
    harness.clock.advance(2.5)
    harness.threads.jobs[0].run()

    assert harness.applied == [(FakeConfig(1), FakePolicy(1))]
    assert harness.serving == FakePolicy(1)
    assert harness.results == [(True, 2.5)]
    assert not harness.reloader.building
    status = harness.status()
    assert status["result"] == "success"
    assert status["errors"] == []
    assert (status["signals"], status["covered"]) == (1, 1)
    assert status["finished_at"] == WALL + 102.5


def test_requests_while_building_cause_exactly_one_more_build_with_the_latest_state(harness: Harness) -> None:
    harness.reloader.request()
    harness.files.version = 2
    harness.reloader.request()
    harness.files.version = 3
    harness.reloader.request()

    # Never two builds at once: the later signals only mark a reload as pending.
    assert len(harness.threads.jobs) == 1
    assert harness.reloader.pending
    assert harness.status()["signals"] == 3

    harness.threads.jobs[0].run()
    assert len(harness.threads.jobs) == 2, "the pending request must start exactly one more build"
    assert len(harness.threads.running) == 1
    assert harness.status()["covered"] == 1  # the first build started at signal 1
    assert not harness.reloader.pending

    harness.threads.jobs[1].run()
    assert len(harness.threads.jobs) == 2, "no further build without a further request"
    assert [policy.version for _, policy in harness.applied] == [3, 3]
    # The second build started after the first was applied, so it sees that policy as previous.
    assert harness.files.previous_seen == [FakePolicy(0), FakePolicy(3)]
    status = harness.status()
    assert (status["signals"], status["covered"], status["result"]) == (3, 3, "success")
    assert not harness.reloader.building


def test_no_request_is_lost_while_the_follow_up_build_runs(harness: Harness) -> None:
    harness.reloader.request()
    harness.reloader.request()
    harness.threads.jobs[0].run()  # starts the follow-up build
    harness.files.version = 7
    harness.reloader.request()  # arrives during the follow-up
    assert len(harness.threads.running) == 1
    harness.threads.jobs[1].run()
    assert len(harness.threads.jobs) == 3
    harness.threads.jobs[2].run()
    assert harness.serving == FakePolicy(7)
    assert harness.status()["covered"] == 3
    assert [ok for ok, _ in harness.results] == [True, True, True]


def test_a_request_after_a_finished_build_starts_a_new_one(harness: Harness) -> None:
    harness.reloader.request()
    harness.threads.jobs[0].run()
    harness.reloader.request()
    assert len(harness.threads.jobs) == 2
    assert harness.threads.jobs[1].args == (FakePolicy(1),)


@pytest.mark.parametrize("error_type", [ConfigError, PolicyError])
def test_a_refused_build_keeps_the_serving_policy_and_records_every_error(
    harness: Harness, error_type: type[Exception]
) -> None:
    errors = ["blockd.toml: groups.gov.networks[1]: bad network", "lists/extra.txt:3: bad line"]
    harness.files.error = error_type(errors)
    harness.reloader.request()
    harness.clock.advance(0.75)
    harness.threads.jobs[0].run()

    assert harness.applied == []
    assert harness.serving == FakePolicy(0)
    assert harness.results == [(False, 0.75)]
    status = harness.status()
    assert status["result"] == "failure"
    assert status["errors"] == errors
    assert (status["signals"], status["covered"]) == (1, 1)
    assert not harness.reloader.building


def test_covered_is_the_signal_count_when_the_failed_build_started(harness: Harness) -> None:
    harness.files.error = ConfigError(["bad"])
    harness.reloader.request()
    harness.reloader.request()
    harness.reloader.request()
    harness.threads.jobs[0].run()
    status = harness.status()
    assert (status["signals"], status["covered"], status["result"]) == (3, 1, "failure")

    harness.files.error = None  # the operator fixed the file; the pending build picks that up
    harness.threads.jobs[1].run()
    status = harness.status()
    assert (status["signals"], status["covered"], status["result"], status["errors"]) == (3, 3, "success", [])
    assert harness.results == [(False, 0.0), (True, 0.0)]


def test_an_unexpected_exception_is_a_failure_and_does_not_wedge_the_reloader(harness: Harness) -> None:
    harness.files.error = RuntimeError("disk on fire")
    harness.reloader.request()
    harness.clock.advance(1)
    harness.threads.jobs[0].run()

    assert harness.applied == []
    assert harness.results == [(False, 1.0)]
    status = harness.status()
    assert status["result"] == "failure"
    assert status["errors"] == ["unexpected error: disk on fire"]
    assert not harness.reloader.building
    assert harness.reloader.wait_idle().called

    harness.files.error = None
    harness.reloader.request()
    assert len(harness.threads.jobs) == 2
    harness.threads.jobs[1].run()
    assert harness.serving == FakePolicy(1)
    assert harness.status()["result"] == "success"


def test_an_exception_from_apply_does_not_wedge_the_reloader(harness: Harness) -> None:
    def broken_apply(config: FakeConfig, policy: FakePolicy) -> None:
        raise RuntimeError("apply failed")

    harness.reloader.apply = broken_apply
    harness.reloader.request()
    harness.threads.jobs[0].run()
    assert not harness.reloader.building
    harness.reloader.apply = harness.apply
    harness.reloader.request()
    harness.threads.jobs[1].run()
    assert harness.serving == FakePolicy(1)


def test_an_exception_from_apply_is_reported_as_a_failure(harness: Harness) -> None:
    def broken_apply(config: FakeConfig, policy: FakePolicy) -> None:
        raise RuntimeError("apply failed")

    harness.reloader.apply = broken_apply
    harness.reloader.request()
    harness.threads.jobs[0].run()
    assert [ok for ok, _ in harness.results] == [False]
    status = harness.status()
    assert (status["covered"], status["result"]) == (1, "failure")


def test_wait_idle_fires_at_once_when_nothing_runs(harness: Harness) -> None:
    assert harness.reloader.wait_idle().called


def test_wait_idle_waits_for_the_pending_build_too(harness: Harness) -> None:
    harness.reloader.request()
    harness.reloader.request()
    idle = harness.reloader.wait_idle()
    assert not idle.called
    harness.threads.jobs[0].run()
    assert not idle.called, "a pending build is still to come"
    harness.threads.jobs[1].run()
    assert idle.called
    assert harness.reloader.wait_idle().called


def test_wait_idle_fires_after_a_failed_build(harness: Harness) -> None:
    harness.files.error = PolicyError(["bad"])
    harness.reloader.request()
    idle = harness.reloader.wait_idle()
    assert not idle.called
    harness.threads.jobs[0].run()
    assert idle.called


def test_without_a_status_path_nothing_is_written(tmp_path: Path) -> None:
    harness = Harness(None)
    harness.reloader.request()
    harness.threads.jobs[0].run()
    assert harness.results == [(True, 0.0)]
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_status_file_does_not_stop_reloads(tmp_path: Path) -> None:
    harness = Harness(tmp_path / "missing-directory" / "blockd.reload.json")
    harness.reloader.request()
    harness.threads.jobs[0].run()
    assert harness.serving == FakePolicy(1)
    assert harness.results == [(True, 0.0)]
    assert harness.reloader.state.covered == 1


# --- list updates (applied zone transfers) take the same one-at-a-time path -------------------


def test_a_list_update_waits_for_a_running_reload_and_builds_on_its_result(tmp_path: Path) -> None:
    harness = Harness(tmp_path / "blockd.reload.json")
    swapped: list[FakePolicy] = []
    outcomes: list[tuple[FakePolicy | None, list[str]]] = []

    def swap(policy: FakePolicy) -> None:
        swapped.append(policy)
        harness.serving = policy

    harness.reloader.swap = swap  # type: ignore[assignment]
    harness.reloader.request()
    seen: list[FakePolicy] = []

    def build(previous: FakePolicy) -> FakePolicy:
        seen.append(previous)
        return FakePolicy(previous.version + 100)

    harness.reloader.update(build, lambda policy, errors: outcomes.append((policy, errors)))  # type: ignore[arg-type]
    assert len(harness.threads.running) == 1  # only the reload: the update is queued behind it
    harness.threads.running[0].run()
    assert harness.serving.version == 1
    harness.threads.running[0].run()  # now the update, built from the reload's snapshot
    assert [p.version for p in seen] == [1]
    assert harness.serving.version == 101 and swapped == [harness.serving]
    assert outcomes == [(harness.serving, [])]
    status = json.loads((tmp_path / "blockd.reload.json").read_text())
    assert status["signals"] == 1 and status["covered"] == 1  # updates do not touch the signal status


def test_a_failed_list_update_changes_nothing_and_reports_every_error(tmp_path: Path) -> None:
    harness = Harness(None)
    harness.reloader.swap = lambda policy: pytest.fail("a failed update must not go live")  # type: ignore[assignment]
    outcomes: list[tuple[object, list[str]]] = []

    def build(previous: FakePolicy) -> FakePolicy:
        raise PolicyError(["zone rpz.example: list 'gov' shrank from 1000 to 10 entries; refusing it"])

    harness.reloader.update(build, lambda policy, errors: outcomes.append((policy, errors)))  # type: ignore[arg-type]
    harness.threads.running[0].run()
    assert outcomes == [(None, ["zone rpz.example: list 'gov' shrank from 1000 to 10 entries; refusing it"])]
    assert harness.serving.version == 0
    assert harness.results == []  # not a reload: the reload metrics are not touched
