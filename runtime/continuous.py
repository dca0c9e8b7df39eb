"""Continuous batching over the paged KV cache: `rows` sequences that requests join and leave between steps.

The model runner of the one engine (runtime/planner.py decides what runs, runtime/kvcache.py holds the keys):
- `set_tables({row: blocks}, {row: window blocks})`: a row's block table (its sequence's blocks, position p in
  block p // BS) and, with sliding-window layers, its window table (SCRATCH behind the window);
- `prefill(rows, prompts)`: the new prompts run together, right-padded to the longest, each key written to
  its position's block; with `cached` the first tokens' keys are in the row's blocks already (the prefix
  cache, or earlier chunks of the same prompt) and only the rest is computed, attending to them; the logits
  of each prompt's last token are kept;
- `step()`: one decode forward for the busy rows at once, each row writing its key at its own position and
  attending through its block table (attention=triton: the kernel reads the pools through the tables,
  `PagedMask`; other attention implementations get the rows' blocks gathered and additive masks). Free rows
  have position -1 and write to the scratch block: they attend to nothing and their output is ignored;
- `release(rows)`: the rows are free (their blocks are the planner's to reuse).
The decode step runs the first n rows only, n the smallest of a few sizes (`step_buckets`: 1, 8, 64, ...,
rows) that holds every busy row (the planner gives out the lowest free row), so a step costs what the
running sequences need, not all rows; each size has fixed shapes ([n, 1] tokens against [n, max_blocks]
block tables), so on a GPU each is compiled and captured once as a CUDA graph and replayed. Sampling is
per row (temperature 0 = greedy); the leader of the model-parallel group draws and every rank gets its
tokens, so all ranks feed the same ids.

No HTTP, no scheduling and no rank logic beyond "the leader samples".
"""

from __future__ import annotations

import gc
from array import array
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from runtime import distributed
from runtime.graph_decode import capture, compiled, masks
from runtime.kernels.flash import NAME as FLASH, PagedMask, SlotMask
from runtime.kvcache import BLOCK_SIZE, SCRATCH, PagedKVCache, blocks_for, sliding_layers, window_reserve


PREFILL_WIDTHS = (16, 32, 64, 128, 256, 512, 1024)
"""With attention=triton, one prompt (or chunk) of up to 1,024 new tokens is prefilled padded to the next of
these widths, reading its keys through its block table like any cached prefix: fixed shapes, so on a GPU each
width is captured once as a CUDA graph (at warm-up) and a short prefill (a chat's next turn after its cached
history, a small chunk) costs its GPU time, not ~1,000 kernel launches from Python."""

STEP_BUCKET_GROWTH = 8
"""The decode step's sizes grow by this factor: 1, 8, 64, ... (each one more compile and graph at warm-up)."""


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor copied to `device` without waiting for the work queued there: a plain copy to a GPU waits
    for the whole stream, i.e. for a decode step launched before it (async scheduling launches the next step
    while one runs). Pinned first, then copied in stream order; the caching host allocator keeps the pinned
    buffer until the copy is done."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def step_buckets(rows: int) -> list[int]:
    """Row counts the decode step is captured for: powers of STEP_BUCKET_GROWTH below `rows`, then `rows`."""
    out, n = [], 1
    while n < rows:
        out.append(n)
        n *= STEP_BUCKET_GROWTH
    return out + [rows]


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


