"""Continuous batching: a KV cache of `rows` independent sequences that requests join and leave between steps.

Each cache row holds one sequence, at slot == position (no padding inside a row):
- `prefill(rows, prompts)`: the new prompts run together, right-padded to the longest, and their keys go
  to slots [0, len) of their own rows; the logits of each prompt's last token are kept;
- `step()`: one decode forward for all rows at once, each row writing its key at its own slot (a scatter
  with a per-row slot index), attending through additive masks built on the device from `slot_pos`
  (the position held in each slot, -1 empty) as `runtime.graph_decode` does (with attention=triton the
  kernel is given `slot_pos` and each row's write slot instead, a SlotMask). Free rows have an all-empty
  `slot_pos` and position -1: they attend to nothing and their output is ignored;
- `release(rows)`: the row's slots are marked empty; its stale keys stay but are never seen again.
A row has one slot more than `max_len`, a scratch slot that free rows write their step's junk key to: the
keys a freed row holds stay intact for the next request sharing their prefix (`prefill(cached=...)`).
The decode step runs the first n rows only, n the smallest of a few sizes (`step_buckets`: 1, 8, 64, ...,
rows) that holds every busy row (rows are given out lowest first), so a step costs what the running
sequences need, not all rows; each size has fixed shapes ([n, 1] tokens against [n, max_len + 1] slots), so
on a GPU each is compiled and captured once as a CUDA graph and replayed. Sampling is per row (temperature 0 = greedy); the leader of the
model-parallel group draws and every rank gets its tokens, so all ranks feed the same ids.

No HTTP, no scheduling and no rank logic beyond "the leader samples": runtime/serve/ decides what runs.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from runtime import distributed
from runtime.graph_decode import StaticKVCache, capture, masks
from runtime.kernels.flash import NAME as FLASH, SlotMask


STEP_BUCKET_GROWTH = 8
"""The decode step's sizes grow by this factor: 1, 8, 64, ... (each one more compile and graph at warm-up)."""


def step_buckets(rows: int) -> list[int]:
    """Row counts the decode step is captured for: powers of STEP_BUCKET_GROWTH below `rows`, then `rows`."""
    out, n = [], 1
    while n < rows:
        out.append(n)
        n *= STEP_BUCKET_GROWTH
    return out + [rows]


def common_prefix(a: np.ndarray, b: np.ndarray, n: int, chunk: int = 256) -> int:
    """Length of the common prefix of a[:n] and b[:n], compared a chunk at a time (most rows differ early)."""
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        diff = np.flatnonzero(a[start:stop] != b[start:stop])
        if diff.size:
            return start + int(diff[0])
    return n


REUSE_WORTH = 32
"""Prompt tokens a cached prefix must save, beyond the lowest free row's, times the factor by which taking
its row makes the decode step larger (for as long as the sequence runs); within the current step size any
saving is taken."""


def pick_row(free: Sequence[int], common: Sequence[int], busy_top: int, buckets: Sequence[int],
             worth: int = REUSE_WORTH) -> tuple[int, int]:
    """The row a new sequence takes among the `free` ones, `common[i]` being how many of its first tokens
    free[i] still holds; `busy_top`: 1 + the highest busy row (0: none), `buckets`: the decode step's sizes.
    The lowest free row, unless another saves more prefill than it costs: any more cached tokens when the
    step stays the size it needs with the lowest row, else at least `worth` x (how many times larger the step
    gets) more. Among those, the longest prefix; ties: the lower row. Returns (row, prefix length)."""
    def size(row: int) -> int:
        return next((b for b in buckets if b >= max(busy_top, row + 1)), buckets[-1])

    low = min(range(len(free)), key=lambda i: free[i])
    base = size(free[low])
    best = low
    for i in range(len(free)):
        gain = common[i] - common[low]
        need = 1 if size(free[i]) <= base else worth * size(free[i]) // base
        if gain >= need and (common[i], -free[i]) > (common[best], -free[best]):
            best = i
    return free[best], common[best]


