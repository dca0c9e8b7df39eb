"""Offline continuous batching: all of a run's prompts queued at once over one ContinuousBatcher.

`rows` sequences decode together. When one ends (a stop token, or its token limit) its row is released
and the next waiting prompt is prefilled into it before the next step, so no sequence waits for the
longest one of a batch, as static rounds make it (runtime.generate's default, generation.batching=
continuous). Each prompt's tokens are what it would get alone: the batcher's rows never see each other.

Every rank of a model-parallel replica runs this same loop on the same prompts and receives the same
tokens from the batcher (its leader samples), so the ranks stay in step without exchanging anything else.
No files, no rank logic: runtime/engine.py gathers the replicas and orders the records.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from runtime.continuous import ContinuousBatcher


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
    """Prompts queued over a batcher's rows; `tick()` admits, steps once and returns what finished."""

    def __init__(self, batcher: ContinuousBatcher, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                 stop_ids: set[int], temperature: float = 0.0, top_p: float = 1.0) -> None:
        if len(max_new_tokens) != len(prompts):
            raise ValueError("one max_new_tokens per prompt")
        if any(len(p) + m > batcher.max_len for p, m in zip(prompts, max_new_tokens)):
            raise ValueError(f"a prompt plus its new tokens exceeds the batcher's {batcher.max_len} slots per row")
        self.batcher = batcher
        self.prompts, self.limits = prompts, list(max_new_tokens)
        self.stop_ids = stop_ids
        self.temperature, self.top_p = temperature, top_p
        self.waiting = deque(range(len(prompts)))
        self.running: dict[int, int] = {}  # row -> prompt index
        self.tokens: dict[int, list[int]] = {}  # prompt index -> its tokens so far
        self.free = list(range(batcher.rows))
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.steps = 0

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def tick(self) -> list[Finished]:
        """Fill free rows from the queue (one prefill), then one decode step if any row runs."""
        finished: list[Finished] = []
        if self.waiting and self.free:
            admit = [self.waiting.popleft() for _ in range(min(len(self.free), len(self.waiting)))]
            rows = [self.free.pop(0) for _ in admit]
            t0 = time.perf_counter()
            first = self.batcher.prefill(rows, [self.prompts[i] for i in admit], [self.temperature] * len(rows),
                                         [self.top_p] * len(rows)).tolist()
            self.prefill_seconds += time.perf_counter() - t0
            for row, i, tok in zip(rows, admit, first):
                self.running[row], self.tokens[i] = i, []
                self._add(row, tok, finished)
        if self.running:
            t0 = time.perf_counter()
            out = self.batcher.step().tolist()
            self.decode_seconds += time.perf_counter() - t0
            self.steps += 1
            for row in list(self.running):
                self._add(row, out[row], finished)
        return finished

    def _add(self, row: int, token: int, finished: list[Finished]) -> None:
        i = self.running[row]
        toks = self.tokens[i]
        toks.append(token)
        stopped = token in self.stop_ids
        if stopped or len(toks) >= self.limits[i]:
            del self.running[row], self.tokens[i]
            self.batcher.release([row])
            self.free.append(row)
            finished.append(Finished(i, toks, stopped))
