"""Batched harmony generation with gpt-oss, sharded over every rank of the job.

    python -m runtime.generate                                   # tiny model, built-in prompts, CPU ok
    torchrun --nproc_per_node=2 -m runtime.generate parallel.tp_size=2
    torchrun --nproc_per_node=4 -m runtime.generate model=gpt-oss-120b model.path=/ckpt/gpt-oss-120b \
        parallel.tp_size=2 parallel.ep_size=2 prompts.path=prompts.jsonl output.path=out.jsonl

Rank 0 writes output.path (JSONL, input order, append-and-flush per batch; re-running with the same
path skips prompts already written) and <output.path>.run.json (resolved config, layout, versions,
timings). Every field: runtime/config.py.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from runtime import collect, config, distributed
from runtime.engine import Engine, Request, render_harmony
from runtime.errors import exit_on_user_error
from runtime.preemption import EXIT_STOPPED, StopRequest

log = logging.getLogger("runtime.generate")


def load_requests(cfg: DictConfig) -> list[Request]:
    if cfg.prompts.path:
        requests = collect.read_prompts(cfg.prompts.path)
    else:
        requests = collect.inline_prompts(cfg.prompts.texts)
    if not requests:
        raise collect.PromptsError("no prompts: set prompts.path=FILE.jsonl or prompts.texts=[...]")
    requests = collect.add_developer(requests, cfg.prompts.developer)
    if cfg.prompts.renderer == "harmony":  # catch a malformed conversation before any weight is read
        for r in requests:
            render_harmony(r, cfg.generation.reasoning_effort)
    return requests


def versions() -> dict[str, str]:
    import importlib.metadata

    import torch
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "openai_harmony": importlib.metadata.version("openai-harmony"),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = str(torch.version.cuda)
    return out


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Generate for every prompt not yet in output.path; returns the run record on rank 0."""
    config.check_schema(cfg, config.GenerateJobConfig)
    layout = distributed.make_layout(cfg.parallel.tp_size, cfg.parallel.ep_size, cfg.parallel.dp_size)
    distributed.silence_non_writers(layout)
    requests = load_requests(cfg)  # validated on every rank before any weight is read
    stop = StopRequest.from_env()  # a stop signal during loading is honoured before the first batch
    out_path = Path(cfg.output.path)
    writer: collect.JsonlWriter | None = None
    done: set[str] = set()
    if layout.is_writer:  # a bad output.path or output file fails now, not after minutes of loading
        writer = collect.JsonlWriter(out_path)  # (the other ranks are then stopped by torchrun / srun)
        done = writer.done_ids
    engine = Engine(cfg)
    done = distributed.broadcast_object(done, layout)
    todo = [r for r in requests if r.id not in done]
    record: dict[str, Any] = {}
    param_bytes = distributed.gather_to_writer(engine.param_bytes, layout)
    if writer is not None:
        OmegaConf.save(cfg, out_path.with_name(out_path.name + ".config.yaml"), resolve=True)
        run_json = out_path.with_name(out_path.name + ".run.json")
        earlier = json.loads(run_json.read_text()) if run_json.exists() else None
        record = {
            "status": "running",
            "command": sys.argv,
            "config": config.to_container(cfg),
            "layout": layout.describe(),
            "checkpoint": str(engine.checkpoint),
            "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "versions": versions(),
            "load_seconds": engine.load_seconds,
            "param_bytes_per_rank": param_bytes,
            "prompts_total": len(requests),
            "prompts_skipped": len(requests) - len(todo),
            # a resumed run keeps the records of the runs before it
            "earlier_runs": ([*earlier.pop("earlier_runs", []), earlier] if earlier else []),
        }
        collect.write_json_atomic(out_path.with_name(out_path.name + ".run.json"), record)
        log.info("%d prompts, %d already in %s, %d to generate", len(requests), len(requests) - len(todo), out_path, len(todo))
    bar = _progress(len(todo)) if writer is not None else None

    counts = {"prompts": 0, "prompt_tokens": 0, "completion_tokens": 0}  # every replica's, from the records

    def on_round(records: list[dict[str, Any]]) -> None:
        writer.append(records)  # type: ignore[union-attr]
        bar.update(len(records))  # type: ignore[union-attr]
        counts["prompts"] += len(records)
        counts["prompt_tokens"] += sum(r["prompt_tokens"] for r in records)
        counts["completion_tokens"] += sum(r["completion_tokens"] for r in records)

    t0 = time.perf_counter()
    status = "interrupted"
    try:
        engine.generate(todo, on_round=on_round, should_stop=stop)
        status = "stopped" if engine.stopped_early else "done"
    finally:
        if writer is not None:
            bar.close()  # type: ignore[union-attr]
            writer.close()
            s = engine.stats
            wall = time.perf_counter() - t0
            record.update(
                status=status,
                generate_seconds=wall,
                prompts_generated=counts["prompts"],
                prompt_tokens=counts["prompt_tokens"],
                completion_tokens=counts["completion_tokens"],
                output_tokens_per_second=counts["completion_tokens"] / wall if wall > 0 else 0.0,
                replica0={  # timings of the first data-parallel replica (rank 0 measures its own batches)
                    "prefill_seconds": s.prefill_seconds, "decode_seconds": s.decode_seconds,
                    "decode_steps": s.decode_steps, "batches": s.batches,
                },
            )
            collect.write_json_atomic(out_path.with_name(out_path.name + ".run.json"), record)
            log.info(
                "%s: %d prompts, %d new tokens in %.1f s (%.1f tok/s) -> %s", status, counts["prompts"],
                counts["completion_tokens"], wall, record["output_tokens_per_second"], out_path,
            )
    engine.close()
    if status == "stopped":
        log.warning("stopped early on request: run the same command again to finish the remaining prompts")
        if layout.is_writer and os.environ.get("GPTOSS_STOP_FILE"):  # tells slurm/torchrun.sh to requeue
            Path(os.environ["GPTOSS_STOP_FILE"] + "PED").touch()
        distributed.finish(EXIT_STOPPED)
    return record if layout.is_writer else None


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="prompt", desc="generate", disable=None)


@hydra.main(config_path="../conf", config_name="generate", version_base=None)
def main(cfg: DictConfig) -> None:
    with exit_on_user_error(log):
        run(cfg)
    distributed.finish(0)


if __name__ == "__main__":
    main()
