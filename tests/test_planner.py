"""The engine's scheduler on the host (runtime/planner.py, runtime/kvcache.BlockPool), no model: blocks handed
out and back, the prefix cache's keys and eviction order, chunked admission, and preemption when blocks run
out; then preemption on the tiny model, whose tokens must not change."""

from __future__ import annotations

import pytest

from runtime.kvcache import BLOCK_SIZE, BlockPool
from runtime.planner import Planner, Seq

B = BLOCK_SIZE


def test_blocks_are_handed_out_and_back() -> None:
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert a == [1, 2, 3] and pool.available == 1
    assert pool.allocate(2) is None and pool.available == 1  # nothing taken on a refusal
    pool.release(a, [])  # content unknown: plain free blocks
    assert pool.available == 4 and pool.lookup(list(range(5 * B))) == []


def test_the_prefix_cache_finds_whole_blocks_by_content_and_everything_before() -> None:
    pool = BlockPool(8)
    tokens = list(range(3 * B + 5))
    blocks = pool.allocate(4)
    pool.register(blocks, tokens)  # while running: its 3 full blocks are findable
    assert pool.lookup(tokens) == blocks[:3]
    assert pool.lookup(tokens[: 3 * B]) == blocks[:2]  # the last token is always computed
    assert pool.lookup(tokens[:B] + [999] + tokens[B + 1 :]) == blocks[:1]  # a difference ends the match
    other = [7] * B + tokens[B : 2 * B]  # block 2's tokens after another block 1: not the same keys
    assert pool.lookup(other + [0]) == []
    pool.release(blocks, tokens)
    assert pool.available == 8 and pool.lookup(tokens) == blocks[:3]  # freed, still findable
    off = BlockPool(8, prefix_cache=False)
    kept = off.allocate(2)
    off.release(kept, tokens)
    assert off.lookup(tokens) == []


def test_cached_blocks_are_evicted_least_recently_freed_first_and_never_while_held() -> None:
    pool = BlockPool(4)
    first, second = list(range(B + 1)), list(range(100, 100 + B + 1))
    a, b = pool.allocate(1), pool.allocate(1)
    pool.release(a, first)
    pool.release(b, second)
    assert pool.lookup(first) == a and pool.lookup(second) == b
    pool.take(pool.lookup(second))  # a sequence shares b
    fresh = pool.allocate(3)  # two fresh blocks, then a (the oldest unreferenced cached one)
    assert fresh is not None and a[0] in fresh and b[0] not in fresh
    assert pool.lookup(first) == [] and pool.lookup(second) == b
    assert pool.allocate(1) is None  # b is held


def test_a_freed_chain_is_evicted_from_its_tail_so_its_head_stays_findable() -> None:
    """Blocks of an ended sequence are evicted last block first: taking one block's room leaves the chain's first
    blocks findable (evicting its first block would have made every later one unreachable)."""
    pool = BlockPool(4)
    tokens = list(range(3 * B + 1))
    chain = pool.allocate(3)
    pool.release(chain, tokens)
    assert pool.lookup(tokens) == chain
    assert pool.allocate(2) is not None  # the free block, then the chain's last
    assert pool.lookup(tokens) == chain[:2]


def test_the_content_keys_are_a_digest_chain() -> None:
    """Keys are BLAKE2b digests of the previous key and the block's tokens: equal prefixes give equal keys,
    a change anywhere before changes every later key, and keys computed in part are reused."""
    a = list(range(3 * B))
    b = a[:5] + [999] + a[6:]
    ka, kb = BlockPool.keys(a, 3), BlockPool.keys(b, 3)
    assert all(len(k) == 16 for k in ka) and len(set(ka)) == 3
    assert ka[0] != kb[0] and ka[1] != kb[1] and ka[2] != kb[2]
    assert BlockPool.keys(a, 3, ka[:1]) == ka and BlockPool.keys(a + [1] * B, 4, ka)[:3] == ka


