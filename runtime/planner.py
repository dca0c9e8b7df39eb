"""The engine's one scheduler: which sequences run, which blocks they hold, what each step computes.

`Planner` keeps the waiting queue (first come, first served), the running sequences in the batcher's rows
and the KV cache's blocks (`runtime.kvcache.BlockPool`). Each `plan()` says what one step does:
- rows whose sequence ended are freed (their blocks go back to the pool; full blocks stay findable);
- with sliding-window layers (`window`), each sequence holds window blocks (runtime/kvcache.py) only from the
  first position its next queries can see, and gives the older ones back (findable, like a finished
  sequence's) as it grows; a prefix-cache hit counts only as far as the window blocks before its end are
  cached too;
- every decoding sequence gets the block its next token's key goes to; when the pool is out of blocks the
  newest running sequence is preempted: its blocks are given back and it waits at the head of the queue, to
  be prefilled again (prompt and the tokens it has drawn; most of it found in the prefix cache) and go on
  where it stopped, so nothing fails and its greedy tokens are what it would get alone (a sampled one draws
  on from where it was, from other random numbers than it would have without the preemption);
- at most `max_prefill_tokens` prompt tokens are computed (chunked prefill): sequences part-way through
  their prompt go on first, then waiting ones join the lowest free rows while blocks allow, each skipping
  the whole blocks of its prompt the prefix cache holds.
A `Plan` is plain data: the server's leader broadcasts it and every rank runs it (`execute`); the offline
queue (runtime/offline.py) computes the same plans on every rank. The drivers hand sampled tokens to the
sequences and call `finish` when one ends (a stop token, its limit, a cancel).

Async scheduling (generation.async_scheduling): a driver launches step N + 1 before reading step N's tokens.
`launch()` after each launch marks every decoding sequence with one token in flight (`Seq.inflight`), which
the next plan counts (the key that step writes, the blocks a finished sequence's tokens fill); `land()` takes
the token when it is read, unless the sequence has left its row since (`Seq.epoch`): a finished sequence's
extra step then goes to no one, and a preempted sequence (its in-flight token dropped) draws it again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from runtime.kvcache import BLOCK_SIZE, SCRATCH, WINDOW_TAG, BlockPool, blocks_for, sequence_blocks


@dataclass
class Seq:
    """One request as the planner sees it."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    payload: Any = None
    """The driver's handle (the server's Submission, the offline prompt's index)."""
    tokens: list[int] = field(default_factory=list)
    """Tokens drawn so far (kept across preemptions)."""
    blocks: list[int] = field(default_factory=list)
    wblocks: list[int] = field(default_factory=list)
    """Window-table blocks, as long as `blocks`; SCRATCH where given back (behind the window)."""
    wlow: int = 0
    """wblocks before this index are all SCRATCH: the window slides on from here (a step's look at each
    sequence is then O(1), not O(its blocks): 3.7 ms of host time a plan at 512 rows before)."""
    done: int = 0
    """While prefilling: tokens of `fed()` whose keys are in its blocks."""
    cached_tokens: int = 0
    """Prompt tokens found in the prefix cache at its first admission (the usage's cached_tokens)."""
    row: int = -1
    preemptions: int = 0
    keys: list[bytes] = field(default_factory=list)
    """Content keys of the full blocks of `fed()` looked up so far (kept while it waits: computed once)."""
    inflight: int = 0
    """Decode steps launched for it whose token is not in `tokens` yet (async scheduling: at most 1)."""
    epoch: int = 0
    """How many times it has left a row: a launched step's token for an earlier stay is not its own any more."""

    def fed(self) -> list[int]:
        """What a prefill computes: the prompt and every token drawn (a preempted sequence's are fed again)."""
        return self.prompt + self.tokens if self.tokens else self.prompt


@dataclass
class Admit:
    """A prefill: a row's sequence (prompt and drawn tokens) from `cached` to `end` (None: to its end, then it
    decodes; else a chunk, the rest in later steps)."""

    row: int
    prompt: list[int]
    temperature: float
    top_p: float
    cached: int = 0
    end: int | None = None

    @property
    def computed(self) -> int:
        """Prompt tokens this step computes."""
        return (len(self.prompt) if self.end is None else self.end) - self.cached


