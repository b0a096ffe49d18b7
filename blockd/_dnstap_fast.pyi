# Types of blockd/_dnstap_fast.c (built with the package where a compiler is there).
from collections.abc import Callable, Mapping
from typing import Any

def repeat_frames(
    events: list[tuple[str, int, str, bytes, Any, int]],
    kept_for: dict[tuple[object, ...], Any],
    ports: Mapping[int, bytes],
    with_query: bool,
    times: Callable[[int], tuple[bytes, bytes]],
    keep: Callable[[tuple[object, ...], tuple[str, int, str, bytes, Any, int]], Any],
    low: int,
    high: int,
    /,
) -> bytes | None: ...
