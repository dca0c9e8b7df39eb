"""Host time of one plan() at N decoding rows (issue 15, max load): the GPU waits for it every step.

N sequences of 1,024 prompt tokens and 1,024 new ones over a BlockPool that holds them all, each step's drawn
token appended by hand (no model): prints the median and the worst plan() while they decode, with gpt-oss's
128-position sliding window ("w") or without ("n").

    python docs/bench/2026-12-01-cpu-host/plan_host.py ROWS w|n
"""
from __future__ import annotations

import random
import statistics
import sys
import time

from runtime.kvcache import BlockPool, blocks_for
from runtime.planner import Planner, Seq


def main() -> None:
    rows, window = int(sys.argv[1]), (128 if sys.argv[2] == "w" else None)
    prompt, out = 1024, 1024
    max_blocks = blocks_for(prompt + out + 8)
    planner = Planner(rows, BlockPool(rows * max_blocks * (2 if window else 1) + 1000), max_blocks, 8192, window)
    rng = random.Random(0)
    for i in range(rows):
        planner.add(Seq([rng.randrange(200_000) for _ in range(prompt)], out, payload=i))
    times = []
    for _ in range(400):
        t0 = time.perf_counter()
        plan = planner.plan()
        if plan.decode:
            times.append(time.perf_counter() - t0)
        for seq in list(planner.running):
            if seq.row not in planner.filling:
                seq.tokens.append(rng.randrange(200_000))
                if len(seq.tokens) >= seq.max_tokens:
                    planner.finish(seq)
    last = times[-200:]
    print(f"rows {rows} window {window}: plan() median {1e3 * statistics.median(last):.2f} ms, "
          f"worst {1e3 * max(last):.2f} ms (last {len(last)} decode steps)")


if __name__ == "__main__":
    main()
