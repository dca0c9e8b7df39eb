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

from runtime import checkpoint, collect, config, distributed
from runtime.engine import Engine, Request, make_record, render_harmony
from runtime.errors import UserError
from runtime.preemption import EXIT_STOPPED, StopRequest

log = logging.getLogger("runtime.generate")


def load_requests(cfg: DictConfig, lengths: dict[str, int] | None = None) -> list[Request]:
    """The prompts, checked (and rendered with harmony, their token counts going to `lengths`) before any
    weight is read."""
    if cfg.prompts.path:
        requests = collect.read_prompts(cfg.prompts.path)
    else:
        requests = collect.inline_prompts(cfg.prompts.texts)
    if not requests:
        raise collect.PromptsError("no prompts: set prompts.path=FILE.jsonl or prompts.texts=[...]")
    requests = collect.add_developer(requests, cfg.prompts.developer)
    if cfg.prompts.renderer == "harmony":  # catch a malformed conversation before any weight is read
        for r in requests:
            n = len(render_harmony(r, cfg.generation.reasoning_effort))
            if lengths is not None:
                lengths[r.id] = n
    return requests


def too_long(cfg: DictConfig, requests: list[Request], lengths: dict[str, int], limit: int | None,
             where: str) -> list[dict[str, Any]]:
    """Prompts whose tokens plus generation.max_new_tokens exceed the model's positions, found before their
    batch would allocate a KV cache that size (and die out of memory on every rerun). prompts.too_long=error
    (default): a PromptsError naming them; `record`: one record each with finish_reason "error", returned
    (the run goes on without them)."""
    if limit is None:
        return []
    new = cfg.generation.max_new_tokens
    bad = [r for r in requests if lengths[r.id] + new > limit]
    if not bad:
        return []
    if cfg.prompts.too_long == "error":
        shown = "; ".join(f"id {r.id!r}: {lengths[r.id]} tokens" for r in bad[:5])
        raise collect.PromptsError(
            f"{len(bad)} prompt(s) in {where} do not fit the model's {limit} positions with "
            f"generation.max_new_tokens={new} ({shown}{'; ...' if len(bad) > 5 else ''}): shorten them, lower "
            f"max_new_tokens, or set prompts.too_long=record to write an error record for each and go on")
    return [make_record(r, lengths[r.id], text="", reasoning="", tool_calls=[], finish_reason="error",
                        completion_tokens=0, parse_error=None,
                        error=f"prompt of {lengths[r.id]} tokens + max_new_tokens {new} exceeds the model's {limit} "
                              "positions")
            for r in bad]


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
    if cfg.prompts.too_long not in ("error", "record"):
        raise collect.PromptsError(f"prompts.too_long={cfg.prompts.too_long!r}: use error or record")
    lengths: dict[str, int] = {}
    requests = load_requests(cfg, lengths)  # validated on every rank before any weight is read
    where = cfg.prompts.path or "prompts.texts"
    stop = StopRequest.from_env()  # a stop signal during loading is honoured before the first batch
    out_path = Path(cfg.output.path)
    if cfg.prompts.path and Path(cfg.prompts.path).resolve() == out_path.resolve():
        raise collect.PromptsError(f"prompts.path and output.path are the same file ({out_path}): the prompts would "
                                   "be read as finished records and records appended to them; write elsewhere")
    writer: collect.JsonlWriter | None = None
    done: set[str] = set()
    if layout.is_writer:  # a bad output.path or output file fails now, not after minutes of loading
        writer = collect.JsonlWriter(out_path)  # (the other ranks are then stopped by torchrun / srun)
        collect.check_resume(requests, writer.digests, out_path, where)
        done = writer.done_ids
    skipped = too_long(cfg, requests, lengths, checkpoint.max_positions(cfg.model), where) if lengths else []
    engine = Engine(cfg)
    done = distributed.broadcast_object(done, layout)
    if not lengths:  # prompts.renderer=chat_template renders with the checkpoint's tokenizer: checked now
        lengths = {r.id: len(engine.render(r)) for r in requests}
        skipped = too_long(cfg, requests, lengths, getattr(engine.hf_config, "max_position_embeddings", None), where)
    skip_ids = {r["id"] for r in skipped}
    todo = [r for r in requests if r.id not in done and r.id not in skip_ids]
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
            "prompts_skipped": sum(r.id in done for r in requests),
            # a resumed run keeps the records of the runs before it
            "earlier_runs": ([*earlier.pop("earlier_runs", []), earlier] if earlier else []),
        }
        collect.write_json_atomic(out_path.with_name(out_path.name + ".run.json"), record)
        log.info("%d prompts, %d already in %s, %d to generate", len(requests), len(requests) - len(todo), out_path, len(todo))
    bar = progress(len(todo)) if writer is not None else None

    counts = {"prompts": 0, "prompt_tokens": 0, "completion_tokens": 0}  # every replica's, from the records
    position = {r.id: i for i, r in enumerate(requests)}
    pending = [rec for rec in skipped if rec["id"] not in done]  # error records, written in their place

    def on_round(records: list[dict[str, Any]]) -> None:
        last = max((position[r["id"]] for r in records), default=len(requests))
        due = [p for p in pending if position[p["id"]] < last]
        for p in due:
            pending.remove(p)
        writer.append(sorted(records + due, key=lambda r: position[r["id"]]))  # type: ignore[union-attr]
        bar.update(len(records))  # type: ignore[union-attr]
        counts["prompts"] += len(records)
        counts["prompt_tokens"] += sum(r["prompt_tokens"] for r in records)
        counts["completion_tokens"] += sum(r["completion_tokens"] for r in records)

    t0 = time.perf_counter()
    status, error = "interrupted", None
    try:
        engine.generate(todo, on_round=on_round, should_stop=stop)
        status = "stopped" if engine.stopped_early else "done"
        if writer is not None and pending and status == "done":
            on_round([])  # the error records after the last generated one
    except Exception as e:  # the run record says why (e.g. the output file could not be written: no space)
        status, error = "failed", f"{type(e).__name__}: {e}"
        if isinstance(e, OSError) and writer is not None:
            raise UserError(f"writing {out_path} failed ({e.strerror or e}): free space or fix the file, then run the "
                            "same command again (records already written are kept and skipped)") from e
        raise
    finally:
        if writer is not None:
            bar.close()  # type: ignore[union-attr]
            try:
                writer.close()
            except OSError:
                pass
            s = engine.stats
            wall = time.perf_counter() - t0
            record.update(
                status=status,
                error=error,
                prompts_too_long=len(skipped),
                generate_seconds=wall,
                prompts_generated=counts["prompts"],
                prompt_tokens=counts["prompt_tokens"],
                completion_tokens=counts["completion_tokens"],
                output_tokens_per_second=counts["completion_tokens"] / wall if wall > 0 else 0.0,
                replica0={  # timings of the first data-parallel replica (rank 0 measures its own batches)
                    "prefill_seconds": s.prefill_seconds, "decode_seconds": s.decode_seconds,
                    "decode_steps": s.decode_steps, "batches": s.batches, "cached_tokens": s.cached_tokens,
                },
            )
            try:
                collect.write_json_atomic(out_path.with_name(out_path.name + ".run.json"), record)
            except OSError as e:  # no space for the record either: say so, keep the first error
                log.error("could not update %s.run.json: %s", out_path, e)
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


def progress(total: int, desc: str = "generate", show: bool = True) -> Any:
    """A bar over prompts on a terminal (none in a log file, none where `show` is false: other ranks)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="prompt", desc=desc, disable=None if show else True)


@hydra.main(config_path="../conf", config_name="generate", version_base=None)
def main(cfg: DictConfig) -> None:
    distributed.run_entry(lambda: run(cfg), log)


if __name__ == "__main__":
    main()
