"""Where a continuous-batching decode step's time goes, against the engine's static decode (issue 15: the server's
single stream paid 3.03 ms per token where `runtime.bench` decodes at 2.28 ms). On one GPU:

    python docs/bench/2026-12-01-h200-paged/step_profile.py /dev/shm/ck20 [rows]

Prints, for a 1,024-token prompt at batch 1: the engine's static decode per step (CUDA events, no host sync);
the batcher's step with a host sync per step as the server runs it (wall) and back to back without one; the
prefill of 100 new tokens after 4,000 cached (padded graph) against 1,024 fresh; then the GPU kernels of 20
synced batcher steps (torch.profiler), so the difference shows kernel by kernel; then the same with every one of
`rows` rows busy (default 256).
"""

from __future__ import annotations

import sys
import time

import torch

from runtime import compose
from runtime.continuous import ContinuousBatcher
from runtime.engine import Engine
from runtime.kvcache import blocks_for

path = sys.argv[1]
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 256
gpu = torch.cuda.is_available()
model = ["model=gpt-oss-20b", f"model.path={path}"] if path != "tiny" else ["model.device=cpu"]  # tiny: a CPU dry run
eng = Engine(compose("generate", [*model, "attention=triton", "experts=mxfp4", f"generation.compile={str(gpu).lower()}"]))
sync = torch.cuda.synchronize if gpu else (lambda: None)
prompt = [(7 * i + 3) % 50000 for i in range(1024)]
if not gpu:
    prompt = prompt[:100]
d = eng.decode([prompt], 128, ignore_eos=True)
d = eng.decode([prompt], 128, ignore_eos=True)
print(f"engine static decode, batch 1: {1e3 * sum(d.step_seconds) / len(d.step_seconds):.3f} ms/step")

per_row = blocks_for(4200)
b = ContinuousBatcher(eng.model, eng.dtype, eng.device, rows=rows, max_len=4200, max_prefill_tokens=8192,
                      use_graph=gpu, compile=gpu, group=None, leader=True, generator=eng.generator,
                      num_blocks=2 * rows * per_row)
t0 = time.perf_counter()
b.warm_up()
print(f"batcher warm-up ({rows} rows, steps {b.buckets}, prefill widths {b.prefill_widths}): {time.perf_counter() - t0:.1f} s")
b.set_tables({r: list(range(1 + r * per_row, 1 + (r + 1) * per_row)) for r in range(rows)},  # and window tables
             {r: list(range(1 + (rows + r) * per_row, 1 + (rows + r + 1) * per_row)) for r in range(rows)})


def timed(fn, n: int) -> float:
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return 1e3 * (time.perf_counter() - t) / n


b.prefill([0], [prompt], [0.0], [1.0])
print(f"batcher step, host sync each (as the server): {timed(lambda: b.step().tolist(), 200):.3f} ms")
print(f"batcher step, back to back:                   {timed(lambda: b.step(), 200):.3f} ms")
b.release([0])
long = [(11 * i + 5) % 50000 for i in range(4100 if gpu else 300)]
cut = len(long) - 100
b.prefill([0], [long[:cut] + [1]], [0.0], [1.0])  # 4,000 tokens in (eager: wider than the graphs)
b.release([0])
print(f"prefill 100 after 4,000 cached (graph):  {timed(lambda: (b.prefill([0], [long], [0.0], [1.0], cached=[cut]), b.release([0])), 20):.2f} ms")
print(f"prefill 1,024 fresh (graph):             {timed(lambda: (b.prefill([0], [prompt], [0.0], [1.0]), b.release([0])), 20):.2f} ms")
print(f"prefill 4,100 fresh (eager):             {timed(lambda: (b.prefill([0], [long], [0.0], [1.0]), b.release([0])), 5):.2f} ms")
b.prefill([0], [prompt], [0.0], [1.0])
kinds = [torch.profiler.ProfilerActivity.CUDA] if gpu else [torch.profiler.ProfilerActivity.CPU]
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, *kinds[:gpu]]) as prof:
    for _ in range(20):
        b.step().tolist()
print(prof.key_averages().table(sort_by="cuda_time_total" if gpu else "cpu_time_total", row_limit=40))
b.release([0])

# every row busy (the offline run's 256-row step took 56.8 ms where the bench's 64-row step takes ~11 ms)
b.prefill(list(range(rows)), [[(13 * i + r) % 50000 for i in range(len(prompt))] for r in range(rows)], [0.0] * rows,
          [1.0] * rows)
print(f"batcher step, {rows} rows of 1,024: {timed(lambda: b.step().tolist(), 20):.3f} ms")
with torch.profiler.profile(activities=kinds) as prof:
    for _ in range(5):
        b.step().tolist()
print(prof.key_averages().table(sort_by="cuda_time_total" if gpu else "cpu_time_total", row_limit=30))