class ContinuousBatcher:
    """`rows` sequences decoded together over a paged KV cache of `num_blocks` blocks; rows are filled by
    `prefill` (their tables set first) and emptied by `release`."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device, rows: int, max_len: int,
                 max_prefill_tokens: int, use_graph: bool, compile: bool, group: Any, leader: bool,
                 generator: torch.Generator | None, num_blocks: int | None = None, combo_kernels: bool = False) -> None:
        self.model = model
        cfg = model.config
        self.dtype, self.device = dtype, device
        self.rows, self.max_len = rows, max_len
        self.max_blocks = blocks_for(max_len)  # a row's block table: max_len positions
        sliding, self.window = sliding_layers(cfg)  # window: None without sliding layers (and window tables)
        if num_blocks is None:  # every row a whole row's blocks, and the sliding layers' windows
            num_blocks = rows * self.max_blocks + window_reserve(rows, self.window, max_prefill_tokens, self.max_blocks)
        self.num_blocks = num_blocks
        self.max_prefill_tokens = max_prefill_tokens
        self.group, self.leader, self.generator = group, leader, generator
        self.paged_reads = cfg._attn_implementation == FLASH  # attention=triton reads the pools itself
        attn = model.model.layers[0].self_attn
        kv_heads = attn.k_proj.out_features // attn.head_dim  # this rank's KV heads
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
        self.cache = PagedKVCache(cfg.num_hidden_layers, self.num_blocks, rows, self.max_blocks, kv_heads,
                                  cfg.head_dim, dtype, device, sliding)
        # Per-row state on the device. pos[r]: the position where ids[r] is fed next (= tokens in the
        # cache), -1 for a free row.
        self.pos = torch.full((rows, 1), -1, dtype=torch.long, device=device)
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.slots = torch.arange(self.max_blocks * BLOCK_SIZE, device=device).expand(rows, -1)  # dense reads
        self.temperature = torch.zeros(rows, dtype=torch.float32, device=device)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=device)
        self.failed: dict[int, str] = {}  # rows whose draw failed this step (see _sample_each)
        self._temp_host = [0.0] * rows  # the leader's copy, to skip sampling work an all-greedy batch needs not
        self._top_p_host = [1.0] * rows
        self.use_graph = use_graph and device.type == "cuda" and cfg._experts_implementation != "eager"
        self.warm_up_parts: dict[str, float] = {}
        """Seconds of the last warm_up by part (warm_up_summary)."""
        self.buckets = step_buckets(rows)
        self._busy: set[int] = set()  # rows decoding (host copy of pos >= 0): the step's size follows them
        # the decode step's rows that hold a sequence, for the routers (runtime/kernels/router.py: the experts skip
        # the step's free rows); written inside the step (and its graph) from pos
        self._in_use = torch.zeros(rows, dtype=torch.bool, device=device)
        self._routers = [m for m in model.modules() if hasattr(type(m), "rows_in_use")]
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # step size -> graph, logits
        self.prefill_widths = [w for w in PREFILL_WIDTHS if w <= max_len] if self.paged_reads else []
        self._prefill_in: dict[int, dict[str, torch.Tensor]] = {}  # width -> its static inputs
        self._prefill_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._prefill_pool: Any = None
        if compile:  # one compile per step size, per batcher a process makes (the bench makes several)
            import torch._dynamo as dynamo

            dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
        self._decode_forward = compiled(self._forward, device, combo_kernels) if compile else self._forward

    def release_graphs(self) -> None:
        """Drop the captured decode steps and prefills (before the process group goes; they are captured anew)."""
        self._graphs, self._prefill_graphs = {}, {}

    @torch.inference_mode()
    def warm_up(self, prompt_len: int = 16, steps: int = 2) -> float:
        """Run what the first requests would pay for once (compiling and capturing the decode step at each
        of its sizes, the kernels' autotuning at a small prefill): a sequence in the last row of each size on
        the first blocks, then freed (the planner hands those blocks out as if never used: nothing of it is
        findable). Every rank of the group calls it at the same point (it runs the group's collectives).
        Seconds."""
        import time

        parts = self.warm_up_parts = {}
        t0 = last = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal last
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            parts[name], last = now - last, now

        n = max(1, min(prompt_len, self.max_len - steps - 1))
        for size in self.buckets:
            row = size - 1
            self._scratch_tables(row, n + steps + 1)
            self.prefill([row], [[(7 * i + 1) % 1000 for i in range(n)]], [0.0], [1.0])
            for _ in range(steps):
                self.step()
            self.release([row])
            lap(f"decode step of {size}")
        room = min(self.max_len - 1, (self.num_blocks // (2 if self.window else 1)) * BLOCK_SIZE - 1)
        for width in self.prefill_widths if self.use_graph else []:  # each prefill width's graph
            n = min(width, room)
            self._scratch_tables(0, n + 1)
            self.prefill([0], [[(3 * i + 2) % 1000 for i in range(n)]], [0.0], [1.0], partial=True)
            self.release([0])
        lap("prefill graphs")
        for n in self._tuning_lengths(room):  # the kernels' autotuning at the longer prefills' sizes, now
            self._scratch_tables(0, n + 1)
            self.prefill([0], [[(5 * i + 3) % 1000 for i in range(n)]], [0.0], [1.0], partial=True)
            self.release([0])
        lap("longer prefills (autotuning)")
        return time.perf_counter() - t0

    def warm_up_summary(self) -> str:
        """What the last warm_up spent its seconds on, for the start log (the first step of a size compiles and
        captures it; the first prefill of a width captures it; the longer prefills autotune the kernels)."""
        return ", ".join(f"{name} {sec:.1f} s" for name, sec in self.warm_up_parts.items())

    def _tuning_lengths(self, room: int) -> list[int]:
        """Eager prefill lengths that reach every autotuning key a longer prefill (beyond the padded widths, up to
        max_prefill_tokens) can meet: the kernels key their tuning on powers of two of the tokens, and a new key
        mid-serving stalls every stream for seconds. GPUs only."""
        if self.device.type != "cuda":
            return []
        top = min(self.max_prefill_tokens, room)
        out, n = [], 2 * (self.prefill_widths[-1] if self.prefill_widths else 1024)
        while n // 2 < top:
            out.append(min(n, top))
            n *= 2
        return out

    # ------------------------------------------------------------------------------ row lifecycle

    def _scratch_tables(self, row: int, tokens: int) -> None:
        """Give `row` the first blocks for `tokens` positions (and the next ones as its window table): the
        warm-up's, handed out by the planner later as if never used."""
        n = min(blocks_for(tokens), self.num_blocks // (2 if self.window else 1))  # (positions beyond: scratch)
        self.set_tables({row: list(range(1, 1 + n))}, {row: list(range(1 + n, 1 + 2 * n))} if self.window else None)

    def set_tables(self, tables: dict[int, Sequence[int]],
                   window_tables: dict[int, Sequence[int]] | None = None) -> None:
        """Rows' block tables: row r's position p is in block tables[r][p // BLOCK_SIZE] (in the full layers) and
        window_tables[r][p // BLOCK_SIZE] (in the sliding-window layers, which need them: they share the full
        layers' device memory, see runtime/kvcache.py)."""
        if self.window and set(tables) - set(window_tables or {}):
            raise ValueError("a model with sliding-window layers needs every row's window table with its block table")
        for target, given in ((self.cache.table, tables), (self.cache.wtable, window_tables or {})):
            if not given:
                continue
            flat = array("i")  # the rows' tables, SCRATCH-padded, in one buffer (one tensor, not one a row)
            for blocks in given.values():
                if len(blocks) > self.max_blocks:
                    raise ValueError(f"{len(blocks)} blocks exceed a row's {self.max_blocks}")
                flat.extend(blocks)
                flat.extend([SCRATCH] * (self.max_blocks - len(blocks)))
            host = torch.frombuffer(flat, dtype=torch.int32).view(len(given), self.max_blocks)
            idx = torch.tensor(list(given), dtype=torch.long)
            target[to_device(idx, self.device)] = to_device(host, self.device)

    def release(self, rows: Sequence[int]) -> None:
        """Empty these rows (they attend to nothing and write to the scratch block; the row can take a new
        sequence, whose blocks are set with it). Their tables stay as they were: the blocks keep their keys."""
        if not rows:
            return
        idx = to_device(torch.tensor(list(rows), dtype=torch.long), self.device)
        self.pos[idx] = -1
        self.temperature[idx] = 0.0
        self.top_p[idx] = 1.0
        for r in rows:
            self._temp_host[r], self._top_p_host[r] = 0.0, 1.0
            self._busy.discard(r)

    @torch.inference_mode()
    def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], temperature: Sequence[float],
                top_p: Sequence[float], cached: Sequence[int] | None = None, partial: bool = False) -> torch.Tensor:
        """Put each prompt in its (free) row and return its first sampled token [n], in the given order. The
        rows' block tables must cover every position written (the prompt, and the next token's when the step
        that follows feeds it).

        partial: the prompts are the first chunks of longer ones (chunked prefill): their keys are stored,
        nothing is sampled (an empty tensor comes back) and the rows stay out of the decode step; the next
        chunk comes as the longer prompt with `cached` = the tokens already in.

        cached[i]: the first tokens of prompt i whose keys row i's blocks hold already (a shared prefix, or
        earlier chunks); only the rest is computed, attending to those too. At most len(prompt) - 1 (the last
        token's logits are needed). Prompts are prefilled in groups of similar length, each group one forward
        of at most `max_prefill_tokens` (rows x padded width; a longer prompt goes alone).
        """
        cached = list(cached) if cached is not None else [0] * len(rows)
        if any(not 0 <= c < len(p) for c, p in zip(cached, prompts)):
            raise ValueError("a cached prefix must leave at least the prompt's last token to compute")
        if any(len(p) > self.max_len for p in prompts):
            raise ValueError(f"a prompt longer than the batcher's {self.max_len} positions per row")
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
        if len(rows) == 1 and self.prefill_widths and width <= self.prefill_widths[-1]:
            return self._prefill_padded(rows[0], prompts[0], cached[0])
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.full((len(rows), width), -1, dtype=torch.long)  # right padding at position -1
        for i, (p, c) in enumerate(zip(prompts, cached)):
            ids[i, : len(p) - c] = torch.tensor(list(p[c:]), dtype=torch.long)
            positions[i, : len(p) - c] = torch.arange(c, len(p))
        ids, positions = ids.to(dev), positions.to(dev)
        idx = torch.tensor(rows, dtype=torch.long, device=dev)
        table, wtable = self.cache.table[idx], self.cache.wtable[idx]  # [n, max_blocks]
        at = positions.clamp(min=0)
        held = positions >= 0  # pad tokens write to the scratch block
        self.cache.prefill_write = _writes(table, wtable, at, held)
        if not any(cached):  # a fresh prompt attends to its own keys only [n, H, W, D]: slot t holds position t
            self.cache.fresh = True
            if self.paged_reads:
                m = SlotMask(positions, torch.arange(width, device=dev).expand(len(rows), width).contiguous()).by_layer()
            else:
                m = masks(positions, positions, self.window, self.dtype)
        elif self.paged_reads:  # the queries read the rows' blocks (cached prefix and their own keys)
            self.cache.dense_rows = None
            m = PagedMask(table.contiguous(), positions, wtable.contiguous() if self.window else None).by_layer()
        else:
            used = blocks_for(max(len(p) for p in prompts))
            self.cache.dense_rows, self.cache.dense_blocks = idx, used
            m = masks(self.slots[: len(rows), : used * BLOCK_SIZE], positions, self.window, self.dtype)
        try:
            hidden = self.model.model(input_ids=ids, position_ids=at, attention_mask=m,
                                      past_key_values=self.cache, use_cache=True).last_hidden_state
        finally:
            self.cache.prefill_write, self.cache.fresh, self.cache.dense_rows = None, False, None
        last = torch.tensor([len(p) - c - 1 for p, c in zip(prompts, cached)], dtype=torch.long, device=dev)
        self.pos[idx, 0] = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=dev)
        return self.model.lm_head(hidden[torch.arange(len(rows), device=dev), last])  # [n, V]

    def _prefill_padded(self, row: int, prompt: Sequence[int], cached: int) -> torch.Tensor:
        """One prompt's tokens after `cached`, padded to the next of `prefill_widths`, through its block table:
        the logits of its last token [1, V]. A CUDA graph per width on GPUs."""
        new = len(prompt) - cached
        width = next(w for w in self.prefill_widths if w >= new)
        host = torch.full((2, width), -1, dtype=torch.long)
        host[0] = 0
        host[0, :new] = torch.tensor(list(prompt[cached:]), dtype=torch.long)
        host[1, :new] = torch.arange(cached, len(prompt))
        buf = self._prefill_in.get(width)
        if buf is None:
            buf = self._prefill_in[width] = {
                "tokens": torch.zeros((2, width), dtype=torch.long, device=self.device),
                "table": torch.zeros((1, self.max_blocks), dtype=torch.int32, device=self.device),
                "wtable": torch.zeros((1, self.max_blocks), dtype=torch.int32, device=self.device),
                "last": torch.zeros(1, dtype=torch.long, device=self.device)}
        buf["tokens"].copy_(host)
        buf["table"].copy_(self.cache.table[row : row + 1])
        buf["wtable"].copy_(self.cache.wtable[row : row + 1])
        buf["last"].fill_(new - 1)
        self.pos[row, 0] = len(prompt)
        if not self.use_graph:
            return self._prefill_forward(buf)
        if width not in self._prefill_graphs:
            if self._prefill_pool is None:  # one memory pool for all widths: they never run at once
                self._prefill_pool = torch.cuda.graph_pool_handle()
            captured = capture(lambda: self._prefill_forward(buf), what="prefill", pool=self._prefill_pool)
            if captured is None:
                self.prefill_widths = []  # eager from now on, the old way
                return self._prefill_forward(buf)
            self._prefill_graphs[width] = captured
        graph, logits = self._prefill_graphs[width]
        graph.replay()
        return logits

    def _prefill_forward(self, buf: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, positions = buf["tokens"][0:1], buf["tokens"][1:2]
        at = positions.clamp(min=0)
        held = positions >= 0  # pad tokens write to the scratch block and see nothing
        self.cache.prefill_write = _writes(buf["table"], buf["wtable"], at, held)
        mask = PagedMask(buf["table"], positions, buf["wtable"] if self.window else None).by_layer()
        try:
            hidden = self.model.model(input_ids=ids, position_ids=at, attention_mask=mask,
                                      past_key_values=self.cache, use_cache=True).last_hidden_state
        finally:
            self.cache.prefill_write = None
        return self.model.lm_head(hidden[0].index_select(0, buf["last"]))  # [1, V]

    # ------------------------------------------------------------------------------ decoding

    def step_rows(self) -> int:
        """Rows the next decode step runs: the smallest step size holding every busy row."""
        need = max(self._busy) + 1 if self._busy else 1
        return next(b for b in self.buckets if b >= need)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Feed every occupied row its last token, return each row's next token [rows] (junk for free rows)."""
        n = self.step_rows()
        pos = self.pos[:n]
        busy = pos >= 0
        if not self.paged_reads:  # other attention implementations read the rows' blocks gathered: all of a
            # row's in a graph (fixed shapes), else those the longest row reaches
            used = self.max_blocks if self.use_graph else min(self.max_blocks, blocks_for(int(pos.max()) + 1))
            self.cache.dense_rows, self.cache.dense_blocks = slice(0, n), max(1, used)
        for router in self._routers:
            router.rows_in_use = self._in_use
        try:
            logits = self._run_step(n)
        finally:
            self.cache.dense_rows = None
            for router in self._routers:
                router.rows_in_use = None
        tokens = self._choose(logits, None)
        self.ids[:n].copy_(tokens[:, None])
        pos.add_(busy.long())
        if n < self.rows:  # rows past the step's: free, their token is junk
            tokens = torch.cat([tokens, tokens.new_zeros(self.rows - n)])
        return tokens

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        n = ids.shape[0]  # the first n rows
        # where each row's key goes (inside the graph): a busy row's position's block, a free row's the scratch
        busy, at = pos >= 0, pos.clamp(min=0)
        self._in_use[:n].copy_(busy[:, 0])
        block, wblock, offset = _writes(self.cache.table[:n], self.cache.wtable[:n], at, busy)
        self.cache.write_block[:n].copy_(block)
        self.cache.write_wblock[:n].copy_(wblock)
        self.cache.write_offset[:n].copy_(offset)
        if self.paged_reads:
            m = PagedMask(self.cache.table[:n], pos, self.cache.wtable[:n] if self.window else None).by_layer()
        else:
            m = masks(self.slots[:n, : self.cache.dense_blocks * BLOCK_SIZE], pos, self.window, self.dtype)
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
            captured = capture(lambda: self._decode_forward(ids, pos))
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


def _writes(table: torch.Tensor, wtable: torch.Tensor, at: torch.Tensor,
            held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the keys of positions `at` [n, W] go: (block in the full layers, block in the sliding layers, slot),
    flattened; tokens not `held` (pads, free rows) go to the scratch block."""
    j, off = at // BLOCK_SIZE, torch.where(held, at % BLOCK_SIZE, 0)
    block = torch.where(held, table.gather(1, j).long(), SCRATCH)
    wblock = torch.where(held, wtable.gather(1, j).long(), SCRATCH)
    return block.flatten(), wblock.flatten(), off.flatten()


def _device_fault(e: BaseException) -> bool:
    """An error of the device or the runtime (CUDA, out of memory), as opposed to one request's values."""
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "CUDA" in text or "device-side" in text