@dataclass
class Plan:
    """One step for every rank: free rows, set block tables, prefill, decode the batch (or stop)."""

    release: list[int] = field(default_factory=list)
    tables: dict[int, list[int]] = field(default_factory=dict)
    """Rows whose block list changed: the whole list."""
    window_tables: dict[int, list[int]] = field(default_factory=dict)
    """Rows whose window-table list changed (with sliding layers): the whole list."""
    admit: list[Admit] = field(default_factory=list)
    decode: bool = False
    shutdown: bool = False


class Planner:
    """Waiting and running sequences over `rows` rows and a pool of blocks."""

    def __init__(self, rows: int, pool: BlockPool, max_blocks: int, max_prefill_tokens: int,
                 window: int | None = None) -> None:
        peak = sequence_blocks(max_blocks, window, max_prefill_tokens)
        if pool.num_blocks < peak:
            raise ValueError(f"a KV cache of {pool.num_blocks} blocks cannot hold one sequence of {max_blocks} "
                             f"blocks ({peak} with its sliding-window blocks while a chunk is prefilled)")
        self.pool, self.max_blocks = pool, max_blocks
        self.window = window
        """Positions the sliding-window layers see (None: no such layers, no window tables)."""
        self.max_prefill_tokens = max_prefill_tokens
        self.rows: list[Seq | None] = [None] * rows
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []  # admission order
        self.filling: set[int] = set()  # rows part-way through their prompt
        self.preemptions = 0
        self.cached_tokens = 0
        """Prompt tokens found in the prefix cache at first admissions, in all."""
        self.prompt_tokens = 0
        """Prompt tokens of the sequences admitted, in all (first admissions)."""
        self._freed: list[int] = []  # rows freed since the last plan
        self._admitted: list[Seq] = []  # sequences whose new prompt blocks become findable at the next plan

    def fits(self, prompt_len: int, max_tokens: int) -> bool:
        """Whether a sequence of this prompt and answer can ever run (it fits a row and the whole cache)."""
        return blocks_for(prompt_len + max_tokens) <= self.max_blocks

    def add(self, seq: Seq) -> None:
        if not self.fits(len(seq.prompt), seq.max_tokens):
            raise ValueError(f"a prompt of {len(seq.prompt)} tokens and {seq.max_tokens} new ones exceed a row's "
                             f"{self.max_blocks * BLOCK_SIZE} positions")
        self.waiting.append(seq)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def decoding(self, row: int) -> bool:
        return self.rows[row] is not None and row not in self.filling

    def written(self, seq: Seq) -> list[int]:
        """The tokens whose keys `seq`'s blocks hold: its prefill so far, or all fed but the last drawn (with a
        step in flight: all drawn, the last one's key being that step's; it lands before any block is reused)."""
        if seq.row in self.filling:
            return seq.fed()[: seq.done]
        return seq.prompt + seq.tokens if seq.inflight else seq.prompt + seq.tokens[:-1]

    def launch(self) -> list[tuple[int, Seq, int]]:
        """A decode step was launched and its tokens will be read later (async scheduling): (row, sequence, epoch)
        of each decoding row, for `land`; until then each counts one token more (the blocks the next step
        writes, what its blocks hold)."""
        out = []
        for row, seq in enumerate(self.rows):  # row order: the order the drivers book a step's tokens in
            if self.decoding(row):
                seq.inflight += 1
                out.append((row, seq, seq.epoch))
        return out

    def land(self, launched: list[tuple[int, Seq, int]], tokens: list[int]) -> list[tuple[Seq, int]]:
        """A step `launch` listed has been read (`tokens`, one per row): each sequence still in the row it ran in
        with its token, for the driver to book (in row order). A sequence that has left its row since gets nothing:
        a finished one's extra step goes to no one, a preempted one draws its token again."""
        out = []
        for row, seq, epoch in launched:
            if seq.epoch == epoch and seq.inflight >= 1:
                seq.inflight -= 1
                out.append((seq, tokens[row]))
        return out

    def finish(self, seq: Seq) -> None:
        """The sequence ended (or is dropped): its row is freed at the next plan, its blocks now."""
        self._leave(seq)

    def _register(self, seq: Seq) -> None:
        """The full blocks `seq` has written become findable (its window blocks by the same keys + WINDOW_TAG)."""
        written = self.written(seq)
        keys = self._keys(seq, len(written) // BLOCK_SIZE)
        self.pool.register(seq.blocks, written, keys)
        if seq.wblocks:
            self.pool.register(seq.wblocks, written, keys, WINDOW_TAG)

    def _leave(self, seq: Seq) -> None:
        self._register(seq)
        self.pool.unref(seq.blocks)
        self.pool.unref(seq.wblocks)
        self.rows[seq.row] = None
        self.running.remove(seq)
        self.filling.discard(seq.row)
        self._freed.append(seq.row)
        seq.blocks, seq.wblocks, seq.wlow, seq.done, seq.row = [], [], 0, 0, -1
        seq.inflight, seq.epoch = 0, seq.epoch + 1  # a step in flight for it is not its own any more

    def _keys(self, seq: Seq, n: int) -> list[bytes]:
        """The content keys of the first n full blocks of `seq.fed()` (kept on the sequence: computed once);
        none without the prefix cache."""
        if not self.pool.prefix_cache:
            return []
        if len(seq.keys) < n:
            seq.keys = self.pool.keys(seq.fed(), n, seq.keys)
        return seq.keys[:n]

    def _first_window_block(self, query: int) -> int:
        """The first block a sliding layer's query at this position (or later) reads."""
        return max(0, query - self.window + 1) // BLOCK_SIZE if self.window else 0

    def _slide(self, seq: Seq, query: int, plan: Plan) -> None:
        """Give back the window blocks before what a query at `query` and later ones read (findable, as they were
        written: behind the window, they are full)."""
        lo = min(self._first_window_block(query), len(seq.wblocks))
        if lo <= seq.wlow:
            return
        old = [j for j in range(seq.wlow, lo) if seq.wblocks[j] != SCRATCH]
        seq.wlow = lo
        if not old:
            return
        keys = self._keys(seq, lo)
        self.pool.register_keyed([seq.wblocks[j] for j in old], [keys[j] + WINDOW_TAG for j in old] if keys else [])
        self.pool.unref([seq.wblocks[j] for j in old])
        for j in old:
            seq.wblocks[j] = SCRATCH
        plan.window_tables[seq.row] = list(seq.wblocks)

    def _preempt(self, seq: Seq) -> None:
        self._leave(seq)
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _grow(self, seq: Seq, blocks: int, query: int, plan: Plan) -> bool:
        """Give `seq` blocks up to `blocks` in all (and window blocks from what a query at `query` reads), preempting
        newer sequences while the pool is short; False when `seq` is the newest and the pool still is."""
        if self.window and self._first_window_block(query) > seq.wlow:
            self._slide(seq, query, plan)
        grow = blocks - len(seq.blocks)
        if grow <= 0:
            return True
        need = 2 * grow if self.window else grow  # (a new block's window block too)
        while self.pool.available < need:
            victim = next((s for s in reversed(self.running) if s is not seq), None)
            if victim is None or self.running.index(victim) < self.running.index(seq):
                return False
            self._preempt(victim)
        new = self.pool.allocate(need)
        assert new is not None
        seq.blocks += new[:grow]
        plan.tables[seq.row] = list(seq.blocks)
        if self.window:
            seq.wblocks += new[grow:]
            plan.window_tables[seq.row] = list(seq.wblocks)
        return True

    def plan(self) -> Plan:
        plan = Plan()
        for seq in self._admitted:
            if seq.row >= 0:
                self._register(seq)
        self._admitted = []
        # the decode step's blocks, oldest sequence first (newest preempted when short)
        for seq in list(self.running):
            if seq.row < 0 or seq.row in self.filling:
                continue  # preempted meanwhile, or still prefilling
            at = len(seq.prompt) + len(seq.tokens) + seq.inflight - 1  # where the last drawn token's key goes
            if at // BLOCK_SIZE < len(seq.blocks) and self._first_window_block(at) <= seq.wlow:
                continue  # (most steps: its block is held and its window has not moved past a block)
            if not self._grow(seq, at // BLOCK_SIZE + 1, at, plan):
                self._preempt(seq)
        budget = self.max_prefill_tokens
        stalled = False  # a sequence part-way in could not go on: admitting newer ones would only preempt them
        for seq in [s for s in self.running if s.row in self.filling]:  # chunks of prompts part-way in
            if budget <= 0:
                break
            if seq.row < 0:
                continue
            fed = seq.fed()
            end = min(len(fed), seq.done + budget)
            if not self._grow(seq, blocks_for(end + (end == len(fed))), seq.done, plan):
                stalled = True
                break
            plan.admit.append(self._admit(seq, fed, seq.done, end))
            budget -= end - plan.admit[-1].cached
        free = [r for r, s in enumerate(self.rows) if s is None]
        while self.waiting and free and budget > 0 and not stalled:
            seq = self.waiting[0]
            fed = seq.fed()
            if self.pool.prefix_cache:
                seq.keys = self.pool.keys(fed, (len(fed) - 1) // BLOCK_SIZE, seq.keys)
            hits, whits, lo = self._hits(seq)
            start = len(hits) * BLOCK_SIZE
            end = min(len(fed), start + budget)
            self.pool.take(hits + whits)  # before allocating: the hits are not evicted for this one's new blocks
            grow = blocks_for(end + (end == len(fed))) - len(hits)
            new = self.pool.allocate(2 * grow if self.window else grow)
            if new is None:  # the pool is full: wait for blocks (first come, first served)
                self.pool.unref(hits + whits)
                break
            self.waiting.popleft()
            seq.row, seq.blocks = free.pop(0), hits + new[:grow]
            if self.window:
                seq.wblocks, seq.wlow = [SCRATCH] * lo + whits + new[grow:], lo
                plan.window_tables[seq.row] = list(seq.wblocks)
            if not seq.tokens and not seq.preemptions:
                seq.cached_tokens = start
                self.cached_tokens += start
                self.prompt_tokens += len(seq.prompt)
            self.rows[seq.row] = seq
            self.running.append(seq)
            plan.tables[seq.row] = list(seq.blocks)
            plan.admit.append(self._admit(seq, fed, start, end))
            budget -= end - start
        plan.release, self._freed = sorted(set(self._freed)), []  # (a row taken again is released first)
        plan.decode = any(s.row not in self.filling for s in self.running)
        return plan

    def _hits(self, seq: Seq) -> tuple[list[int], list[int], int]:
        """The cached blocks a waiting sequence starts from: (full-layer blocks of its longest cached prefix, the
        window blocks from the first one its first computed query reads, that first block's index). With
        sliding layers the prefix is cut back until those window blocks are cached too."""
        hits = self.pool.match(seq.keys)
        if not self.window or not hits:
            return hits, [], 0
        window = [self.pool.find(k + WINDOW_TAG) for k in seq.keys[: len(hits)]]
        missing = -1  # the last block before n without a cached window block (one pass, not one per n)
        last_missing = []
        for j, b in enumerate(window):
            last_missing.append(missing)
            if b is None:
                missing = j
        last_missing.append(missing)
        for n in range(len(hits), 0, -1):
            lo = self._first_window_block(n * BLOCK_SIZE)
            if last_missing[n] < lo:
                return hits[:n], window[lo:n], lo  # type: ignore[return-value]
        return [], [], 0

    def _admit(self, seq: Seq, fed: list[int], start: int, end: int) -> Admit:
        seq.done = end
        self._admitted.append(seq)
        if end < len(fed):
            self.filling.add(seq.row)
            return Admit(seq.row, fed, seq.temperature, seq.top_p, start, end)
        self.filling.discard(seq.row)
        return Admit(seq.row, fed, seq.temperature, seq.top_p, start)


def execute_prefill(plan: Plan, batcher: Any, everywhere: bool = False) -> list[int] | None:
    """Free the plan's rows, set its block tables, run its prefills on this rank; the first tokens of the
    sequences that completed their prompt (a host list on the leader, or `everywhere`; None elsewhere)."""
    batcher.release(plan.release)
    batcher.set_tables(plan.tables, plan.window_tables)
    part = [a for a in plan.admit if a.end is not None]
    if part:  # chunks of longer prompts: keys stored, nothing sampled, the rows wait for their next chunk
        batcher.prefill([a.row for a in part], [a.prompt[: a.end] for a in part], [a.temperature for a in part],
                        [a.top_p for a in part], [a.cached for a in part], partial=True)
    whole = [a for a in plan.admit if a.end is None]
    listed = batcher.leader or everywhere
    if not whole:
        return [] if listed else None
    out = batcher.prefill([a.row for a in whole], [a.prompt for a in whole], [a.temperature for a in whole],
                          [a.top_p for a in whole], [a.cached for a in whole])
    return out.tolist() if listed else None


def execute(plan: Plan, batcher: Any) -> tuple[list[int] | None, list[int] | None]:
    """Run a plan on this rank; (first tokens of the completed prefills, one token per row), as host lists on
    the leader (None elsewhere, where nothing waits for them)."""
    first = execute_prefill(plan, batcher)
    step = None
    if plan.decode:
        out = batcher.step()
        step = out.tolist() if batcher.leader else None
    return first, step
