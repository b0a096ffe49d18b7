#!/usr/bin/env python3
"""The dnstap encoder of repeated blocked queries alone: the C loop against the Python loop.

    python bench/dnstap_encode.py

100,000 repeated blocked queries (5 names, 8 client ports, one client, 11 us apart), encoded in
batches of 800 as the reactor does every 10 ms (blockd.dnstap_frames.PayloadEncoder
.repeat_streams, both frames: CLIENT_QUERY and CLIENT_RESPONSE); best of 5, per lookup.  The two
loops give the same bytes (checked here, and by tests/test_dnstap_unit.py).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blockd import dnstap_frames
from blockd.dnstap_frames import PayloadEncoder, policy_facts
from blockd.policy import Group, Verdict
from blockd.repeats import BlockedRepeat

LOOKUPS, BATCH = 100_000, 800


def main() -> int:
    group = Group("gov", "sinkhole", 300, bytes(4), bytes(16), 1, (0,), {}, None, None)  # type: ignore[arg-type]
    verdict = Verdict(group, "tiktok", "tiktok.com", "sinkhole")
    facts = policy_facts(verdict)
    repeats = [
        BlockedRepeat(b"\x81\x80" + bytes(60), verdict, "tiktok.com", ("", ""), ([0], [0]), b"\x01\x00" + bytes(30))
        for _ in range(5)
    ]
    rng = random.Random(1)
    ports = [rng.randint(20000, 60000) for _ in range(8)]
    start = time.time_ns()
    events = [
        ("10.120.0.7", ports[i % 8], "udp", bytes((i & 255, 7)), repeats[i % 5], start + i * 11_000)
        for i in range(LOOKUPS)
    ]
    results = {}
    for name, in_c in (("C (blockd/_dnstap_fast.c)", True), ("Python", False)):
        if in_c and dnstap_frames._fast is None:
            print("the C loop is not built (no compiler at install?): only the Python loop is measured")
            continue
        encoder = PayloadEncoder(b"resolver-brussels-1", b"blockd")
        encoder.fast = in_c
        output = b"".join(encoder.repeat_streams(events[k : k + BATCH], lambda v: facts, True)
                          for k in range(0, LOOKUPS, BATCH))  # fmt: skip
        best = float("inf")
        for _ in range(5):
            began = time.perf_counter()
            for k in range(0, LOOKUPS, BATCH):
                encoder.repeat_streams(events[k : k + BATCH], lambda v: facts, True)
            best = min(best, time.perf_counter() - began)
        results[name] = (best / LOOKUPS * 1e6, output)
        print(f"{name}: {best / LOOKUPS * 1e6:.3f} us per lookup (both frames), {len(output) / LOOKUPS:.0f} bytes")
    outputs = {output for _, output in results.values()}
    if len(outputs) > 1:
        print("the two loops gave different bytes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