def drive(planner: Planner, draw: int = 5) -> dict[int, list[int]]:
    """Run plans to the end as a driver would, every drawn token `draw` + the row; tokens per payload."""
    out: dict[int, list[int]] = {}
    for _ in range(10_000):
        if planner.idle:
            return out
        plan = planner.plan()
        for a in plan.admit:
            assert a.cached % B == 0 or a.cached == planner.rows[a.row].done - a.computed
        for a in [a for a in plan.admit if a.end is None]:
            deliver(planner, a.row, draw, out)
        if plan.decode:
            for r in range(len(planner.rows)):
                if planner.decoding(r) and not any(a.row == r and a.end is None for a in plan.admit):
                    deliver(planner, r, draw, out)
    raise AssertionError("the planner did not finish")


def deliver(planner: Planner, row: int, draw: int, out: dict[int, list[int]]) -> None:
    seq = planner.rows[row]
    assert seq is not None
    seq.tokens.append(draw)
    if len(seq.tokens) >= seq.max_tokens:
        out[seq.payload] = list(seq.tokens)
        planner.finish(seq)


def test_admission_takes_free_rows_within_the_token_budget_and_chunks_long_prompts() -> None:
    planner = Planner(2, BlockPool(64), 8, max_prefill_tokens=40)
    for i, n in enumerate((30, 50, 10)):
        planner.add(Seq([i] * n, 3, payload=i))
    plan = planner.plan()
    assert [(a.row, a.cached, a.end) for a in plan.admit] == [(0, 0, None), (1, 0, 10)]  # 30 + 10 tokens
    assert plan.tables == {0: [1, 2], 1: [3]} and plan.decode  # row 0 decodes: its next key's block is there
    plan = planner.plan()
    assert [(a.row, a.cached, a.end) for a in plan.admit][0] == (1, 10, None)  # row 1 goes on first, to its end
    with pytest.raises(ValueError, match="exceed"):
        planner.add(Seq([0] * 120, 9))  # 129 positions > 8 blocks of 16


def test_when_blocks_run_out_the_newest_sequence_is_preempted_and_resumes() -> None:
    """Three sequences that together outgrow a 9-block cache: the newest is preempted (its row freed, back at
    the head of the queue) and recomputed later from its prompt and tokens; every one gets all its tokens."""
    planner = Planner(3, BlockPool(9), 6, max_prefill_tokens=1000)
    for i in range(3):
        planner.add(Seq([10 * i + 1] * 20, 40, payload=i))  # 20 + 40 positions: 4 blocks each, 12 in all
    preempted_rows = []
    out: dict[int, list[int]] = {}
    for _ in range(1000):
        if planner.idle:
            break
        plan = planner.plan()
        preempted_rows += [r for r in plan.release if planner.rows[r] is None or r in plan.tables]
        for a in [a for a in plan.admit if a.end is None]:
            deliver(planner, a.row, 5, out)
        for r in range(3):
            if plan.decode and planner.decoding(r) and not any(a.row == r for a in plan.admit):
                deliver(planner, r, 5, out)
        used = sum(len(s.blocks) for s in planner.running)
        assert used <= 9
    assert planner.preemptions >= 1 and preempted_rows
    assert sorted(out) == [0, 1, 2] and all(len(t) == 40 for t in out.values())
    assert planner.pool.available == 9  # every block back


def test_a_sequence_that_can_never_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        Planner(2, BlockPool(3), 4, 100)


@pytest.mark.parametrize("reuse,attention,overlap", [(True, "eager", False), (False, "eager", False),
                                                    (True, "triton", False), (True, "eager", True)])
