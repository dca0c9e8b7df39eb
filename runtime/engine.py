"""The Python API: load once, generate many. `runtime.generate` is a thin shell over it.

    from runtime import Engine, compose
    engine = Engine(compose("generate", ["model=tiny"]))
    engine.generate([Request(id="0", prompt="Hello")])     # -> list of records (on rank 0)

Every rank of a torchrun job constructs the Engine and calls the same methods with the same
requests; data-parallel replicas take disjoint slices; results come back on rank 0 (None elsewhere).
The engine never prints or writes files.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from runtime import checkpoint, distributed, harmony
from runtime.errors import UserError
from runtime.continuous import MIN_TEMPERATURE, ContinuousBatcher, sample_rows
from runtime.graph_decode import DecodeState, GraphDecoder, mark_stops
from runtime.offline import QueueRun
from runtime import model as modeling

log = logging.getLogger(__name__)

# torch.compile's notes on what we run on purpose, once per compiled layer on every rank (36 in a 20b server's start
# log): the sampler's softmax over the vocabulary is a split reduction, and float32 matmuls stay IEEE (float32 runs
# are the token-exact reference)
warnings.filterwarnings("ignore", message=r"\s*Online softmax is disabled on the fly")
warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores for float32 matrix multiplication")

RETURN, CALL = 200002, 200012  # harmony: end of the answer / end of a tool call


@dataclass
class Request:
    """One prompt: either `messages` (OpenAI-style role/content dicts) or a plain `prompt`."""

    id: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    reasoning_effort: str | None = None
    tools: list[dict[str, Any]] | None = None
    developer: str | None = None
    """Developer instructions prepended when the conversation has no system/developer message."""

    def digest(self) -> str:
        """sha256 of what decides the prompt (text or messages, tools, effort, developer instructions): kept
        with the request's record, so a resumed run notices a prompts file edited since."""
        what = {"prompt": self.prompt, "messages": self.messages, "tools": self.tools,
                "reasoning_effort": self.reasoning_effort, "developer": self.developer}
        return hashlib.sha256(json.dumps(what, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def conversation(self) -> list[dict[str, Any]]:
        msgs = self.messages if self.messages is not None else [{"role": "user", "content": self.prompt}]
        if self.developer and not any(m["role"] in ("system", "developer") for m in msgs):
            msgs = [{"role": "developer", "content": self.developer}, *msgs]
        return msgs


def render_harmony(req: Request, default_effort: str) -> list[int]:
    """The request rendered by openai-harmony; a malformed conversation is a UserError naming the request."""
    try:
        return harmony.render_prompt(req.conversation(), reasoning_effort=req.reasoning_effort or default_effort,
                                     tools=req.tools)
    except ValueError as e:
        raise UserError(f"prompt id {req.id!r}: {e}") from e


@dataclass
class Decoded:
    """What one decode call produced (on the CPU) and how long it took."""

    tokens: torch.Tensor
    """[B, max_new_tokens] generated ids; pad after a row's stop token."""
    lengths: torch.Tensor
    """[B] generated tokens per row, the stop token included."""
    stopped: torch.Tensor
    """[B] whether the row ended on a stop token (else it hit max_new_tokens)."""
    prefill_seconds: float
    """Prefill and sampling the first token: the time to first token."""
    step_seconds: list[float]
    """One entry per later token: a decode step's forward and sampling (time per output token)."""


@dataclass
class Stats:
    """Counters for the run record."""

    prompts: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens whose keys continuous batching found in the prefix cache instead of computing."""
    completion_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    batches: list[dict[str, float]] = field(default_factory=list)


class Engine:
    """A gpt-oss model sharded over this job's ranks, and the batched decode loop."""

    def __init__(self, cfg: DictConfig | Any) -> None:
        cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
        self.cfg = cfg
        par = cfg.parallel
        self.layout = distributed.make_layout(par.tp_size, par.ep_size, par.dp_size)
        modeling.check_kernels(cfg.attention.implementation, cfg.attention.hub_download, cfg.experts.implementation,
                               cfg.experts.dequantized_above_tokens)
        _check_generation(cfg.generation)
        static_ok = ("eager", "gqa_sinks", "triton_sinks")
        if cfg.generation.kv_cache == "static" and cfg.attention.implementation not in static_ok:
            raise UserError(
                f"attention.implementation={cfg.attention.implementation} expects transformers' own masks: use "
                "generation.kv_cache=dynamic with it (the static cache passes its own masks), or attention=triton"
            )
        self.device = distributed.resolve_device(cfg.model.device, self.layout)
        self.dtype = modeling.resolve_dtype(cfg.model.dtype, self.device)
        if par.plan not in ("ours", "transformers"):
            raise UserError(f"parallel.plan={par.plan!r}: use ours or transformers")
        if par.plan == "transformers":
            modeling.check_transformers_plan(self.layout, cfg.attention.implementation, cfg.experts.implementation)
        self.groups = distributed.init(self.layout, self.device, par.backend, self.dtype,
                                       par.all_reduce if par.plan == "ours" else "nccl")
        m = cfg.model
        if m.synthetic:
            arch = OmegaConf.to_container(m.arch)
            self.checkpoint = checkpoint.ensure_synthetic(m.name, arch, m.synthetic_format, m.synthetic_seed)
        else:
            self.checkpoint = checkpoint.resolve_path(m.path)
        self.hf_config = checkpoint.read_config(self.checkpoint)
        distributed.validate_for_model(self.layout, self.hf_config)
        self.renderer = cfg.prompts.renderer if "prompts" in cfg else "harmony"  # serve renders its own
        self.tokenizer = None
        if self.renderer == "chat_template":
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint)
        elif self.renderer != "harmony":
            raise UserError(f"prompts.renderer={self.renderer!r}: use harmony or chat_template")
        self.stop_ids = _stop_ids(self.checkpoint)
        self.pad_id = int(self.hf_config.pad_token_id if self.hf_config.pad_token_id is not None else 199999)
        if par.plan == "transformers":
            loaded = modeling.build_transformers(self.checkpoint, self.hf_config, self.layout, self.device, self.dtype)
        else:
            loaded = modeling.build(
                self.checkpoint, self.hf_config, self.layout, self.groups, self.device, self.dtype,
                cfg.attention.implementation, cfg.experts.implementation, cfg.experts.dequantized_above_tokens,
            )
        self.model = loaded.model
        self.load_seconds = loaded.load_seconds
        self.param_bytes = modeling.param_bytes(self.model)
        # one stream of draws per data-parallel replica (its tp/ep ranks share it: the leader decides)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.generation.seed + self.layout.dp_rank)
        self.graph_decoder = GraphDecoder(self.model, self.dtype, self.device, cfg.generation.cuda_graph,
                                          compile=cfg.generation.compile,
                                          max_prefill_tokens=cfg.generation.max_prefill_tokens,
                                          combo_kernels=cfg.generation.combo_kernels)
        self.stats = Stats()
        self.stopped_early = False
        self.batcher: ContinuousBatcher | None = None  # continuous batching's rows, made by the first run

    # ------------------------------------------------------------------------------ prompts

    def render(self, req: Request) -> list[int]:
        """Prompt token ids in the harmony format, ending with the assistant's turn."""
        effort = req.reasoning_effort or self.cfg.generation.reasoning_effort
        if self.tokenizer is not None:
            ids = self.tokenizer.apply_chat_template(
                req.conversation(), tools=req.tools, add_generation_prompt=True, reasoning_effort=effort,
                tokenize=True, return_dict=False,
            )
            return list(ids)
        return render_harmony(req, effort)

    # ------------------------------------------------------------------------------ generation

    @torch.inference_mode()
    def decode(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, ignore_eos: bool = False) -> Decoded:
        """Prefill the left-padded prompts, then decode up to max_new_tokens per row.

        Rows end at a stop token unless `ignore_eos` (fixed output lengths, as benchmarks run). Step
        times are taken with CUDA events, so timing adds no host sync; with `ignore_eos` the loop has
        none at all until the end.
        """
        ids, mask = left_pad(prompts, self.pad_id, self.device)
        stop = torch.tensor(sorted(self.stop_ids), device=self.device)
        clock = _Clock(self.device)
        if self.cfg.generation.kv_cache == "static":
            st = self.graph_decoder.run(ids, mask, max_new_tokens, self._sample, stop, self.pad_id, ignore_eos, clock)
        else:
            st = self._decode_dynamic(ids, mask, max_new_tokens, stop, ignore_eos, clock)
        times = clock.intervals()
        return Decoded(st.tokens.cpu(), st.lengths.cpu(), st.stopped.cpu(), prefill_seconds=times[0],
                       step_seconds=times[1:])

    def _decode_dynamic(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, stop: torch.Tensor,
                        ignore_eos: bool, clock: _Clock) -> DecodeState:
        """The reference loop: transformers' DynamicCache and mask building, one forward per token."""
        from transformers import DynamicCache

        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        batch = ids.shape[0]
        cache = DynamicCache(config=self.model.config)
        out_tokens = torch.full((batch, max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        lengths = torch.full((batch,), max_new_tokens, dtype=torch.long, device=self.device)
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
            use_cache=True, logits_to_keep=1,
        ).logits[:, -1]
        for step in range(max_new_tokens):
            token = self._sample(logits)
            if not ignore_eos:
                token, done, lengths = mark_stops(token, done, lengths, step, stop, self.pad_id)
            out_tokens[:, step] = token
            clock.mark()  # token `step` exists: the first mark is the time to first token
            if step + 1 == max_new_tokens or (not ignore_eos and bool(done.all())):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            positions = positions[:, -1:] + 1
            logits = self.model(
                input_ids=token[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
        return DecodeState(out_tokens, lengths, done)

    def generate_batch(self, requests: Sequence[Request]) -> list[dict[str, Any]]:
        """Generate for one batch on this replica; every rank of the replica gets the records."""
        if not requests:
            return []
        prompts = [self.render(r) for r in requests]
        out = self.decode(prompts, self.cfg.generation.max_new_tokens)
        records = [
            self._record(req, prompts[i], out.tokens[i, : int(out.lengths[i])].tolist(), bool(out.stopped[i]))
            for i, req in enumerate(requests)
        ]
        s = self.stats
        new_tokens = sum(r["completion_tokens"] for r in records)
        s.prompts += len(requests)
        s.prompt_tokens += sum(len(p) for p in prompts)
        s.completion_tokens += new_tokens
        s.prefill_seconds += out.prefill_seconds
        s.decode_seconds += sum(out.step_seconds)
        s.decode_steps += len(out.step_seconds)
        s.batches.append({"size": len(requests), "prefill_s": out.prefill_seconds,
                          "decode_s": sum(out.step_seconds), "new_tokens": new_tokens})
        return records

    def generate(
        self,
        requests: Sequence[Request],
        on_round: Callable[[list[dict[str, Any]]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[dict[str, Any]] | None:
        """All requests, in order, on rank 0 (None on other ranks).

        `on_round` is called on rank 0 with the next records in input order as soon as they exist
        (append-and-flush writing, progress bars). `should_stop` is asked now and then; if any rank says
        yes, every rank stops there and `self.stopped_early` is set.
        Continuous batching (generation.batching, the default where the KV cache is static): see
        _generate_continuous. Static: requests go in rounds of batch_size * dp_size; replica d takes the
        d-th batch of each round, so gathering the replicas in rank order keeps input order.
        """
        gen = self.cfg.generation
        if gen.batching != "static" and gen.kv_cache == "static":
            return self._generate_continuous(requests, on_round, should_stop)
        lay = self.layout
        per_round = self.cfg.generation.batch_size * lay.dp_size
        collected: list[dict[str, Any]] | None = [] if lay.is_writer else None
        self.stopped_early = False
        for r in range(math.ceil(len(requests) / per_round)):
            if should_stop is not None and distributed.any_rank(should_stop(), lay):
                self.stopped_early = True
                break
            chunk = requests[r * per_round : (r + 1) * per_round]
            size = self.cfg.generation.batch_size
            mine = self.generate_batch(chunk[lay.dp_rank * size : (lay.dp_rank + 1) * size])
            gathered = distributed.gather_to_writer(mine if lay.is_replica_leader else None, lay)
            if gathered is not None:
                records = [rec for part in gathered if part for rec in part]
                collected.extend(records)  # type: ignore[union-attr]
                if on_round is not None:
                    on_round(records)
        return collected

    SYNC_STEPS = 16
    """Continuous batching: decode steps between the ranks' checks for a stop request (and, with data
    parallel, between gathers of the replicas' finished records)."""

    def _generate_continuous(
        self,
        requests: Sequence[Request],
        on_round: Callable[[list[dict[str, Any]]], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> list[dict[str, Any]] | None:
        """Every request queued at once over batch_size rows per replica (runtime/offline.py).

        Replica d takes requests d, d + dp, d + 2dp, ... Finished records reach rank 0 at once (one
        replica) or every SYNC_STEPS steps (several, gathered), and leave it in input order: a record
        that finishes before an earlier one waits for it. On a stop request the records in order so far
        are delivered and the rest is dropped (a resumed run computes them again).
        """
        lay, gen = self.layout, self.cfg.generation
        mine = list(range(lay.dp_rank, len(requests), lay.dp_size))
        prompts = [self.render(requests[i]) for i in mine]
        run = self._queue(prompts) if prompts else None
        collected: list[dict[str, Any]] | None = [] if lay.is_writer else None
        ready: dict[int, dict[str, Any]] = {}  # on rank 0: finished, waiting for an earlier request
        nxt = 0  # on rank 0: the next request to deliver
        outbox: list[tuple[int, dict[str, Any]]] = []  # this replica's finished (request index, record)
        self.stopped_early = False
        finished = new_tokens = tick = 0
        while True:
            if should_stop is not None and tick % self.SYNC_STEPS == 0 and distributed.any_rank(
                    should_stop(), lay):  # before the first step too, and every SYNC_STEPS
                self.stopped_early = True
                break
            for f in run.tick() if run is not None and not run.done else []:
                outbox.append((mine[f.index], self._record(requests[mine[f.index]], prompts[f.index], f.tokens,
                                                          f.stopped)))
                finished += 1
                new_tokens += len(f.tokens)
            tick += 1
            sync = tick % self.SYNC_STEPS == 0  # the same ticks on every rank: collectives go here only
            idle = run is None or run.done
            if lay.dp_size == 1:
                arrived, last = (outbox if lay.is_writer else []), idle
            elif sync:  # a replica that is done idles until the next sync (no GPU work)
                parts = distributed.gather_to_writer(outbox if lay.is_replica_leader else [], lay)
                arrived = [item for part in parts for item in part] if parts is not None else []
                last = not distributed.any_rank(not idle, lay)
            else:
                arrived, last = [], False
            if lay.dp_size == 1 or sync:
                outbox = []
            for pos, rec in arrived:
                ready[pos] = rec
            batch = []
            while nxt in ready:
                batch.append(ready.pop(nxt))
                nxt += 1
            if batch and collected is not None:
                collected.extend(batch)
                if on_round is not None:
                    on_round(batch)
            if last:
                break
        s = self.stats
        s.prompts += finished
        s.prompt_tokens += sum(map(len, prompts))
        s.completion_tokens += new_tokens
        if run is not None:
            s.prefill_seconds += run.prefill_seconds
            s.decode_seconds += run.decode_seconds
            s.decode_steps += run.steps
            s.cached_tokens += run.cached_tokens
            s.batches.append({"size": gen.batch_size, "prefill_s": run.prefill_seconds,
                              "decode_s": run.decode_seconds, "new_tokens": new_tokens, "continuous": True})
            run.close()  # rows a stop left busy: free for the next call
        return collected

    def _queue(self, prompts: list[list[int]]) -> QueueRun:
        """The prompts over this engine's batcher (see queue_batcher), greedy or sampled as configured."""
        gen = self.cfg.generation
        batcher = self.queue_batcher(prompts, gen.max_new_tokens, gen.batch_size)
        sampling = gen.do_sample
        return QueueRun(batcher, prompts, [gen.max_new_tokens] * len(prompts), self.stop_ids,
                        gen.temperature if sampling else 0.0, gen.top_p if sampling else 1.0,
                        chunk=gen.max_prefill_tokens, overlap=gen.async_scheduling)

    def queue_batcher(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, rows: int) -> ContinuousBatcher:
        """This engine's continuous batcher with `rows` rows that hold the longest prompt plus max_new_tokens;
        made on first use, remade (the old graphs and buffers freed first) when it is too short or has
        another number of rows."""
        gen = self.cfg.generation
        longest = max(len(p) for p in prompts) + max_new_tokens
        if self.batcher is None or self.batcher.max_len < longest or self.batcher.rows != rows:
            if self.batcher is not None:
                self.batcher.release_graphs()
            self.batcher = None  # the old buffers go before the new ones are allocated
            self.batcher = ContinuousBatcher(self.model, self.dtype, self.device, rows, longest,
                                             gen.max_prefill_tokens, gen.cuda_graph, gen.compile, self.groups.mp,
                                             self.layout.is_replica_leader, self.generator,
                                             combo_kernels=gen.combo_kernels)
            if self.device.type == "cuda":  # every step size compiled and captured now, not mid-run
                log.info("continuous batcher: %d rows of %d slots, decode step sizes %s warmed up in %.1f s (%s)", rows,
                         longest, self.batcher.buckets, self.batcher.warm_up(), self.batcher.warm_up_summary())
        return self.batcher

    # ------------------------------------------------------------------------------ internals

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token per row [B]; identical on every rank of a replica."""
        gen = self.cfg.generation
        if not gen.do_sample:
            return logits.argmax(-1)
        rows = logits.shape[0]
        temperature = torch.full((rows,), gen.temperature, dtype=torch.float32, device=logits.device)
        top_p = torch.full((rows,), gen.top_p, dtype=torch.float32, device=logits.device)
        token = sample_rows(logits, temperature, top_p, self.generator, sampling=True, nucleus=gen.top_p < 1.0)
        # Ranks could draw differently if their logits differed in the last bit: the leader decides.
        return distributed.broadcast_from_leader_(token, self.groups.mp)

    def _record(self, req: Request, prompt: list[int], completion: list[int], stopped: bool) -> dict[str, Any]:
        parsed = harmony.parse_completion(completion)
        if not stopped:
            reason = "length"
        elif completion and completion[-1] == CALL:
            reason = "tool_calls"
        else:
            reason = "stop"
        rec = make_record(req, len(prompt), text=parsed.text, reasoning=parsed.reasoning,
                          tool_calls=parsed.tool_calls, finish_reason=reason, completion_tokens=len(completion),
                          parse_error=parsed.parse_error)
        if self.cfg.output.token_ids:
            rec["completion_ids"] = completion
        return rec

    def close(self, *graph_owners: Any) -> None:
        """Free every CUDA graph (this engine's and those of `graph_owners`, e.g. the server's batcher),
        then leave the process group. The order matters: see distributed.shutdown."""
        for owner in (self.graph_decoder, self.batcher, *graph_owners):
            if owner is not None:
                owner.release_graphs()
        self.groups.release()
        gc.collect()
        distributed.shutdown()


def make_record(req: Request, prompt_tokens: int, *, text: str, reasoning: Any, tool_calls: list[Any],
                finish_reason: str, completion_tokens: int, parse_error: str | None, **extra: Any) -> dict[str, Any]:
    """One output record: the request as given, the answer and its counts, the prompt's digest (a resumed
    run checks it), then `extra` fields."""
    rec: dict[str, Any] = {"id": req.id}
    if req.messages is not None:
        rec["messages"] = req.messages
    else:
        rec["prompt"] = req.prompt
    rec.update(text=text, reasoning=reasoning, tool_calls=tool_calls, finish_reason=finish_reason,
               prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, parse_error=parse_error,
               prompt_sha256=req.digest(), **extra)
    return rec


def _check_generation(gen: Any) -> None:
    if gen.max_new_tokens < 1:
        raise UserError(f"generation.max_new_tokens={gen.max_new_tokens} must be >= 1")
    if gen.batch_size < 1:
        raise UserError(f"generation.batch_size={gen.batch_size} must be >= 1")
    if not math.isfinite(gen.temperature) or (gen.do_sample and gen.temperature < MIN_TEMPERATURE):
        raise UserError(
            f"generation.temperature={gen.temperature} must be a finite number >= {MIN_TEMPERATURE:g} when sampling "
            f"(smaller temperatures are greedy decoding: generation.do_sample=false)")
    if not (math.isfinite(gen.top_p) and 0 < gen.top_p <= 1):
        raise UserError(f"generation.top_p={gen.top_p} must be in (0, 1]")
    if not 0 <= gen.seed < 2**63:
        raise UserError(f"generation.seed={gen.seed} must be in [0, 2**63)")
    if gen.kv_cache not in ("static", "dynamic"):
        raise UserError(f"generation.kv_cache={gen.kv_cache!r}: use static or dynamic")
    if gen.batching not in ("auto", "continuous", "static"):
        raise UserError(f"generation.batching={gen.batching!r}: use auto, continuous or static")
    if gen.batching == "continuous" and gen.kv_cache == "dynamic":
        raise UserError("generation.batching=continuous decodes over the static KV cache: drop "
                        "generation.kv_cache=dynamic, or use generation.batching=static with it")
    if gen.max_prefill_tokens < 1:
        raise UserError(f"generation.max_prefill_tokens={gen.max_prefill_tokens} must be >= 1")
    if gen.async_scheduling and (gen.batching == "static" or gen.kv_cache == "dynamic"):
        raise UserError("generation.async_scheduling overlaps the steps of continuous batching: drop it, or use "
                        "generation.batching=continuous (or auto) with generation.kv_cache=static")
    if gen.reasoning_effort not in ("low", "medium", "high"):
        raise UserError(f"generation.reasoning_effort={gen.reasoning_effort!r}: use low, medium or high")


def _stop_ids(ckpt: Path) -> set[int]:
    """The checkpoint's eos ids plus harmony's <|return|> and <|call|>.

    Not <|end|>: it closes the analysis message, after which the final answer still follows.
    """
    ids = {RETURN, CALL}
    gc = ckpt / "generation_config.json"
    if gc.is_file():
        eos = json.loads(gc.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


class _Clock:
    """Marks points in the stream of work: CUDA events on a GPU (no host sync), wall time on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks (synchronizes once)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]