class RowKVCache(StaticKVCache):
    """K/V buffers [rows, kv_heads, max_len, head_dim] per layer; duck-types transformers' Cache.update.

    Prefill mode (`prefill_rows` set): the forward's keys [n, H, W, D] are stored at slots [0, W) of those
    rows and returned as they are (a fresh row holds nothing else); with `prefill_slots` [n, W] set too
    (rows that keep a cached prefix) at those slots, and the rows' slots [0, prefill_end) are returned. Decode mode:
    keys [n, H, 1, D] of the first n rows are scattered to slot `write_slot[r]` of each, and those rows'
    buffers are returned (views).
    """

    def __init__(self, layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(layers, rows, kv_heads, max_len, head_dim, dtype, device)
        self.write_slot = torch.zeros(rows, dtype=torch.long, device=device)  # [rows], read by the graph
        self._scatter_index = self.write_slot.view(rows, 1, 1, 1).expand(rows, kv_heads, 1, head_dim)
        self.prefill_rows: torch.Tensor | None = None
        self.prefill_slots: torch.Tensor | None = None
        self.prefill_end = 0
        self.prefill_view: slice | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_: Any, **__: Any):
        if self.prefill_rows is not None and self.prefill_slots is not None:
            rows, slots = self.prefill_rows[:, None], self.prefill_slots  # [n, 1], [n, W]
            self.k[layer_idx][rows, :, slots] = key.permute(0, 2, 1, 3)  # indexed as [n, W, H, D]
            self.v[layer_idx][rows, :, slots] = value.permute(0, 2, 1, 3)
            end = self.prefill_end  # the slots the prompts reach: attention reads no further
            rows = self.prefill_view if self.prefill_view is not None else self.prefill_rows  # a view if it can
            return self.k[layer_idx][rows, :, :end], self.v[layer_idx][rows, :, :end]
        if self.prefill_rows is not None:
            width = key.shape[2]
            self.k[layer_idx][self.prefill_rows, :, :width] = key
            self.v[layer_idx][self.prefill_rows, :, :width] = value
            return key, value
        n = key.shape[0]  # the step's rows: the first n
        k, v = self.k[layer_idx][:n], self.v[layer_idx][:n]
        k.scatter_(2, self._scatter_index[:n], key)
        v.scatter_(2, self._scatter_index[:n], value)
        return k, v


MIN_TEMPERATURE = 1e-5
"""Smallest temperature the sampler divides by: below it float32 logits / temperature can overflow to inf
(a 1e-40 temperature is a float32 denormal), so smaller positive temperatures are raised to it (in effect
greedy decoding, as vLLM treats temperatures under 1e-5)."""