def test_preemption_keeps_each_prompts_tokens(reuse: bool, attention: str, overlap: bool) -> None:
    """The tiny model (float32) with mixed prompt and output lengths over 3 rows and a KV cache too small for
    them all: sequences are preempted and recomputed (from the prefix cache, or whole), and each prompt's
    greedy tokens equal those it gets alone (attention=triton: prefills padded to fixed widths, read through
    the block tables; its kernel through the torch fallback here; overlap: async scheduling, where a sequence
    preempted with a step in flight draws that step's token again)."""
    from runtime import compose
    from runtime.continuous import ContinuousBatcher
    from runtime.engine import Engine, Request
    from runtime.kvcache import blocks_for
    from runtime.offline import QueueRun

    engine = Engine(compose("generate", ["model.device=cpu", f"attention={attention}"]))
    texts = ["hi", "What is the capital of France?", "2+2?", "Tell me a story about a lighthouse keeper."]
    limits = [40, 12, 33, 25]
    prompts = [engine.render(Request(id=str(i), prompt=t)) for i, t in enumerate(texts)]
    longest = max(len(p) + m for p, m in zip(prompts, limits))
    alone = [engine.decode([p], m, ignore_eos=True).tokens[0].tolist() for p, m in zip(prompts, limits)]
    b = ContinuousBatcher(engine.model, engine.dtype, engine.device, rows=3, max_len=longest, max_prefill_tokens=4096,
                          use_graph=False, compile=False, group=None, leader=True, generator=engine.generator,
                          num_blocks=2 * blocks_for(longest) + 3)  # (one prefill: its blocks and windows)
    run = QueueRun(b, prompts, limits, set(), reuse_prefix=reuse, overlap=overlap)
    got: dict[int, list[int]] = {}
    while not run.done:
        for f in run.tick():
            got[f.index] = f.tokens
    assert run.planner.preemptions > 0
    assert [got[i] for i in range(len(texts))] == alone
    assert bool(b.prefill_widths) == (attention == "triton")  # (triton: the padded prefills ran)



