"""What gpt-oss gives per GPU and per user, measured, with the plain transformers recipe beside it.

    python -m runtime.bench model=gpt-oss-20b model.synthetic=true model.synthetic_format=bf16 bench.baseline=true
    torchrun --nproc_per_node=8 -m runtime.bench model=gpt-oss-120b model.path=... parallel.tp_size=8 \
        bench.batch_sizes=[1,8,64,256] bench.input_len=1024 bench.output_len=1024
    python -m runtime.bench --multirun parallel.tp_size=1,2,4       # each job re-runs itself under torchrun
    python -m launcher job=bench launcher=slurm launcher.num_nodes=4 ...

Per batch size: time to first token and time per output token (p50/p99 over CUDA-event-timed runs,
warm-up excluded), end-to-end latency, output tokens/s in total, per GPU and per user, prefill
tokens/s, peak memory per rank, load time, and the bytes a decode step must read over the measured
step time, as GB/s and as a fraction of this GPU's copy bandwidth measured in the same run. Fixed
lengths with EOS ignored by default; `bench.mode=replay` replays the prompts config; `bench.mode=serve`
measures a server over HTTP instead (runtime/loadgen.py). Rank 0 writes
results.json / results.csv / PNG plots and appends to a results table. Fields: runtime/config.py.
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from runtime import checkpoint, config, distributed, report, roofline
from runtime import model as modeling
from runtime.engine import Engine, left_pad, render_harmony
from runtime.errors import UserError

log = logging.getLogger("runtime.bench")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    if device.type != "cuda":
        nbytes, iters = 1 << 26, 3
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        seconds = time.perf_counter() - t0
    return 2 * nbytes * iters / seconds


def random_prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    """Token ids below the harmony special tokens, so every prompt is plain text of exactly `length`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 199_998, (batch, length), generator=gen).tolist()