def nucleus_keep(sorted_p: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which of the probabilities sorted in descending order a top-p draw keeps: those before the mass
    reaches top_p, and always the first (a top_p that rounds to 0 in float32 still leaves one token)."""
    keep = sorted_p.cumsum(-1) - sorted_p < top_p
    keep[..., 0] = True
    return keep


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                generator: torch.Generator | None, sampling: bool, nucleus: bool) -> torch.Tensor:
    """Next token per row [n] from logits [n, V]; rows with temperature 0 take the argmax.

    `sampling` / `nucleus` say (from the host's copy of the parameters) whether any row samples / has
    top_p < 1, so an all-greedy batch skips the softmax and the vocabulary sort.
    """
    greedy = logits.argmax(-1)
    if not sampling:
        return greedy
    temp = torch.where(temperature > 0, temperature.clamp(min=MIN_TEMPERATURE), torch.ones_like(temperature))
    probs = torch.softmax(logits.float() / temp[:, None], dim=-1)
    if nucleus:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * nucleus_keep(sorted_p, top_p[:, None]))
    drawn = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.where(temperature > 0, drawn, greedy)


def row_bytes(model: nn.Module, dtype: torch.dtype, max_len: int) -> int:
    """Device bytes one batcher row of `max_len` tokens takes on this rank (its keys and values in every layer,
    the scratch slot, its slot positions)."""
    attn = model.model.layers[0].self_attn
    kv_heads = attn.k_proj.out_features // attn.head_dim  # this rank's
    per_slot = 2 * model.config.num_hidden_layers * kv_heads * attn.head_dim * torch.empty((), dtype=dtype).element_size()
    return (max_len + 1) * (per_slot + 8)


def rows_that_fit(total: int, used: int, utilization: float, reserve: int, per_row: int) -> int:
    """Rows of `per_row` bytes in `utilization` x `total` bytes of device memory, less what is `used` (the
    weights, other processes) and a `reserve` for activations."""
    return max(0, int((utilization * total - used - reserve) // per_row))


class ContinuousBatcher:
    """`rows` sequences decoded together; rows are filled by `prefill` and emptied by `release`."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device, rows: int, max_len: int,
                 max_prefill_tokens: int, use_graph: bool, compile: bool, group: Any, leader: bool,
                 generator: torch.Generator | None) -> None:
        self.model = model
        cfg = model.config
        self.dtype, self.device = dtype, device
        self.rows, self.max_len = rows, max_len
        self.max_prefill_tokens = max_prefill_tokens
        self.group, self.leader, self.generator = group, leader, generator
        self.window = getattr(cfg, "sliding_window", None)
        self.slot_masks = cfg._attn_implementation == FLASH  # attention=triton reads slot_pos itself
        attn = model.model.layers[0].self_attn
        kv_heads = attn.k_proj.out_features // attn.head_dim  # this rank's KV heads
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
        slots = max_len + 1  # slot max_len: the scratch slot of free rows
        self.cache = RowKVCache(cfg.num_hidden_layers, rows, kv_heads, slots, cfg.head_dim, dtype, device)
        # Per-row state on the device. pos[r]: the position where last[r] is fed next (= tokens in the
        # cache), -1 for a free row.
        self.slot_pos = torch.full((rows, slots), -1, dtype=torch.long, device=device)
        self.pos = torch.full((rows, 1), -1, dtype=torch.long, device=device)
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)  # last[r], fed by the next step
        self.temperature = torch.zeros(rows, dtype=torch.float32, device=device)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=device)
        self.failed: dict[int, str] = {}  # rows whose draw failed this step (see _sample_each)
        self._temp_host = [0.0] * rows  # the leader's copy, to skip sampling work an all-greedy batch needs not
        self._top_p_host = [1.0] * rows
        self.use_graph = use_graph and device.type == "cuda" and cfg._experts_implementation != "eager"
        self.buckets = step_buckets(rows)
        self._busy: set[int] = set()  # rows decoding (host copy of pos >= 0): the step's size follows them
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # step size -> graph, logits
        if compile:  # one compile per step size, per batcher a process makes (the bench makes several)
            import torch._dynamo as dynamo

            dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
        self._decode_forward = torch.compile(self._forward, dynamic=False) if compile else self._forward

    def release_graphs(self) -> None:
        """Drop the captured decode steps (before the process group goes; the next step captures anew)."""
        self._graphs = {}

    @torch.inference_mode()
    def warm_up(self, prompt_len: int = 16, steps: int = 2) -> float:
        """Run what the first requests would pay for once (compiling and capturing the decode step at each
        of its sizes, the kernels' autotuning at a small prefill): a sequence in the last row of each size,
        then freed: nothing of it stays visible. Every rank of the group calls it at the same point (it runs
        the group's collectives). Seconds."""
        import time

        t0 = time.perf_counter()
        n = max(1, min(prompt_len, self.max_len - steps - 1))
        for size in self.buckets:
            row = size - 1
            self.prefill([row], [[(7 * i + 1) % 1000 for i in range(n)]], [0.0], [1.0])
            for _ in range(steps):
                self.step()
            self.release([row])  # (the scheduler never learnt its tokens: no request reuses them)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------------------ row lifecycle

    def release(self, rows: Sequence[int]) -> None:
        """Empty these rows (their slots become invisible; the row can take a new sequence)."""
        if not rows:
            return
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        self.slot_pos[idx] = -1
        self.pos[idx] = -1
        self.temperature[idx] = 0.0
        self.top_p[idx] = 1.0
        for r in rows:
            self._temp_host[r], self._top_p_host[r] = 0.0, 1.0
            self._busy.discard(r)

    @torch.inference_mode()
    def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], temperature: Sequence[float],
                top_p: Sequence[float], cached: Sequence[int] | None = None, partial: bool = False) -> torch.Tensor:
        """Put each prompt in its (free) row and return its first sampled token [n], in the given order.

        partial: the prompts are the first chunks of longer ones (chunked prefill): their keys are stored,
        nothing is sampled (an empty tensor comes back) and the rows stay out of the decode step; the next
        chunk comes as the longer prompt with `cached` = the tokens already in.

        cached[i]: the first tokens of prompt i whose keys row i still holds at slots [0, cached[i]) from
        its previous sequence (a shared prefix: the scheduler checked the tokens); only the rest is
        computed, attending to those slots too. At most len(prompt) - 1 (the last token's logits are needed).
        Prompts are prefilled in groups of similar length, each group one forward of at most
        `max_prefill_tokens` (rows x padded width; a longer prompt goes alone).
        """
        cached = list(cached) if cached is not None else [0] * len(rows)
        if any(not 0 <= c < len(p) for c, p in zip(cached, prompts)):
            raise ValueError("a cached prefix must leave at least the prompt's last token to compute")
        dev = self.device
        idx = torch.tensor(list(rows), dtype=torch.long, device=dev)
        if not partial:  # a row part-way in keeps a free row's greedy settings: steps draw nothing for it
            for r, t, p in zip(rows, temperature, top_p):
                self._temp_host[r], self._top_p_host[r] = float(t), float(p)
            self.temperature[idx] = torch.tensor(list(temperature), dtype=torch.float32, device=dev)
            self.top_p[idx] = torch.tensor(list(top_p), dtype=torch.float32, device=dev)
        out = torch.empty(len(rows), dtype=torch.long, device=dev)
        for group in self._groups([len(p) - c for p, c in zip(prompts, cached)]):
            logits = self._prefill_group([rows[i] for i in group], [prompts[i] for i in group],
                                         [cached[i] for i in group])
            if not partial:
                g = torch.tensor(group, dtype=torch.long, device=dev)
                out[g] = self._choose(logits, [rows[i] for i in group])
        if partial:
            self.pos[idx] = -1  # held keys, no decoding yet: the step treats the rows as free
            self._busy.difference_update(rows)
            return out[:0]
        self.ids[idx, 0] = out
        self._busy.update(rows)
        return out

    def _groups(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped for prefill: by length, each group's rows x longest <= max_prefill_tokens."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        groups: list[list[int]] = []
        for i in order:
            if groups and (len(groups[-1]) + 1) * lengths[i] <= self.max_prefill_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def _prefill_group(self, rows: list[int], prompts: list[Sequence[int]], cached: list[int]) -> torch.Tensor:
        dev = self.device
        width = max(len(p) - c for p, c in zip(prompts, cached))
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.full((len(rows), width), -1, dtype=torch.long)  # right padding at position -1
        for i, (p, c) in enumerate(zip(prompts, cached)):
            ids[i, : len(p) - c] = torch.tensor(list(p[c:]), dtype=torch.long)
            positions[i, : len(p) - c] = torch.arange(c, len(p))
        ids, positions = ids.to(dev), positions.to(dev)
        idx = torch.tensor(rows, dtype=torch.long, device=dev)
        reuse = any(cached)
        self.slot_pos[idx] = -1
        if not reuse:
            self.slot_pos[idx, :width] = positions
            if self.slot_masks:  # the prefill attends over its own keys [n, H, W, D]: slot t holds position t
                m = SlotMask(positions, torch.arange(width, device=dev).expand(len(rows), width).contiguous()).by_layer()
            else:
                m = masks(positions, positions, self.window, self.dtype)  # a fresh row sees only its own prompt
        else:  # keys go to their own slots after the cached ones; the queries attend over the whole rows
            slots = (torch.tensor(cached, device=dev)[:, None] + torch.arange(width, device=dev)).clamp(max=self.max_len)
            for r, p in zip(rows, prompts):
                self.slot_pos[r, : len(p)] = torch.arange(len(p), device=dev)
            end = max(len(p) for p in prompts)
            view = self.slot_pos[idx, :end]
            m = SlotMask(view, slots).by_layer() if self.slot_masks else masks(view, positions, self.window, self.dtype)
            self.cache.prefill_slots, self.cache.prefill_end = slots, end
            if rows == list(range(rows[0], rows[0] + len(rows))):  # consecutive rows (one, most often): no copy
                self.cache.prefill_view = slice(rows[0], rows[0] + len(rows))
        self.cache.prefill_rows = idx
        try:
            hidden = self.model.model(input_ids=ids, position_ids=positions.clamp(min=0), attention_mask=m,
                                      past_key_values=self.cache, use_cache=True).last_hidden_state
        finally:
            self.cache.prefill_rows = self.cache.prefill_slots = self.cache.prefill_view = None
        last = torch.tensor([len(p) - c - 1 for p, c in zip(prompts, cached)], dtype=torch.long, device=dev)
        self.pos[idx, 0] = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=dev)
        return self.model.lm_head(hidden[torch.arange(len(rows), device=dev), last])  # [n, V]

    # ------------------------------------------------------------------------------ decoding

    def step_rows(self) -> int:
        """Rows the next decode step runs: the smallest step size holding every busy row."""
        need = max(self._busy) + 1 if self._busy else 1
        return next(b for b in self.buckets if b >= need)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Feed every occupied row its last token, return each row's next token [rows] (junk for free rows)."""
        n = self.step_rows()
        pos, write_slot = self.pos[:n], self.cache.write_slot[:n]
        busy = pos >= 0
        # a busy row writes at its position, a free row into its scratch slot (its held keys stay intact)
        write_slot.copy_(torch.where(busy, pos.clamp(max=self.max_len - 1), self.max_len).squeeze(1))
        # the slot about to be written holds this position (a free row's scratch slot gets -1: stays empty)
        self.slot_pos[:n].scatter_(1, write_slot[:, None], pos)
        logits = self._run_step(n)
        tokens = self._choose(logits, None)
        self.ids[:n].copy_(tokens[:, None])
        pos.add_(busy.long())
        if n < self.rows:  # rows past the step's: free, their token is junk
            tokens = torch.cat([tokens, tokens.new_zeros(self.rows - n)])
        return tokens

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        n = ids.shape[0]  # the first n rows
        slot_pos = self.slot_pos[:n]
        if self.slot_masks:  # each row's query sits at its own write slot; a free row's at slot 0 (it sees
            # nothing either way, and the kernel then reads one block of it, not up to its scratch slot)
            q_slot = torch.where(pos >= 0, self.cache.write_slot[:n, None], 0)
            m = SlotMask(slot_pos, q_slot).by_layer()
        else:
            m = masks(slot_pos, pos, self.window, self.dtype)
        out = self.model(input_ids=ids, position_ids=pos.clamp(min=0), attention_mask=m,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _run_step(self, n: int) -> torch.Tensor:
        """The decode forward of the first n rows over the static buffers; captured once per size as a CUDA
        graph when possible."""
        ids, pos = self.ids[:n], self.pos[:n]
        if not self.use_graph:
            return self._decode_forward(ids, pos)
        if n not in self._graphs:
            captured = capture(lambda: self._decode_forward(ids, pos), [self.slot_pos])
            if captured is None:
                self.use_graph = False
                return self._forward(ids, pos)
            self._graphs[n] = captured
        graph, logits = self._graphs[n]
        graph.replay()
        return logits

    def _choose(self, logits: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
        """The leader samples; every rank of the group gets the same tokens. rows None: the first n rows."""
        n = logits.shape[0]
        if self.leader:
            sel = range(n) if rows is None else rows
            temps = [self._temp_host[r] for r in sel]
            sampling = any(t > 0 for t in temps)
            nucleus = any(self._top_p_host[r] < 1.0 for r, t in zip(sel, temps) if t > 0)
            if rows is None:
                temperature, top_p = self.temperature[:n], self.top_p[:n]
            else:
                idx = torch.tensor(rows, dtype=torch.long, device=self.device)
                temperature, top_p = self.temperature[idx], self.top_p[idx]
            try:
                tokens = sample_rows(logits, temperature, top_p, self.generator, sampling, nucleus)
            except RuntimeError as e:
                if _device_fault(e):
                    raise
                tokens = self._sample_each(logits, list(sel), temperature, top_p)
        else:
            tokens = torch.empty(n, dtype=torch.long, device=self.device)
        return distributed.broadcast_from_leader_(tokens, self.group)

    def _sample_each(self, logits: torch.Tensor, rows: list[int], temperature: torch.Tensor,
                     top_p: torch.Tensor) -> torch.Tensor:
        """The batch's draw failed: draw row by row; a row whose draw fails gets its argmax as a stand-in
        (every rank still receives a token, so the ranks stay in step) and goes to `self.failed` for the
        scheduler to end that request with an error. The other rows are served."""
        out = logits.argmax(-1)
        for i, r in enumerate(rows):
            t, p = temperature[i : i + 1], top_p[i : i + 1]
            try:
                out[i] = sample_rows(logits[i : i + 1], t, p, self.generator, bool(t.item() > 0),
                                     bool(p.item() < 1))[0]
            except RuntimeError as e:
                if _device_fault(e):
                    raise
                self.failed[r] = f"sampling failed ({str(e).splitlines()[0][:200]})"
        return out

    def take_failed(self) -> dict[int, str]:
        """Rows whose sampling failed since the last call, with why (the leader's; empty elsewhere)."""
        failed, self.failed = self.failed, {}
        return failed


def _device_fault(e: BaseException) -> bool:
    """An error of the device or the runtime (CUDA, out of memory), as opposed to one request's values."""
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "CUDA" in text or "device-side" in text
