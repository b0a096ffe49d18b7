"""What every bench module shares: the repository's paths, the error that ends a run, the progress log."""

from __future__ import annotations

import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


class BenchError(Exception):
    """Something broke (a server did not start, an answer check or dnsperf failed): the run exits 1."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)