def peak_memory(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


class Bench:
    """Measurements on every rank of the job; rows are assembled on rank 0."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.b = cfg.bench
        if self.b.mode not in ("fixed", "replay", "offline"):
            raise UserError(f"bench.mode={self.b.mode!r}: use fixed, replay, offline or serve")
        if self.b.mode == "offline" and not 0 <= self.b.range_ratio < 1:
            raise UserError(f"bench.range_ratio={self.b.range_ratio} must be in [0, 1)")
        dp = cfg.parallel.dp_size
        if self.b.mode == "offline" and self.b.num_prompts is not None and self.b.num_prompts < dp:
            raise UserError(f"bench.num_prompts={self.b.num_prompts}: give at least one prompt per data-parallel "
                            f"replica (parallel.dp_size={dp})")
        if not self.b.batch_sizes or min(self.b.batch_sizes) < 1:
            raise UserError(f"bench.batch_sizes={list(self.b.batch_sizes)}: give positive batch sizes")
        if self.b.repetitions < 1 or self.b.baseline_repetitions < 1:
            raise UserError("bench.repetitions and bench.baseline_repetitions must be >= 1")
        if self.b.mode in ("fixed", "offline") and (self.b.input_len < 1 or self.b.output_len < 2):
            raise UserError("bench.input_len must be >= 1 and bench.output_len >= 2 (one decode step at least)")
        if self.b.mode == "replay" and cfg.generation.max_new_tokens < 2:
            raise UserError("bench.mode=replay needs generation.max_new_tokens >= 2 (one decode step at least)")
        if len(set(self.b.batch_sizes)) != len(self.b.batch_sizes):
            raise UserError(f"bench.batch_sizes={list(self.b.batch_sizes)}: give each batch size once")
        if self.b.warmup < 0:
            raise UserError(f"bench.warmup={self.b.warmup} must be >= 0")
        if not 0 <= self.b.seed < 2**63:
            raise UserError(f"bench.seed={self.b.seed} must be in [0, 2**63)")
        out_dir = Path(cfg.bench.out_dir) if cfg.bench.out_dir else None
        if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"bench.out_dir={out_dir} is a file: name a directory for the results")
        if not cfg.bench.table or Path(cfg.bench.table).is_dir():
            raise UserError(f"bench.table={cfg.bench.table!r}: name a CSV file the rows are appended to")
        limit = checkpoint.max_positions(cfg.model)
        longest = (self.b.input_len + self.b.output_len) * (1 + (self.b.range_ratio if self.b.mode == "offline" else 0))
        if self.b.mode in ("fixed", "offline") and limit is not None and longest > limit:
            raise UserError(f"bench.input_len + bench.output_len (x (1 + range_ratio) offline) = {int(longest)} "
                            f"exceeds the model's {limit} positions: shorten them")
        self.replay = None
        if self.b.mode == "replay":
            from runtime.generate import load_requests

            self.replay = load_requests(cfg)
        self.engine = Engine(cfg)
        self.layout = self.engine.layout
        self.device = self.engine.device
        self.copy_bw = copy_bandwidth(self.device)
        self.mxfp4 = checkpoint.is_mxfp4(self.engine.hf_config)
        self.vocab_split = _vocab_split(self.engine.model)
        self.all_reduce_path = self.engine.groups.paths()

    def prompts(self, batch: int) -> tuple[list[list[int]], int, bool]:
        """(prompt ids, max new tokens, ignore_eos) for one run at `batch`."""
        if self.replay is None:
            return random_prompts(batch, self.b.input_len, self.b.seed), self.b.output_len, True
        reqs = [self.replay[i % len(self.replay)] for i in range(batch)]
        effort = self.cfg.generation.reasoning_effort
        return [render_harmony(r, effort) for r in reqs], self.cfg.generation.max_new_tokens, False

    def measure_ours(self, batch: int) -> dict[str, Any]:
        prompts, new_tokens, ignore_eos = self.prompts(batch)
        for _ in range(self.b.warmup):  # full length: the same shapes (and CUDA graph) as the timed runs
            self.engine.decode(prompts, new_tokens, ignore_eos=True)
        reset_peak(self.device)
        ttft, tpot, e2e, generated = [], [], [], 0
        for _ in range(self.b.repetitions):
            out = self.engine.decode(prompts, new_tokens, ignore_eos=ignore_eos)
            ttft.append(out.prefill_seconds)
            tpot.extend(out.step_seconds)
            e2e.append(out.prefill_seconds + sum(out.step_seconds))
            generated += int(out.lengths.sum())
        return self._row("ours", batch, prompts, new_tokens, ttft, tpot, e2e, generated,
                         load_seconds=self.engine.load_seconds)

    def _setup(self, impl: str, batch: int, ours: bool = True) -> dict[str, Any]:
        """A row's first columns: what ran (the recipe has its own plan and no all-reduce path of ours)."""
        lay, cfg = self.layout, self.cfg
        return {
            "impl": impl,
            "model": cfg.model.name,
            "format": "mxfp4" if self.mxfp4 else "bf16",
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "world_size": lay.world_size, "tp_size": lay.tp_size, "ep_size": lay.ep_size, "dp_size": lay.dp_size,
            "plan": cfg.parallel.plan if ours else "recipe", "all_reduce": self.all_reduce_path if ours else "",
            "attention": cfg.attention.implementation, "experts": cfg.experts.implementation,
            "mode": self.b.mode, "batch_size": batch,
        }

    def offline_work(self, dp_size: int = 1) -> tuple[list[list[int]], list[int]]:
        """bench.mode=offline: num_prompts random prompts (default 4 x the largest batch size) and their
        output lengths, each drawn uniformly from len x [1 - range_ratio, 1 + range_ratio]."""
        b = self.b
        n = b.num_prompts or max(4 * max(b.batch_sizes), dp_size)
        gen = torch.Generator().manual_seed(b.seed)

        def draw(length: int, floor: int) -> list[int]:
            lo, hi = max(floor, int(length * (1 - b.range_ratio))), max(floor, int(length * (1 + b.range_ratio)))
            return torch.randint(lo, hi + 1, (n,), generator=gen).tolist()

        ins, outs = draw(b.input_len, 1), draw(b.output_len, 2)
        return [torch.randint(0, 199_998, (k,), generator=gen).tolist() for k in ins], outs

    def measure_offline(self, batch: int) -> list[dict[str, Any]]:
        """The whole offline workload at `batch` sequences per replica, EOS ignored: continuous batching
        (runtime/offline.py, each prompt ends at its drawn length and its row takes the next) against static
        rounds of `batch` prompts (runtime.generate's generation.batching=static: each round decodes until its
        longest output; tokens past a prompt's own length are not counted). One warm-up of each (static: a
        round of the longest prompt and output, so no timed round compiles), then one timed run; replica d takes prompts d, d + dp, ...; the wall time is the slowest replica's."""
        from runtime.generate import progress
        from runtime.offline import QueueRun

        prompts, outs = self.offline_work(self.layout.dp_size)
        lay = self.layout
        mine = list(range(lay.dp_rank, len(prompts), lay.dp_size))
        p_mine, o_mine = [prompts[i] for i in mine], [outs[i] for i in mine]
        engine = self.engine

        def continuous(ps: list[list[int]], limits: list[int], bar: Any = None) -> str:
            run = QueueRun(engine.queue_batcher(ps, max(limits), batch), ps, limits, set(),
                           chunk=self.cfg.generation.max_prefill_tokens,
                           overlap=self.cfg.generation.async_scheduling)
            while not run.done:
                done = run.tick()
                if bar is not None:
                    bar.update(len(done))
            return (f"prefill {run.prefill_seconds:.1f} s, decode {run.decode_seconds:.1f} s in {run.steps} steps "
                    f"({1e3 * run.decode_seconds / max(run.steps, 1):.2f} ms each)")

        def static(ps: list[list[int]], limits: list[int], bar: Any = None) -> str:
            for i in range(0, len(ps), batch):
                part = ps[i : i + batch]
                # a short last round runs at the full batch (its rows repeated): the same buffers and graphs,
                # as an engine with a fixed batch shape would; only its own prompts' tokens count
                rows = part + [part[0]] * (min(batch, len(ps)) - len(part))
                engine.decode(rows, max(limits[i : i + batch]), ignore_eos=True)
                if bar is not None:
                    bar.update(len(part))
            return f"{-(-len(ps) // batch)} rounds"

        rows = []
        engine.queue_batcher(p_mine, max(o_mine), batch)  # at its final size: the warm-up's graph is the timed one's
        longest = max(p_mine, key=len)
        warm_up = {  # compile, capture, autotune: continuous at its batcher's final size (made above), static at
            # the longest round's shapes (its buffers then serve every round: GraphDecoder reuses them)
            "continuous": (p_mine[:batch], [min(4, o) for o in o_mine[:batch]]),
            "static": ([longest] * min(batch, len(p_mine)), [max(o_mine)] * min(batch, len(p_mine))),
        }
        for impl, fn in (("continuous", continuous), ("static", static)):
            t0 = time.perf_counter()
            fn(*warm_up[impl])
            log.info("offline batch %4d %s: warm-up %.1f s; timing %d prompts", batch, impl,
                     time.perf_counter() - t0, len(prompts))
            reset_peak(self.device)
            with progress(len(p_mine), f"{impl} b{batch}", lay.is_writer) as bar:
                wall, detail = _timed(lambda fn=fn: fn(p_mine, o_mine, bar), self.device)
            log.info("offline batch %4d %s: %.1f s, %.1f output tok/s on this replica (%s)", batch, impl, wall,
                     sum(o_mine) / wall, detail)
            walls = distributed.gather_to_writer(wall, lay)
            wall = max(walls) if walls is not None else wall
            rows.append({
                **self._setup(impl, batch),
                "input_len": round(sum(map(len, prompts)) / len(prompts), 1),
                "output_len": round(sum(outs) / len(outs), 1),
                "runs": 1, "generated_tokens": sum(outs), "expected_tokens": sum(outs), "e2e_p50_s": wall,
                "output_tok_s": sum(outs) / wall, "output_tok_s_per_gpu": sum(outs) / wall / lay.world_size,
                "total_tok_s": (sum(outs) + sum(map(len, prompts))) / wall, "load_s": engine.load_seconds,
                "peak_mem_gib": peak_memory(self.device) / 2**30,
            })
        rows[0]["speedup_vs_static"] = rows[0]["output_tok_s"] / rows[1]["output_tok_s"]
        rows[1]["speedup_vs_static"] = 1.0
        return rows

    def profile(self, batch: int, out_dir: Path) -> None:
        """One more run of `batch` under torch.profiler: GPU kernels by total time, for the prefill alone
        (one new token) and for the whole run, written to <out_dir>/profile-b<batch>.txt on rank 0."""
        from torch.profiler import ProfilerActivity, profile

        prompts, new_tokens, ignore_eos = self.prompts(batch)
        tables = []
        for label, n in (("prefill (1 new token)", 1), (f"prefill + {new_tokens - 1} decode steps", new_tokens)):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                self.engine.decode(prompts, n, ignore_eos=ignore_eos)
            key = "cuda_time_total" if self.device.type == "cuda" else "cpu_time_total"
            tables.append(f"## batch {batch}: {label}\n" + prof.key_averages().table(sort_by=key, row_limit=30))
        if self.layout.is_writer:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"profile-b{batch}.txt").write_text("\n\n".join(tables) + "\n")

    def _row(self, impl: str, batch: int, prompts: list[list[int]], new_tokens: int, ttft: list[float],
             tpot: list[float], e2e: list[float], generated: int, load_seconds: float) -> dict[str, Any]:
        lay, cfg = self.layout, self.cfg
        runs = len(e2e)
        per_run = generated / runs / batch  # mean new tokens per sequence
        e2e_p50 = percentile(e2e, 50)
        ttft_p50 = percentile(ttft, 50)
        tpot_p50 = percentile(tpot, 50) if tpot else float("nan")
        ours = impl == "ours"
        # Sequences in flight: ours runs `batch` on each of dp_size replicas; the recipe (tp_plan="auto"
        # over every rank) is one model that runs `batch` on all ranks together, whatever dp_size says.
        replicas = lay.dp_size if ours else 1
        total = replicas * batch * per_run / e2e_p50
        prompt_tokens = sum(len(p) for p in prompts)
        context = int(prompt_tokens / batch + per_run / 2)
        # Weights as resident: experts=mxfp4 keeps MXFP4 experts in 4.25 bits; every other path (the recipe
        # offline included) dequantizes them to the compute dtype at load.
        elem = torch.empty((), dtype=self.engine.dtype).element_size()
        # the recipe (and parallel.plan=transformers) are counted as holding every weight on every rank: an
        # upper bound on their bytes (transformers 5.17 splits their experts and, at tp, lm_head)
        impl_bytes = cfg.experts.implementation if ours else "recipe"
        above = cfg.experts.dequantized_above_tokens
        if impl_bytes == "mxfp4" and above is not None and batch > above:
            impl_bytes = "triton"  # these steps read the dequantized copy
        expert_bytes = roofline.expert_bytes_per_param(impl_bytes, elem)
        ours_plan = ours and cfg.parallel.plan == "ours"  # transformers' plan keeps attention whole
        sb = roofline.decode_step_bytes(self.engine.hf_config, batch, context, weight_bytes=elem,
                                        expert_bytes=expert_bytes, tp_size=lay.tp_size if ours_plan else 1,
                                        ep_size=lay.ep_size if ours_plan else 1,
                                        vocab_split=self.vocab_split if ours_plan else 1)
        achieved = sb.total / tpot_p50
        return {
            **self._setup(impl, batch, ours),
            "input_len": round(prompt_tokens / batch, 1), "output_len": new_tokens,
            "runs": runs, "generated_tokens": generated, "expected_tokens": runs * batch * new_tokens,
            "ttft_p50_ms": ttft_p50 * 1e3, "ttft_p99_ms": percentile(ttft, 99) * 1e3,
            "tpot_p50_ms": tpot_p50 * 1e3, "tpot_p99_ms": (percentile(tpot, 99) if tpot else float("nan")) * 1e3,
            "e2e_p50_s": e2e_p50,
            "output_tok_s": total, "output_tok_s_per_gpu": total / lay.world_size,
            "decode_tok_s": replicas * batch / tpot_p50,
            "output_tok_s_per_user": 1.0 / tpot_p50,
            "prefill_tok_s": replicas * prompt_tokens / ttft_p50,
            "load_s": load_seconds,
            "step_bytes_gb": sb.total / 1e9, "achieved_gb_s": achieved / 1e9,
            "copy_bw_gb_s": self.copy_bw / 1e9, "bw_fraction": achieved / self.copy_bw,
            "peak_mem_gib": peak_memory(self.device) / 2**30,
        }

    def measure_baseline(self) -> list[dict[str, Any]]:
        """The seed recipe on the same weights: from_pretrained() + generate() with defaults."""
        from transformers import AutoModelForCausalLM

        self.engine.model = self.engine.graph_decoder = None  # free ours (weights, KV cache, graph) first
        _free(self.device)
        # the published recipe: one device, or tp_plan="auto" (+ expert parallel when parallel.ep_size > 1)
        kw = modeling.recipe_kwargs(self.engine.hf_config, self.layout, self.device, self.engine.dtype)
        t0 = time.perf_counter()
        try:
            model = AutoModelForCausalLM.from_pretrained(self.engine.checkpoint, **kw).eval()
        except torch.OutOfMemoryError:  # e.g. gpt-oss-120b dequantized to bf16 (~233 GB) on one GPU
            log.warning("recipe: out of memory while loading (it dequantizes MXFP4 experts to %s offline): "
                        "no baseline rows", self.engine.dtype)
            _free(self.device)
            return []
        load_seconds = time.perf_counter() - t0
        rows = []
        for batch in self.b.batch_sizes:
            try:
                rows.append(self._baseline_at(model, batch, load_seconds))
            except torch.OutOfMemoryError:
                log.warning("recipe batch %4d: out of memory, skipped", batch)
                _free(self.device)
        del model
        return rows

    def _baseline_at(self, model: Any, batch: int, load_seconds: float) -> dict[str, Any]:
        prompts, new_tokens, ignore_eos = self.prompts(batch)
        ids, mask = left_pad(prompts, self.engine.pad_id, model.device)
        fixed = {"min_new_tokens": new_tokens} if ignore_eos else {}
        torch.manual_seed(self.b.seed)
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2)  # warm-up
            reset_peak(self.device)
            ttft, e2e, steps, generated = [], [], [], 0
            for _ in range(self.b.baseline_repetitions):
                ttft.append(_timed(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=1,
                                                          min_new_tokens=1), self.device)[0])
                seconds, out = _timed(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                             **fixed), self.device)
                e2e.append(seconds)
                steps.append(out.shape[1] - ids.shape[1])  # forwards run: until the longest row stopped
                generated += _new_tokens(out, ids.shape[1], self.engine.stop_ids, self.engine.pad_id)
        tpot = [(e - t) / max(n - 1, 1) for e, t, n in zip(e2e, ttft, steps)]
        return self._row("baseline", batch, prompts, new_tokens, ttft, tpot, e2e, generated, load_seconds)


