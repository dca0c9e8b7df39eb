"""Offline continuous batching: all of a run's prompts queued at once over one ContinuousBatcher.

The planner (runtime/planner.py) runs them: `rows` sequences decode together; when one ends (a stop token, or
its token limit) its row and blocks are freed and the next waiting prompt joins before the next step, so no
sequence waits for the longest one of a batch, as static rounds make it (runtime.generate's default,
generation.batching=continuous). Each prompt's tokens are what it would get alone: sequences never see each
other's keys; a prompt whose first blocks are in the prefix cache (every harmony prompt shares its system
message) computes only the rest; at most `chunk` prompt tokens (default: the batcher's max_prefill_tokens, which
its cache is sized for) are prefilled per tick, a long prompt a piece at a time, so running sequences never wait for more than one chunk between their steps; with fewer blocks
than the rows could use, the newest sequence is preempted and recomputed later.

Every rank of a model-parallel replica runs this same loop on the same prompts (the planner decides alike on
every rank) and receives the same tokens from the batcher (its leader samples), so the ranks stay in step
without exchanging anything else. No files, no rank logic: runtime/engine.py gathers the replicas and orders
the records.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from runtime.continuous import ContinuousBatcher
from runtime.kvcache import BlockPool
from runtime.planner import Planner, Seq, execute_prefill


@dataclass
class Finished:
    """One prompt's completion."""

    index: int
    """The prompt's place in the list given to QueueRun."""
    tokens: list[int]
    """Generated ids, the stop token included when there is one."""
    stopped: bool
    """Ended by a stop token (else by its token limit)."""


class QueueRun:
    """Prompts queued over a batcher's rows and blocks; `tick()` plans, prefills, steps once and returns what
    finished."""

    def __init__(self, batcher: ContinuousBatcher, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                 stop_ids: set[int], temperature: float = 0.0, top_p: float = 1.0, chunk: int | None = None,
                 reuse_prefix: bool = True, overlap: bool = False) -> None:
        """overlap: async scheduling (generation.async_scheduling): each decode step is launched before the last
        one's tokens are read."""
        if len(max_new_tokens) != len(prompts):
            raise ValueError("one max_new_tokens per prompt")
        if any(len(p) + m > batcher.max_len for p, m in zip(prompts, max_new_tokens)):
            raise ValueError(f"a prompt plus its new tokens exceeds the batcher's {batcher.max_len} positions per row")
        if chunk is not None and chunk < 1:
            raise ValueError("a prefill chunk is at least one token")
        self.batcher = batcher
        self.prompts = prompts
        self.stop_ids = stop_ids
        self.planner = Planner(batcher.rows, BlockPool(batcher.num_blocks, reuse_prefix), batcher.max_blocks,
                               chunk if chunk is not None else batcher.max_prefill_tokens, batcher.window)
        for i, (p, m) in enumerate(zip(prompts, max_new_tokens)):
            self.planner.add(Seq(list(p), m, temperature, top_p, payload=i))
        self.overlap = overlap
        self._pending: Any = None  # (the launched step's tokens, Planner.launch's rows) read at the next tick
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.steps = 0

    @property
    def done(self) -> bool:
        return self.planner.idle

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens not computed, their keys found in the prefix cache."""
        return self.planner.cached_tokens

    def close(self) -> None:
        """Free every row of the batcher (the last sequences' rows, and those a stop left running), for the next
        run over it."""
        self.batcher.release(list(range(self.batcher.rows)))

    def tick(self) -> list[Finished]:
        """One plan: the prompts part-way in first, then waiting prompts into free rows (at most `chunk` prompt
        tokens in all); then one decode step if any sequence decodes. With `overlap` (async scheduling) the step's
        tokens are read at the next tick, after its step is launched (runtime/planner.py, Planner.launch)."""
        finished: list[Finished] = []
        plan = self.planner.plan()
        t0 = time.perf_counter()
        first = execute_prefill(plan, self.batcher, everywhere=True)  # every rank decides stops alike
        if plan.admit:
            self.prefill_seconds += time.perf_counter() - t0
        for a, tok in zip([a for a in plan.admit if a.end is None], first or []):
            seq = self.planner.rows[a.row]
            if seq is not None:
                self._add(seq, tok, finished)
        launched = None
        t0 = time.perf_counter()
        if plan.decode:
            launched = (self.batcher.step(), self.planner.launch())
            self.steps += 1
        ready = launched
        if self.overlap:
            ready, self._pending = self._pending, launched
        if ready is not None:
            for seq, token in self.planner.land(ready[1], ready[0].tolist()):
                self._add(seq, token, finished)
        self.decode_seconds += time.perf_counter() - t0
        if self.done:
            self._pending = None  # a last step for sequences that had ended: nothing of it is anyone's
            self.close()
        return finished

    def _add(self, seq: Seq, token: int, finished: list[Finished]) -> None:
        seq.tokens.append(token)
        stopped = token in self.stop_ids
        if stopped or len(seq.tokens) >= seq.max_tokens:
            self.planner.finish(seq)
            finished.append(Finished(seq.payload, seq.tokens, stopped))
