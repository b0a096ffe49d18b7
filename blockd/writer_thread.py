"""A background writer: a daemon thread that runs one step every interval, and a last step and a
finish when stopped (the query log's and the dnstap sink's writers: the disk or a collector must
never be waited for on the reactor)."""

from __future__ import annotations

import threading
from collections.abc import Callable


class WriterThread:
    def __init__(self, name: str, step: Callable[[], None], interval: float, finish: Callable[[], None]):
        self.name = name
        self.step = step
        self.interval = interval
        self.finish = finish
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """The last step (what is queued is written) and the finish, waited for up to timeout."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=timeout)
        self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.step()
        self.step()
        self.finish()