def test_sliding_window_blocks_are_given_back_behind_the_window() -> None:
    """With sliding-window layers (window 32), a sequence holds full-layer blocks for every position but window
    blocks only from the first one its next query reads: decoding 150 tokens it never holds more than 3, the
    window table says so (SCRATCH behind), the ones given back stay findable by content, and all come back."""
    from runtime.kvcache import SCRATCH, WINDOW_TAG

    planner = Planner(1, BlockPool(64), 16, max_prefill_tokens=1000, window=32)
    seq = Seq(list(range(40)), 150, payload=0)
    planner.add(seq)
    out: dict[int, list[int]] = {}
    most = 0
    for _ in range(1000):
        if planner.idle:
            break
        plan = planner.plan()
        if seq.row >= 0:
            assert len(seq.wblocks) == len(seq.blocks)
            if 0 in plan.window_tables:
                assert plan.window_tables[0] == seq.wblocks
            at = len(seq.prompt) + len(seq.tokens) - 1  # the query this step feeds (decoding)
            held = [j for j, b in enumerate(seq.wblocks) if b != SCRATCH]
            if seq.tokens:
                assert held == list(range(max(0, at - 31) // B, len(seq.blocks))), (at, held)
                most = max(most, len(held))
            for j in range(held[0]):  # given back, findable as that content's window block
                assert planner.pool.find(planner._keys(seq, j + 1)[j] + WINDOW_TAG) is not None
        for a in [a for a in plan.admit if a.end is None]:
            deliver(planner, a.row, 5, out)
        if plan.decode and planner.decoding(0) and not plan.admit:
            deliver(planner, 0, 5, out)
    assert len(out[0]) == 150 and most == 3
    assert planner.pool.available == 64


def test_a_prefix_hit_needs_the_window_blocks_before_its_end() -> None:
    """A prefix-cache hit with sliding layers: the first computed query reads the window before it, so the hit
    counts only as far as those window blocks are cached too. A long sequence gives its early window blocks back
    as it decodes; while they are cached, a prompt sharing its first 64 tokens starts at 64; once they are
    evicted (the least recently freed go first), it is computed whole, while a prompt sharing its first 208
    tokens (window blocks given back last) still starts at 208."""
    from runtime.kvcache import WINDOW_TAG

    def run_a() -> Planner:
        planner = Planner(2, BlockPool(40), 16, max_prefill_tokens=1000, window=32)
        planner.add(Seq(list(range(100)), 120, payload="a"))
        drive(planner)
        return planner

    def admit(planner: Planner, prompt: list[int]) -> int:
        planner.add(Seq(prompt, 2, payload="b"))
        plan = planner.plan()
        return plan.admit[0].cached

    a_tokens = list(range(100)) + [5] * 119  # what A wrote (its last token's key never is): 13 full blocks
    planner = run_a()
    assert admit(planner, a_tokens[:64] + [999] * 10) == 64
    planner = run_a()
    pool = planner.pool
    order = [pool.key_of[b].endswith(WINDOW_TAG) for b in pool.cached]  # least recently freed first
    slid = order.index(False)  # window blocks 0..10, given back while A decoded, before its end freed the rest
    assert slid == 11 and sum(order) == 13
    evicted = pool.allocate(len(pool.free) + slid)
    assert evicted is not None
    pool.release(evicted, [])  # (plain free blocks again)
    assert len(pool.match(pool.keys(a_tokens, 13))) == 13  # every full-layer block is still cached
    assert admit(planner, a_tokens[:64] + [999] * 10) == 0  # its window (blocks 2, 3) is gone
    planner.finish(planner.running[0])
    assert admit(planner, a_tokens[:208] + [999] * 10) == 208  # reads window blocks 11 and 12, cached


class FakeDevice:
    """What the batcher holds, told only what the plans tell it: block tables, window tables, busy rows and their
    positions. Every key slot written gets a label (the layer kind and the token prefix it was computed from);
    every read checks the label is the reader's own prefix there: a block handed to two sequences at once (as a
    full or a window block: they share memory, as on the device), a stale table, a prefix hit on other content
    or a window block given back too early all fail."""

    def __init__(self, rows: int, window: int | None) -> None:
        self.window = window
        self.table: dict[int, list[int]] = {}
        self.wtable: dict[int, list[int]] = {}
        self.pos = [-1] * rows  # -1: not decoding
        self.fed: dict[int, list[int]] = {}  # a row's tokens, as fed
        self.slots: dict[tuple[int, int], tuple[str, tuple[int, ...]]] = {}  # (block, slot) -> (kind, prefix)

    def _slot(self, kind: str, row: int, p: int) -> tuple[int, int]:
        table = self.table if kind == "f" else self.wtable
        block = table[row][p // B]
        assert block != 0, (kind, row, p)
        return block, p % B

    def _write(self, row: int, p: int) -> None:
        for kind in ("f", "w") if self.window else ("f",):
            self.slots[self._slot(kind, row, p)] = (kind, tuple(self.fed[row][: p + 1]))

    def _read(self, row: int, lo: int, hi: int) -> None:
        """The queries at [lo, hi) read the full layers' [0, hi) and the window before each."""
        for kind, first in (("f", 0), ("w", max(0, lo - self.window + 1) if self.window else hi)):
            for p in range(first, hi):
                assert self.slots.get(self._slot(kind, row, p)) == (kind, tuple(self.fed[row][: p + 1])), (kind, row, p)

    def apply(self, plan) -> None:  # type: ignore[no-untyped-def]
        for r in plan.release:
            self.pos[r] = -1
        self.table.update({r: list(b) for r, b in plan.tables.items()})
        self.wtable.update({r: list(b) for r, b in plan.window_tables.items()})

    def prefill(self, row: int, fed: list[int], cached: int, end: int | None) -> None:
        stop = len(fed) if end is None else end
        self.fed[row] = list(fed[:stop])
        for p in range(cached, stop):
            self._write(row, p)
        self._read(row, cached, stop)
        self.pos[row] = stop if end is None else -1

    def step(self, live: set[int]) -> None:
        for r, p in enumerate(self.pos):
            if p >= 0:
                self._write(r, p)
                if r in live:
                    self._read(r, p, p + 1)
                self.pos[r] += 1


def simulate(seed: int, window: int | None, prefix_cache: bool) -> Planner:
    """A random workload (prompts from a few shared stems, random lengths, late arrivals, cancels, a cache as
    small as allowed or a little larger) driven as runtime.offline.QueueRun drives it, over a FakeDevice."""
    import random

    from runtime.kvcache import window_blocks

    rng = random.Random(seed)
    rows, max_blocks = rng.randint(1, 4), rng.randint(3, 8)
    budget = rng.choice([8, 16, 40, 1000])
    peak = max_blocks + (min(max_blocks, window_blocks(window, budget)) if window else 0)
    planner = Planner(rows, BlockPool(rng.randint(peak, peak + 24), prefix_cache), max_blocks, budget, window)
    dev = FakeDevice(rows, window)
    cap = max_blocks * B
    stems = [[rng.randrange(40) for _ in range(rng.randint(0, cap - 8))] for _ in range(3)]

    def new_seq(i: int) -> Seq:
        prompt = (rng.choice(stems) + [rng.randrange(40) for _ in range(rng.randint(1, 20))])[: cap - 2]
        return Seq(prompt, rng.randint(1, cap - len(prompt)), payload=i)

    pending = [new_seq(i) for i in range(rng.randint(2, 10))]
    out: dict[int, list[int]] = {}
    for _ in range(20_000):
        while pending and (not planner.running or rng.random() < 0.3):
            planner.add(pending.pop())
        if planner.idle and not pending:
            break
        if planner.running and rng.random() < 0.02:  # a client goes away
            planner.finish(rng.choice(planner.running))
        plan = planner.plan()
        dev.apply(plan)
        held = [0] * (planner.pool.num_blocks + 1)  # every block's holders are the running sequences' tables
        for seq in planner.running:
            for b in seq.blocks + [b for b in seq.wblocks if b]:
                held[b] += 1
        assert held[1:] == planner.pool.refs[1:]
        for a in plan.admit:
            seq = planner.rows[a.row]
            assert seq is not None and dev.table[a.row] == seq.blocks
            dev.prefill(a.row, a.prompt, a.cached, a.end)

        def add(row: int, token: int) -> None:
            seq = planner.rows[row]
            if seq is None:
                return
            seq.tokens.append(token)
            dev.fed[row].append(token)
            if len(seq.tokens) >= seq.max_tokens:
                out[seq.payload] = list(seq.tokens)
                planner.finish(seq)

        for a in [a for a in plan.admit if a.end is None]:
            add(a.row, rng.randrange(40))
        if plan.decode:
            dev.step({r for r in range(rows) if planner.decoding(r)})
            for r in range(rows):
                if planner.decoding(r):
                    add(r, rng.randrange(40))
    else:
        raise AssertionError("the planner did not finish")
    assert planner.pool.available == planner.pool.num_blocks  # every block back
    return planner


@pytest.mark.parametrize("window", [None, 32, 16])
def test_random_workloads_read_only_what_they_wrote(window: int | None) -> None:
    """Seeded random workloads with and without sliding layers and the prefix cache: every key read, through the
    tables the plans gave, is the reader's own (FakeDevice), and every block comes back; some of them preempt,
    and some hit the prefix cache."""
    preempted = hits = 0
    for seed in range(100):
        planner = simulate(seed, window, prefix_cache=seed % 3 != 0)
        preempted += planner.preemptions
        hits += planner.cached_tokens
    assert preempted > 0 and hits > 0


@pytest.mark.parametrize("attention", ["eager", "triton"])
def test_a_long_sequence_fits_a_cache_that_holds_its_full_layers_and_one_window(attention: str) -> None:
    """The tiny model (window 32): a 250-position sequence in 22 blocks, which hold its 16 full-layer blocks and a
    window's, not 32 (every layer's): prefilled 16 tokens a step, decoded to the end without a preemption, the
    greedy tokens it gets from the engine alone (the sliding layers read through the window table, the given-back
    blocks reused for its next ones)."""
    from runtime import compose
    from runtime.continuous import ContinuousBatcher
    from runtime.engine import Engine, Request
    from runtime.offline import QueueRun

    engine = Engine(compose("generate", ["model.device=cpu", f"attention={attention}"]))
    prompt = engine.render(Request(id="0", prompt="A prompt long enough for a few windows of the tiny model " * 2))
    new = 250 - len(prompt)
    assert 64 < len(prompt) < 150
    alone = engine.decode([prompt], new, ignore_eos=True).tokens[0].tolist()
    b = ContinuousBatcher(engine.model, engine.dtype, engine.device, rows=1, max_len=256, max_prefill_tokens=16,
                          use_graph=False, compile=False, group=None, leader=True, generator=engine.generator,
                          num_blocks=22)
    run = QueueRun(b, [prompt], [new], set())
    got = []
    while not run.done:
        got += [f.tokens for f in run.tick()]
    assert got == [alone] and run.planner.preemptions == 0