def _vocab_split(model: Any) -> int:
    """Ranks the lm_head rows are split over (1 where each rank holds the whole vocabulary)."""
    rows = model.lm_head.weight.shape[0]  # a DTensor (parallel.plan=transformers) gives the global shape
    return max(1, model.config.vocab_size // rows)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _timed(fn: Any, device: torch.device) -> tuple[float, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def _new_tokens(out: torch.Tensor, prompt_len: int, stop_ids: set[int], pad_id: int) -> int:
    """Tokens generate() produced per row, up to and including its first stop token."""
    total = 0
    for row in out[:, prompt_len:].tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t in stop_ids:
                n = i + 1
                break
        total += n
    return total


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Measure; on rank 0 write the results and return them."""
    config.check_schema(cfg, config.BenchJobConfig)
    layout = distributed.make_layout(cfg.parallel.tp_size, cfg.parallel.ep_size, cfg.parallel.dp_size)
    distributed.silence_non_writers(layout)
    bench = Bench(cfg)
    out_dir = Path(cfg.bench.out_dir or report.default_dir(cfg))
    rows = []
    for batch in cfg.bench.batch_sizes:
        if cfg.bench.mode == "offline":
            rows.extend(bench.measure_offline(batch))
            log.info("offline batch %4d: continuous %8.1f tok/s, static %8.1f tok/s (%.2fx)", batch,
                     rows[-2]["output_tok_s"], rows[-1]["output_tok_s"], rows[-2]["speedup_vs_static"])
            continue
        try:
            rows.append(bench.measure_ours(batch))
            if cfg.bench.profile:
                bench.profile(batch, out_dir)
        except torch.OutOfMemoryError:
            log.warning("ours  batch %4d: out of memory, skipped", batch)
            _free(bench.device)
            continue
        log.info("ours  batch %4d: %8.1f tok/s  TTFT %7.1f ms  TPOT %6.2f ms  %.0f%% of bandwidth", batch,
                 rows[-1]["output_tok_s"], rows[-1]["ttft_p50_ms"], rows[-1]["tpot_p50_ms"],
                 100 * rows[-1]["bw_fraction"])
    ranks = distributed.gather_to_writer(
        {"rank": layout.rank, "peak_mem_gib": [r["peak_mem_gib"] for r in rows], "copy_bw_gb_s": bench.copy_bw / 1e9,
         "param_bytes": bench.engine.param_bytes, "device": str(bench.device)}, layout)
    base_rows: list[dict[str, Any]] = []
    if cfg.bench.baseline:
        base_rows = bench.measure_baseline()
        for r in base_rows:
            log.info("recipe batch %4d: %8.1f tok/s  TTFT %7.1f ms  TPOT %6.2f ms", r["batch_size"],
                     r["output_tok_s"], r["ttft_p50_ms"], r["tpot_p50_ms"])
        base_ranks = distributed.gather_to_writer([r["peak_mem_gib"] for r in base_rows], layout)
    if not layout.is_writer:
        bench.engine.close()
        return None
    for i, row in enumerate(rows):  # peak memory: the largest rank's
        row["peak_mem_gib"] = max(rk["peak_mem_gib"][i] for rk in ranks)
    for i, row in enumerate(base_rows):
        row["peak_mem_gib"] = max(rk[i] for rk in base_ranks)
    report.add_ratios(rows, base_rows)
    from runtime.generate import versions

    result = {
        "command": sys.argv,
        "config": config.to_container(cfg),
        "layout": layout.describe(),
        "checkpoint": str(bench.engine.checkpoint),
        "versions": versions(),
        "ranks": ranks,
        "rows": rows + base_rows,
    }
    report.write(out_dir, result, Path(cfg.bench.table), plots=cfg.bench.plots)
    log.info("results in %s (table %s)", out_dir, cfg.bench.table)
    bench.engine.close()
    return result


def respawn_under_torchrun(cfg: DictConfig) -> int | None:
    """`python -m runtime.bench parallel.tp_size=2` from one process: run the same job under torchrun."""
    world = cfg.parallel.tp_size * cfg.parallel.ep_size * cfg.parallel.dp_size
    if distributed.env_world()[0] != 1 or world == 1 or not cfg.bench.spawn:
        return None
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "runtime.bench", *overrides]
    log.info("starting %d ranks: %s", world, " ".join(cmd))
    return subprocess.run(cmd, env={**os.environ}).returncode


@hydra.main(config_path="../conf", config_name="bench", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    def body() -> None:
        if cfg.bench.mode == "serve":  # a client of a server (started with its own ranks): one process here
            from runtime import loadgen

            config.check_schema(cfg, config.BenchJobConfig)
            if distributed.env_world()[0] > 1:
                raise UserError("bench.mode=serve is one client process that starts the server's ranks itself: "
                                "run `python -m runtime.bench bench.mode=serve ...`, not under torchrun")
            loadgen.run(cfg)
            return
        code = respawn_under_torchrun(cfg)
        if code is not None:
            sys.exit(code)
        run(cfg)

    distributed.run_entry(body, log)


if __name__ == "__main__":
    main()
