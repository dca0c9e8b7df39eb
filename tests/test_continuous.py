"""The continuous batcher against the engine, in one process on the CPU: sequences that join and leave
a running batch (rows reused, prefilled together or alone, past the sliding window) get the greedy
tokens each prompt gets alone from the engine, with either attention; per-row sampling."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from runtime import compose
from runtime.continuous import ContinuousBatcher, sample_rows, step_buckets
from runtime.engine import Engine, Request
from tests.conftest import ROOT

def batcher(engine: Engine, rows: int, max_len: int, max_prefill_tokens: int,
            num_blocks: int | None = None) -> ContinuousBatcher:
    """The tiny engine's model in a CPU batcher (eager: no graph, no compile; this process samples), each row
    given its own blocks for max_len tokens (`own_blocks`: the tests that drive the batcher directly; a
    planner sets every row's table itself)."""
    from runtime.kvcache import blocks_for

    own = num_blocks is None
    b = ContinuousBatcher(engine.model, engine.dtype, engine.device, rows=rows, max_len=max_len,
                          max_prefill_tokens=max_prefill_tokens, use_graph=False, compile=False, group=None,
                          leader=True, generator=engine.generator,
                          num_blocks=2 * rows * blocks_for(max_len) if own else num_blocks)
    if own:
        own_blocks(b)
    return b


def own_blocks(b: ContinuousBatcher) -> None:
    """Row r: blocks 1 + r * m ... (r + 1) * m, m the blocks of a row (a fixed reservation, like a row cache), and
    as many after all rows' for its window table (the sliding layers' blocks, none given back: no planner)."""
    m, rows = b.max_blocks, b.rows
    b.set_tables({r: list(range(1 + r * m, 1 + (r + 1) * m)) for r in range(rows)},
                 {r: list(range(1 + (rows + r) * m, 1 + (rows + r + 1) * m)) for r in range(rows)})


def count_prefill(b: ContinuousBatcher) -> list[int]:
    """Wrap b.prefill: the returned list gets, per call, the prompt tokens it computes (not cached)."""
    computed: list[int] = []
    prefill = b.prefill

    def counting(rows, ps, temperature, top_p, cached=None, partial=False):  # type: ignore[no-untyped-def]
        computed.append(sum(len(p) - c for p, c in zip(ps, cached or [0] * len(ps))))
        return prefill(rows, ps, temperature, top_p, cached, partial)

    b.prefill = counting  # type: ignore[method-assign]
    return computed


TEXTS = ["hi", "What is the capital of France?",
         "A prompt long enough to run past the tiny model's 32-token sliding window " * 2, "2+2?"]
STEPS = 16


@pytest.mark.parametrize("attn", ["eager", "gqa_sinks", "triton"])
def test_joining_and_leaving_rows_give_the_engine_tokens(attn: str) -> None:
    """attention=triton: its SlotMask through the torch fallback here; the kernel itself below."""
    engine = Engine(compose("generate", ["model.device=cpu", f"attention={attn}"]))
    prompts = [engine.render(Request(id=str(i), prompt=t)) for i, t in enumerate(TEXTS)]
    ref = [engine.decode([p], STEPS, ignore_eos=True).tokens[0].tolist() for p in prompts]
    b = batcher(engine, 3, 256, 200)
    got: dict[int, list[int]] = {i: [] for i in range(len(TEXTS))}
    where: dict[int, int] = {}  # prompt -> row

    def admit(pairs: list[tuple[int, int]]) -> None:
        first = b.prefill([r for _, r in pairs], [prompts[i] for i, _ in pairs], [0.0] * len(pairs), [1.0] * len(pairs))
        for (i, r), t in zip(pairs, first.tolist()):
            where[i] = r
            got[i].append(t)

    def step(n: int) -> None:
        for _ in range(n):
            tokens = b.step().tolist()
            for i, r in where.items():
                if len(got[i]) < STEPS:
                    got[i].append(tokens[r])

    admit([(0, 1)])
    step(5)
    admit([(1, 0), (2, 2)])  # two prompts of different lengths prefilled together (right-padded)
    step(8)
    b.release([1])
    del where[0]
    admit([(3, 1)])  # a reused row
    step(STEPS)
    assert got == {i: r for i, r in enumerate(ref)} | {0: ref[0][:len(got[0])]}
    assert len(got[0]) == 14


def test_kv_blocks_sized_from_memory() -> None:
    """The paged cache's arithmetic: a block is 16 positions' keys and values in half the layers (a full and a
    sliding layer share each pool); a batcher holds by default every row's blocks and the sliding layers'
    windows (a row's, and a prefill chunk's), plus the scratch block; serve.gpu_memory_utilization's blocks fill
    what is left."""
    from runtime.kvcache import BLOCK_SIZE, block_bytes, blocks_that_fit, pool_tensors, window_blocks

    engine = Engine(compose("generate", ["model.device=cpu"]))
    h = engine.model.config
    sliding = [k == "sliding_attention" for k in h.layer_types]
    assert pool_tensors(sliding) == h.num_hidden_layers // 2 and h.sliding_window == 32
    per_block = block_bytes(pool_tensors(sliding), h.num_key_value_heads, h.head_dim, engine.dtype)
    assert per_block == 2 * (h.num_hidden_layers // 2) * h.num_key_value_heads * BLOCK_SIZE * h.head_dim * 4
    b = ContinuousBatcher(engine.model, engine.dtype, engine.device, rows=3, max_len=100, max_prefill_tokens=64,
                          use_graph=False, compile=False, group=None, leader=True, generator=None)
    assert window_blocks(32, 1) == 5 and window_blocks(32, 64) == 8  # blocks_for(window + chunk) + 2
    assert b.max_blocks == 7 and b.window == 32 and b.num_blocks == 3 * 7 + 3 * 5 + 7
    assert b.cache.nbytes == (b.num_blocks + 1) * per_block
    gib = 1 << 30
    assert blocks_that_fit(100 * gib, 30 * gib, 0.9, 2 * gib, gib) == 58  # 90 - 30 - 2
    assert blocks_that_fit(100 * gib, 95 * gib, 0.9, 2 * gib, gib) == 0


def test_step_sizes() -> None:
    assert step_buckets(1) == [1] and step_buckets(3) == [1, 3] and step_buckets(64) == [1, 8, 64]
    assert step_buckets(200) == [1, 8, 64, 200] and step_buckets(512) == [1, 8, 64, 512]


def join_and_leave(b: ContinuousBatcher, prompts: list[list[int]], steps: int) -> tuple[dict[int, list[int]], list[int]]:
    """Three greedy sequences in rows 0, 5 and 9 of a 10-row batcher, joining 3 steps apart; rows 5 and 9 leave
    after 9 steps and row 0 goes on to `steps` tokens: (each sequence's tokens, every step's size). Also
    used by the GPU test of the step sizes' graphs (tests/test_gpu.py)."""
    got: dict[int, list[int]] = {i: [] for i in range(3)}
    where: dict[int, int] = {}
    sizes = []

    def admit(i: int, row: int) -> None:
        got[i].append(int(b.prefill([row], [prompts[i]], [0.0], [1.0])[0]))
        where[i] = row

    def step(n: int) -> None:
        for _ in range(n):
            sizes.append(b.step_rows())
            tokens = b.step()
            assert tokens.shape == (10,)
            for i, r in where.items():
                if len(got[i]) < steps:
                    got[i].append(int(tokens[r]))

    admit(0, 0)
    step(3)
    admit(1, 5)
    step(3)
    admit(2, 9)
    step(3)
    b.release([9, 5])
    for i in (1, 2):
        del where[i]
    step(steps)
    return got, sizes


@pytest.mark.parametrize("attn", ["eager", "triton"])
def test_the_step_runs_only_up_to_the_highest_busy_row(attn: str) -> None:
    """10 rows step as 1, 8 or 10 (the smallest size holding every busy row), growing and shrinking as
    sequences join and leave, and each sequence still gets the tokens it gets alone."""
    engine = Engine(compose("generate", ["model.device=cpu", f"attention={attn}"]))
    prompts = [engine.render(Request(id=str(i), prompt=t)) for i, t in enumerate(TEXTS[:3])]
    ref = [engine.decode([p], STEPS, ignore_eos=True).tokens[0].tolist() for p in prompts]
    b = batcher(engine, 10, 256, 400)
    assert b.buckets == [1, 8, 10]
    got, sizes = join_and_leave(b, prompts, STEPS)
    assert sizes[:9] == [1] * 3 + [8] * 3 + [10] * 3 and set(sizes[9:]) == {1}
    assert got[0] == ref[0] and got[1] == ref[1][:7] and got[2] == ref[2][:4]


def test_the_experts_skip_the_free_rows_of_a_step() -> None:
    """A step of 8 rows with 2 sequences routes its 6 free rows to no expert (id num_experts, weight 0: what the
    experts kernels skip, as another rank's experts), so the experts cost what the running sequences need; the
    sequences' tokens are unchanged (experts=triton: the fused router; on the CPU its reference path)."""
    engine = Engine(compose("generate", ["model.device=cpu", "experts=triton"]))
    prompts = [engine.render(Request(id=str(i), prompt=t)) for i, t in enumerate(TEXTS[:3])]
    ref = [engine.decode([p], STEPS, ignore_eos=True).tokens[0].tolist() for p in prompts]
    b = batcher(engine, 10, 256, 400)
    seen: list[tuple[set[int], torch.Tensor, torch.Tensor]] = []  # (busy rows, expert ids, weights) per layer
    experts = [layer.mlp.experts for layer in engine.model.model.layers]
    hooks = [e.register_forward_pre_hook(lambda m, args: seen.append((set(b._busy), args[1].clone(), args[2].clone())))
             for e in experts]
    plain_step = b.step
    steps: list[list] = []  # each step's `seen`

    def step() -> torch.Tensor:
        del seen[:]
        out = plain_step()
        steps.append(list(seen))
        return out

    b.step = step  # type: ignore[method-assign]
    got, sizes = join_and_leave(b, prompts, STEPS)
    for h in hooks:
        h.remove()
    assert got[0] == ref[0] and got[1] == ref[1][:7] and got[2] == ref[2][:4]
    e = experts[0].num_experts
    assert sizes[3] == 8 and len(steps[3]) == len(experts)
    for busy, ids, weights in steps[3]:  # rows 0 and 5 run in a step of 8
        assert busy == {0, 5} and ids.shape == (8, ids.shape[1])
        free = [r for r in range(8) if r not in busy]
        assert (ids[free] == e).all() and (weights[free] == 0).all()
        assert (ids[[0, 5]] < e).all() and (weights[[0, 5]] > 0).all()
    for layer_calls in steps:  # every step: exactly the busy rows' pairs are routed
        for busy, ids, _ in layer_calls:
            assert int((ids < e).sum()) == ids.shape[1] * len(busy)
    assert b._routers and all(r.rows_in_use is None for r in b._routers)  # prefills see every token as real


@pytest.mark.parametrize("attn", ["eager", "triton"])
def test_a_cached_prefix_gives_the_tokens_of_a_fresh_prefill(attn: str) -> None:
    """A row that held a sequence takes a prompt sharing its prefix (a conversation's next turn: the earlier
    prompt, part of the answer, a new message) and computes only the rest; beside it a fresh row and a row
    reusing a prefix past the 32-token sliding window; decode steps of another row ran while they were free:
    every row gives the engine's tokens for its prompt."""
    engine = Engine(compose("generate", ["model.device=cpu", f"attention={attn}"]))
    b = batcher(engine, 3, 256, 400)
    first = [engine.render(Request(id=str(i), prompt=t)) for i, t in enumerate(TEXTS[1:3])]
    out = b.prefill([0, 1], first, [0.0, 0.0], [1.0, 1.0])
    drawn = [[t] for t in out.tolist()]
    for _ in range(6):
        for row, t in zip(drawn, b.step().tolist()):
            row.append(t)
    b.release([0, 1])
    held = [p + d[:-1] for p, d in zip(first, drawn)]  # what rows 0 and 1 hold now
    theirs = slice(1, 1 + 2 * b.max_blocks)  # rows 0 and 1's blocks
    kept = [t[theirs].clone() for t in b.cache.k + b.cache.v]
    b.prefill([2], [engine.render(Request(id="z", prompt="2+2?"))], [0.0], [1.0])
    for _ in range(3):  # steps while rows 0 and 1 are free: their held keys must survive them
        b.step()
    b.release([2])
    for before, now in zip(kept, b.cache.k + b.cache.v):  # every held block intact
        assert torch.equal(before, now[theirs])
    tail = engine.render(Request(id="x", prompt="And then?"))[-9:]
    prompts = [held[0][:-2] + tail, held[1] + [drawn[1][-1]] + tail, engine.render(Request(id="y", prompt="hi"))]
    cached = [len(held[0]) - 2, len(held[1]), 0]
    ref = [engine.decode([p], 5, ignore_eos=True).tokens[0].tolist() for p in prompts]
    got = [[t] for t in b.prefill([0, 1, 2], prompts, [0.0] * 3, [1.0] * 3, cached=cached).tolist()]
    for _ in range(4):
        for row, t in zip(got, b.step().tolist()):
            row.append(t)
    assert got == ref
    with pytest.raises(ValueError, match="last token"):
        b.prefill([0], [prompts[0]], [0.0], [1.0], cached=[len(prompts[0])])


def test_a_cached_prefix_with_the_flash_kernel_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "cached_prefix_gives and triton"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_sample_rows_per_row_parameters() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen)
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.5])
    top_p = torch.tensor([1.0, 1e-6, 1.0, 1.0])
    out = sample_rows(logits, temperature, top_p, gen, sampling=True, nucleus=True)
    greedy = logits.argmax(-1)
    assert out[0] == greedy[0] and out[2] == greedy[2]  # temperature 0: argmax
    assert out[1] == greedy[1]  # top_p tiny: only the top token is left
    draws = {int(sample_rows(logits, temperature, torch.ones(4), gen, True, False)[3]) for _ in range(50)}
    assert len(draws) > 1  # temperature 0.5 samples


