"""Offline continuous batching: all of a run's prompts queued at once over one ContinuousBatcher.

`rows` sequences decode together. When one ends (a stop token, or its token limit) its row is released
and the next waiting prompt is prefilled into it before the next step, so no sequence waits for the
longest one of a batch, as static rounds make it (runtime.generate's default, generation.batching=
continuous). Each prompt's tokens are what it would get alone: the batcher's rows never see each other.

Every rank of a model-parallel replica runs this same loop on the same prompts and receives the same
tokens from the batcher (its leader samples), so the ranks stay in step without exchanging anything else.
Prefix reuse (`reuse_prefix`): a row keeps the keys of its last sequence; a prompt joins the lowest free row
(every harmony prompt shares its system message with it), or a higher one holding a much longer prefix of it,
and only the rest is computed.

Chunked prefill (`chunk` tokens per tick): a tick prefills at most `chunk` prompt tokens, a long prompt a
piece at a time (its keys stay in its row between pieces), so running sequences never wait for more than
one chunk between their steps.

No files, no rank logic: runtime/engine.py gathers the replicas and orders the records.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.continuous import ContinuousBatcher, common_prefix, pick_row


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
                 stop_ids: set[int], temperature: float = 0.0, top_p: float = 1.0, chunk: int | None = None,
                 reuse_prefix: bool = True) -> None:
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
        self.chunk = chunk
        if chunk is not None and chunk < 1:
            raise ValueError("a prefill chunk is at least one token")
        self.filling: dict[int, tuple[int, int]] = {}  # row -> (prompt index, tokens of it in the row so far)
        self.reuse_prefix = reuse_prefix
        self.held = [np.zeros(0, dtype=np.int64)] * batcher.rows  # per row: the tokens whose keys it holds
        self.cached_tokens = 0  # prompt tokens not computed, their keys found in a row
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.steps = 0

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running and not self.filling

    def tick(self) -> list[Finished]:
        """Prefill: the rows part-way through their prompts first, then free rows from the queue, at most
        `chunk` prompt tokens in all; then one decode step if any row runs."""
        finished: list[Finished] = []
        budget = self.chunk if self.chunk is not None else float("inf")
        plan: list[tuple[int, int, int, int]] = []  # (row, prompt index, tokens already in, tokens after this)
        for row, (i, done) in list(self.filling.items()):
            if budget <= 0:
                break
            end = int(min(len(self.prompts[i]), done + budget))
            plan.append((row, i, done, end))
            budget -= end - done
        while self.waiting and self.free and budget > 0:
            i = self.waiting.popleft()
            row, start = self._best_row(self.prompts[i])
            self.free.remove(row)
            self.cached_tokens += start
            end = int(min(len(self.prompts[i]), start + budget))
            plan.append((row, i, start, end))
            budget -= end - start
        t0 = time.perf_counter()
        for final in (False, True):
            part = [(row, i, start, end) for row, i, start, end in plan if (end == len(self.prompts[i])) == final]
            if not part:
                continue
            rows = [row for row, *_ in part]
            out = self.batcher.prefill(rows, [self.prompts[i][:end] for _, i, _, end in part],
                                       [self.temperature] * len(rows), [self.top_p] * len(rows),
                                       cached=[start for *_, start, _ in part], partial=not final).tolist()
            for row, i, _, end in part:
                self.filling.pop(row, None)
                if not final:
                    self.filling[row] = (i, end)
            for (row, i, *_), tok in zip(part, out):
                self.running[row], self.tokens[i] = i, []
                self._add(row, tok, finished)
        if plan:
            self.prefill_seconds += time.perf_counter() - t0
        if self.running:
            t0 = time.perf_counter()
            out = self.batcher.step().tolist()
            self.decode_seconds += time.perf_counter() - t0
            self.steps += 1
            for row in list(self.running):
                self._add(row, out[row], finished)
        return finished

    def _best_row(self, prompt: Sequence[int]) -> tuple[int, int]:
        """The free row for `prompt` (`pick_row`: the lowest, unless another holds enough more of its prefix
        for the larger decode step it may cause) and that prefix's length, leaving the last token to compute."""
        if not self.reuse_prefix:
            return min(self.free), 0
        want = np.asarray(prompt, dtype=np.int64)
        common = [common_prefix(self.held[r], want, min(len(self.held[r]), len(want) - 1)) for r in self.free]
        busy = [*self.running, *self.filling]
        return pick_row(self.free, common, max(busy) + 1 if busy else 0, self.batcher.buckets)

    def _add(self, row: int, token: int, finished: list[Finished]) -> None:
        i = self.running[row]
        toks = self.tokens[i]
        toks.append(token)
        stopped = token in self.stop_ids
        if stopped or len(toks) >= self.limits[i]:
            del self.running[row], self.tokens[i]
            self.held[row] = np.asarray([*self.prompts[i], *toks[:-1]], dtype=np.int64)  # all fed: not the last drawn
            self.batcher.release([row])
            self.free.append(row)
            finished.append(Finished(i, toks, stopped))