def test_joining_and_leaving_rows_with_the_flash_kernel_in_the_interpreter() -> None:
    """The same, with the Triton flash attention kernel itself (Triton's CPU interpreter)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "joining_and_leaving_rows_give_the_engine_tokens and triton"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_sampler_takes_extreme_values() -> None:
    """Values the API's range checks pass but float32 cannot divide by or sum to: a 1e-40 temperature (a
    float32 denormal: logits / it overflowed to inf and torch.multinomial raised, which ended the server)
    and a top_p of 1e-320 (0.0 in float32: no token was kept). Both draw a token now, the argmax."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 30
    temperature = torch.tensor([1e-40, 1.0, 0.7], dtype=torch.float32)
    top_p = torch.tensor([1.0, 1e-320, 0.9], dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    tokens = sample_rows(logits, temperature, top_p, gen, sampling=True, nucleus=True)
    assert tokens[:2].tolist() == logits[:2].argmax(-1).tolist()


def fragile_batcher(monkeypatch: pytest.MonkeyPatch, rows: int) -> tuple[Engine, ContinuousBatcher]:
    """A batcher on the tiny model whose draw raises for any batch holding a row at temperature 0.5 (as
    torch.multinomial does for probabilities it cannot use)."""
    import runtime.continuous as cont

    engine = Engine(compose("generate", ["model.device=cpu"]))
    b = batcher(engine, rows, 128, 200)
    real = cont.sample_rows

    def fragile(logits, temperature, top_p, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if bool((temperature == 0.5).any()):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, temperature, top_p, *a, **kw)

    monkeypatch.setattr(cont, "sample_rows", fragile)
    return engine, b


def test_a_row_whose_draw_fails_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A draw that raises for one row's values: that row is reported failed (for the scheduler to end its
    request with an error) and gets a stand-in token; the other rows still get their draws."""
    import runtime.continuous as cont

    engine, b = fragile_batcher(monkeypatch, 3)
    prompts = [engine.render(Request(id=str(i), prompt=t)) for i, t in enumerate(TEXTS[:3])]
    first = b.prefill([0, 1, 2], prompts, [0.0, 0.5, 1.0], [1.0, 1.0, 1.0])
    assert b.take_failed() == {1: "sampling failed (probability tensor contains either inf, nan or element < 0)"}
    assert first[0].item() == engine.decode([prompts[0]], 1, ignore_eos=True).tokens[0, 0].item()
    b.step()
    assert list(b.take_failed()) == [1] and b.take_failed() == {}
    monkeypatch.setattr(cont, "sample_rows", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("CUDA error: x")))
    with pytest.raises(RuntimeError, match="CUDA error"):  # a device fault is not one request's: it propagates
        b.step()


@pytest.mark.parametrize("async_steps", [False, True])
def test_a_failed_draw_ends_its_request_and_the_scheduler_goes_on(monkeypatch: pytest.MonkeyPatch,
                                                                  async_steps: bool) -> None:
    """The serving loop with a draw that fails for one request's values: that request ends with an error
    (its client gets an OpenAI-style error), the request beside it completes, and the loop keeps serving
    (it used to end, failing every request in flight and stopping the server); also with async scheduling."""
    import queue
    import threading

    from runtime import distributed
    from runtime.engine import CALL
    from runtime.serve.scheduler import Finish, Scheduler, Submission

    engine, b = fragile_batcher(monkeypatch, 2)
    stop = threading.Event()
    sched = Scheduler(b, distributed.make_layout(1, 1, 1, world=(1, 0, 0)), engine.stop_ids, CALL, 8, stop.is_set,
                      async_steps=async_steps)
    loop = threading.Thread(target=sched.run, daemon=True)
    loop.start()

    def finish_of(sub: Submission) -> tuple[int, Finish]:
        tokens = 0
        while True:
            item = sub.events.get(timeout=120)  # a hang guard
            if isinstance(item, Finish):
                return tokens, item
            tokens += len(item)

    prompt = engine.render(Request(id="x", prompt="hi"))
    bad, good = Submission(prompt, 5, 0.5, 1.0), Submission(prompt, 5, 0.0, 1.0)
    sched.submit(bad)
    sched.submit(good)
    n, why = finish_of(bad)
    assert why.reason == "error" and "sampling failed" in why.message
    assert n == 0  # its first draw (at its prefill) failed: the stand-in token reaches no one
    one = Submission(prompt, 1, 0.5, 1.0)  # a request that its stand-in token would have completed
    sched.submit(one)
    assert finish_of(one) == (0, Finish("error", why.message))
    n, done = finish_of(good)
    assert done.reason in ("length", "stop") and n >= 1
    again = Submission(prompt, 3, 0.0, 1.0)  # the loop is still serving
    sched.submit(again)
    assert finish_of(again)[1].reason in ("length", "stop")
    stop.set()
    loop.join(timeout=60)
    assert not loop.is_alive()
    with pytest.raises(queue.Empty):
        bad.events.get_nowait()


@pytest.mark.parametrize("async_steps", [False, True])
def test_ignore_eos_runs_through_stop_tokens_in_the_serving_loop(async_steps: bool) -> None:
    """The scheduler ends a request at a stop token unless it asked for ignore_eos (POST /v1/completions,
    vLLM's extension): then it runs to max_tokens, giving the tokens of a run without stops. The tiny
    model's own second greedy token is made a stop token here (random weights seldom stop). With async
    scheduling the step launched after the stop runs too, and its token goes to no one."""
    import threading

    from runtime import distributed
    from runtime.engine import CALL
    from runtime.serve.scheduler import Finish, Scheduler, Submission

    engine = Engine(compose("generate", ["model.device=cpu"]))
    b = batcher(engine, 2, 128, 200)
    prompt = engine.render(Request(id="x", prompt="hi"))
    free = engine.decode([prompt], 8, ignore_eos=True).tokens[0].tolist()
    at = next(i for i in range(1, 8) if free[i] not in free[:i])  # the first token not seen before it
    stop = threading.Event()
    sched = Scheduler(b, distributed.make_layout(1, 1, 1, world=(1, 0, 0)), {free[at]}, CALL, 8, stop.is_set,
                      async_steps=async_steps)
    loop = threading.Thread(target=sched.run, daemon=True)
    loop.start()

    def run(sub: Submission) -> tuple[list[int], str]:
        sched.submit(sub)
        tokens: list[int] = []
        while True:
            item = sub.events.get(timeout=120)  # a hang guard
            if isinstance(item, Finish):
                return tokens, item.reason
            tokens += item

    assert run(Submission(prompt, 8, 0.0, 1.0)) == (free[: at + 1], "stop")
    assert run(Submission(prompt, 8, 0.0, 1.0, ignore_eos=True)) == (free, "length")
    stop.set()
    loop.join(timeout=60)
    assert not loop.is_alive()


def test_the_serving_loop_reports_where_its_time_went(caplog: pytest.LogCaptureFixture) -> None:
    """With stats_seconds, the loop logs a LoopTimes line once that long has passed with work: the steps it ran,
    the tokens it generated and prefilled (a cached prefix not counted), the requests running and the writer's
    share; without it, no line. The times are not checked (no timing in tests), only that they add up."""
    import threading

    from runtime import distributed
    from runtime.engine import CALL
    from runtime.serve.scheduler import Finish, LoopTimes, Scheduler, Submission

    engine = Engine(compose("generate", ["model.device=cpu"]))
    prompt = engine.render(Request(id="x", prompt="hi"))

    def serve(stats_seconds: float) -> Scheduler:
        b = batcher(engine, 2, 128, 200)
        stop = threading.Event()
        sched = Scheduler(b, distributed.make_layout(1, 1, 1, world=(1, 0, 0)), set(), CALL, 8, stop.is_set,
                          stats_seconds=stats_seconds, writer_busy=lambda: 0.25)
        loop = threading.Thread(target=sched.run, daemon=True)
        loop.start()
        for _ in range(2):
            sub = Submission(prompt, 6, 0.0, 1.0)
            sched.submit(sub)
            while not isinstance(sub.events.get(timeout=120), Finish):  # a hang guard
                pass
        stop.set()
        loop.join(timeout=60)
        assert not loop.is_alive()
        return sched

    with caplog.at_level(logging.INFO, logger="runtime.serve.scheduler"):
        serve(0.0)
    assert not [r for r in caplog.records if "decode steps" in r.message]
    with caplog.at_level(logging.INFO, logger="runtime.serve.scheduler"):
        sched = serve(1e-9)  # a line after every loop turn with work
    lines = [r.getMessage() for r in caplog.records if "decode steps" in r.getMessage()]
    assert lines and sched.counters.steps > 0
    steps = sum(int(re.search(r": (\d+) decode steps", m).group(1)) for m in lines)
    assert steps == sched.counters.steps - sched.times.steps  # every step reported once (but the last turn's)
    assert any("1 running" in m for m in lines) and all("stream writer busy" in m for m in lines)
    t = LoopTimes(0.0, steps=4, generated=400, prompt=100, idle=1.0, prefill=0.5, gpu_wait=1.5, writer=0.5)
    assert t.line(5.0, 3, 2, 0.5) == ("last 5.0 s: 4 decode steps, 875.00 ms a step (GPU wait 375.00, host 500.00), "
                                      "prefill 10% of the time, idle 20%; 80 generated and 20 prompt tok/s; 3 running, "
                                      "2 waiting, KV cache 50% used; stream writer busy 10%")


def test_the_serving_loop_reuses_a_prefix_and_counts_it() -> None:
    """A chat's next turn (the earlier prompt + its answer + a new message) finds the first turn's full blocks
    in the prefix cache: only the rest is computed, `cached_tokens` says how much was not, and the tokens are
    those of a server without the prefix cache; another prompt finds the blocks of the system message."""
    import threading

    from runtime import distributed
    from runtime.engine import CALL
    from runtime.serve.scheduler import Finish, Scheduler, Submission

    engine = Engine(compose("generate", ["model.device=cpu"]))
    layout = distributed.make_layout(1, 1, 1, world=(1, 0, 0))

    def serve(prefix_cache: bool) -> list[tuple[list[int], int]]:
        b = batcher(engine, 2, 256, 400)
        stop = threading.Event()
        sched = Scheduler(b, layout, set(), CALL, 8, stop.is_set, prefix_cache)
        loop = threading.Thread(target=sched.run, daemon=True)
        loop.start()

        def run(prompt: list[int]) -> tuple[list[int], int]:
            sub = Submission(prompt, 6, 0.0, 1.0)
            sched.submit(sub)
            tokens: list[int] = []
            while not isinstance(item := sub.events.get(timeout=120), Finish):  # a hang guard
                tokens += item
            return tokens, sub.cached_tokens

        first = engine.render(Request(id="a", prompt="What is the capital of France?"))
        other = engine.render(Request(id="b", prompt="2+2?"))
        out = [run(first)]
        follow = first + out[0][0] + engine.render(Request(id="c", prompt="And of Italy?"))[-10:]
        out.append(run(follow))  # the row of the first turn, not the empty one
        out.append(run(other))  # shares the system message with it (more than nothing: the empty row)
        stop.set()
        loop.join(timeout=60)
        assert sched.stats()["cached_tokens"] == sum(c for _, c in out)
        return out

    with_cache, without = serve(True), serve(False)
    assert [t for t, _ in with_cache] == [t for t, _ in without]
    assert [c for _, c in without] == [0, 0, 0]
    first_len = len(engine.render(Request(id="a", prompt="What is the capital of France?")))
    # the first turn's blocks but its last drawn token (never fed), in whole blocks of 16
    assert with_cache[0][1] == 0 and with_cache[1][1] == (first_len + 5) // 16 * 16 > 0
    system = len(os.path.commonprefix([engine.render(Request(id="a", prompt="x")), engine.render(Request(id="b", prompt="y"))]))
    assert with_cache[2][1] == system // 16 * 16 > 0


def test_warm_up_leaves_no_trace() -> None:
    """The server warms its batcher up before saying ready: afterwards every row is free and a request's
    tokens are those of a batcher that never warmed up; its seconds are told by part."""
    engine = Engine(compose("generate", ["model.device=cpu"]))
    prompt = engine.render(Request(id="0", prompt="What is the capital of France?"))

    def tokens(b: ContinuousBatcher) -> list[int]:  # on row 0, the row the warm-up used
        out = [int(b.prefill([0], [prompt], [0.0], [1.0])[0])]
        out += [int(b.step()[0]) for _ in range(6)]
        return out

    warmed = batcher(engine, 2, 128, 4096)
    total = warmed.warm_up()
    parts = warmed.warm_up_parts  # what the start log says it spent the time on: each step size, then prefills
    assert list(parts)[: len(warmed.buckets)] == [f"decode step of {n}" for n in warmed.buckets]
    assert 0 <= sum(parts.values()) <= total and "decode step of 1 " in warmed.warm_up_summary()
    assert bool((warmed.pos == -1).all())
    own_blocks(warmed)  # (the warm-up's sequence had blocks of its own)
    assert tokens(warmed) == tokens(batcher(engine, 2, 128, 4096))


def test_the_serving_loop_prefills_long_prompts_in_chunks() -> None:
    """serve.max_prefill_tokens as the per-step budget: a prompt longer than it goes in pieces while another
    request keeps decoding; every request's tokens are those of a server with a budget that never splits."""
    import threading

    from runtime import distributed
    from runtime.engine import CALL
    from runtime.serve.scheduler import Scheduler, Submission

    engine = Engine(compose("generate", ["model.device=cpu"]))
    layout = distributed.make_layout(1, 1, 1, world=(1, 0, 0))
    prompts = [engine.render(Request(id=str(i), prompt=t)) for i, t in enumerate(TEXTS)]

    def serve(budget: int) -> tuple[list[list[int]], int]:
        b = batcher(engine, 2, 256, budget)
        calls = count_prefill(b)
        stop = threading.Event()
        sched = Scheduler(b, layout, set(), CALL, 8, stop.is_set, prefix_cache=False)
        out = serve_all(sched, stop, [Submission(p, 5, 0.0, 1.0) for p in prompts])
        assert max(calls) <= budget
        return out, len(calls)

    whole, _ = serve(4096)
    chunked, calls = serve(9)
    assert chunked == whole
    assert max(len(p) for p in prompts) > 9 and calls > len(prompts)  # prompts really went in pieces


def test_a_request_cancelled_part_way_through_its_prefill_leaves_only_its_chunks_for_reuse() -> None:
    """The prefix cache must not offer a whole prompt when only its first chunks went in (a client that gave
    up during a long prefill, then retried): exactly those chunks' blocks are findable."""
    from runtime import distributed
    from runtime.engine import CALL
    from runtime.serve.scheduler import Scheduler, Submission

    engine = Engine(compose("generate", ["model.device=cpu"]))
    b = batcher(engine, 1, 256, 16)
    sched = Scheduler(b, distributed.make_layout(1, 1, 1, world=(1, 0, 0)), set(), CALL, 8, lambda: False)
    prompt = engine.render(Request(id="0", prompt="A long question " * 4))
    sub = Submission(prompt, 4, 0.0, 1.0)
    sched.submit(sub)
    first = sched._plan()
    assert [(a.row, a.cached, a.end) for a in first.admit] == [(0, 0, 16)] and not first.decode
    sub.cancel()
    second = sched._plan()
    assert second.release == [0] and not second.admit
    assert len(sched.planner.pool.lookup(prompt)) == 1  # a retry reuses the 16 tokens that are in, no more


def test_the_serving_loop_preempts_when_blocks_run_out_and_every_request_completes() -> None:
    """Four concurrent requests over a KV cache too small for them all (serve.kv_cache_tokens below max_batch x
    max_len): the scheduler preempts the newest and resumes it later; every request gets the tokens of a server
    with a full reservation, and /health's stats count the preemptions."""
    import threading

    from runtime import distributed
    from runtime.engine import CALL
    from runtime.kvcache import blocks_for
    from runtime.serve.scheduler import Scheduler, Submission

    engine = Engine(compose("generate", ["model.device=cpu"]))
    layout = distributed.make_layout(1, 1, 1, world=(1, 0, 0))
    prompts = [engine.render(Request(id=str(i), prompt=t)) for i, t in enumerate(TEXTS)]

    def serve(num_blocks: int | None, async_steps: bool = False) -> tuple[list[list[int]], dict[str, int]]:
        b = batcher(engine, 4, 160, 4096, num_blocks=num_blocks)
        stop = threading.Event()
        sched = Scheduler(b, layout, set(), CALL, 8, stop.is_set, async_steps=async_steps)
        out = serve_all(sched, stop, [Submission(p, 30, 0.0, 1.0, ignore_eos=True) for p in prompts])
        return out, sched.stats()

    full, _ = serve(None)
    small, stats = serve(2 * blocks_for(160) + 2)  # one sequence, its window blocks while prefilled, and 2
    assert small == full and all(len(t) == 30 for t in small)
    assert stats["preemptions"] > 0 and stats["kv_blocks_free"] == stats["kv_blocks"]
    # async scheduling (each step launched before the last one's tokens are read): the same tokens, with and
    # without preemption, and every block back
    assert serve(None, async_steps=True)[0] == full
    small, stats = serve(2 * blocks_for(160) + 2, async_steps=True)
    assert small == full and stats["preemptions"] > 0 and stats["kv_blocks_free"] == stats["kv_blocks"]


def test_a_request_whose_client_leaves_as_it_finishes_counts_as_completed_only() -> None:
    """A client thread that cancels on its way out as soon as the Finish arrives (the HTTP layer's `finally`)
    must not make a completed request count as cancelled too."""
    import threading

    from runtime import distributed
    from runtime.engine import CALL
    from runtime.serve.scheduler import Finish, Scheduler, Submission

    engine = Engine(compose("generate", ["model.device=cpu"]))
    b = batcher(engine, 2, 128, 4096)
    stop = threading.Event()
    sched = Scheduler(b, distributed.make_layout(1, 1, 1, world=(1, 0, 0)), set(), CALL, 8, stop.is_set)
    loop = threading.Thread(target=sched.run, daemon=True)
    loop.start()
    sub = Submission(engine.render(Request(id="x", prompt="hi")), 3, 0.0, 1.0)
    sub.listener = lambda s: s.cancel() if s.done.is_set() else None  # leaves the moment it is done
    sched.submit(sub)
    while not isinstance(sub.events.get(timeout=120), Finish):  # a hang guard
        pass
    stop.set()
    loop.join(timeout=60)
    stats = sched.stats()
    assert (stats["completed"], stats["cancelled"], stats["requests"]) == (1, 0, 1)


def serve_all(sched, stop, subs):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN201
    """Run the serving loop on its thread, submit every request at once, collect each one's tokens in order,
    then stop the loop."""
    import threading

    from runtime.serve.scheduler import Finish

    loop = threading.Thread(target=sched.run, daemon=True)
    loop.start()
    for sub in subs:
        sched.submit(sub)
    out = []
    for sub in subs:
        tokens: list[int] = []
        while not isinstance(item := sub.events.get(timeout=120), Finish):  # a hang guard
            tokens += item
        out.append(tokens)
    stop.set()
    loop.join(timeout=60)
    assert not loop.is_alive()
    return out


def test_warm_up_reaches_every_autotuning_size_of_a_long_prefill() -> None:
    """On a GPU the warm-up also prefills eagerly at the powers of two beyond the padded widths up to
    max_prefill_tokens (the kernels' autotuning keys), so no request meets a first-time tuning mid-serving."""
    from types import SimpleNamespace

    lengths = ContinuousBatcher._tuning_lengths
    gpu = SimpleNamespace(device=torch.device("cuda"), prefill_widths=[16, 1024], max_prefill_tokens=8192)
    assert lengths(gpu, 100_000) == [2048, 4096, 8192]
    assert lengths(gpu, 3000) == [2048, 3000]  # (no more room in the cache, or a row)
    assert lengths(SimpleNamespace(**{**vars(gpu), "max_prefill_tokens": 5000}), 100_000) == [2048, 4096, 5000]
    assert lengths(SimpleNamespace(**{**vars(gpu), "max_prefill_tokens": 1024}), 100_000) == []
    assert lengths(SimpleNamespace(**{**vars(gpu), "device": torch.device("cpu")}), 100_000) == []
