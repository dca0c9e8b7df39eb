"""Offline continuous batching (runtime/offline.py, Engine.generate's default): a queue of prompts over
fewer rows gives each prompt the tokens it gets alone, with mixed prompt and output lengths, chunked
prefill and prefix reuse."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from runtime import compose
from runtime.engine import Engine, Request
from runtime.offline import QueueRun
from tests.conftest import generate, read_jsonl
from tests.test_continuous import batcher, count_prefill

PROMPTS = ["hi", "What is the capital of France?", "2+2?",
           "A prompt long enough to run past the tiny model's 32-token sliding window " * 2, "Name a colour.",
           "ok", "Tell me a story about a lighthouse keeper."]
LIMITS = [9, 3, 14, 6, 1, 11, 5]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(compose("generate", ["model.device=cpu"]))


def drain(run: QueueRun) -> dict[int, tuple[list[int], bool]]:
    out: dict[int, tuple[list[int], bool]] = {}
    while not run.done:
        for f in run.tick():
            assert f.index not in out
            out[f.index] = (f.tokens, f.stopped)
    return out


def test_a_queue_over_three_rows_gives_each_prompt_its_tokens_alone(engine: Engine) -> None:
    prompts = [engine.render(Request(id=str(i), prompt=p)) for i, p in enumerate(PROMPTS)]
    longest = max(len(p) for p in prompts) + max(LIMITS)
    alone = {i: drain(QueueRun(batcher(engine, 1, longest, 4096), [p], [m], set()))[0]
             for i, (p, m) in enumerate(zip(prompts, LIMITS))}
    run = QueueRun(batcher(engine, 3, longest, 64), prompts, LIMITS, set())  # 64 prompt tokens a tick: chunks
    together = drain(run)
    assert together == alone
    assert [len(together[i][0]) for i in range(len(PROMPTS))] == LIMITS
    assert run.steps < sum(LIMITS)  # rows ran side by side (7 prompts, 3 rows)
    # the prompts after the first plan found the shared system message's full blocks: not computed again,
    # tokens unchanged
    system = len(os.path.commonprefix(prompts))
    assert run.cached_tokens >= (len(PROMPTS) - 3) * (system // 16 * 16) > 0
    fresh = QueueRun(batcher(engine, 3, longest, 64), prompts, LIMITS, set(), reuse_prefix=False)
    assert drain(fresh) == alone and fresh.cached_tokens == 0

    # a stop token ends its sequence there (the token included) and frees the row for the queue
    stop = alone[2][0][4]
    stopped = drain(QueueRun(batcher(engine, 2, longest, 4096), prompts, LIMITS, {stop}))
    for i, (tokens, _) in alone.items():
        cut = tokens.index(stop) + 1 if stop in tokens else len(tokens)
        assert stopped[i] == (tokens[:cut], stop in tokens)


def test_async_scheduling_gives_each_prompt_its_tokens_alone(engine: Engine) -> None:
    """overlap (generation.async_scheduling): each decode step is launched before the last one's tokens are read,
    so a sequence that ended runs one step more; over three rows with chunked prefill, the prefix cache and a stop
    token, every prompt still gets the tokens it gets alone, and the junk steps are all that is added (at most
    one per tick that finished a sequence)."""
    prompts = [engine.render(Request(id=str(i), prompt=p)) for i, p in enumerate(PROMPTS)]
    longest = max(len(p) for p in prompts) + max(LIMITS)
    sync = QueueRun(batcher(engine, 3, longest, 64), prompts, LIMITS, set())
    alone = drain(sync)
    run = QueueRun(batcher(engine, 3, longest, 64), prompts, LIMITS, set(), overlap=True)
    assert drain(run) == alone
    assert sync.steps <= run.steps <= sync.steps + len(PROMPTS)
    stop = alone[2][0][4]
    want = drain(QueueRun(batcher(engine, 2, longest, 4096), prompts, LIMITS, {stop}))
    assert drain(QueueRun(batcher(engine, 2, longest, 4096), prompts, LIMITS, {stop}, overlap=True)) == want


@pytest.mark.parametrize("chunk", [7, 16])
def test_chunked_prefill_gives_the_same_tokens_and_keeps_decoding(engine: Engine, chunk: int) -> None:
    """A tick prefills at most `chunk` prompt tokens (the long prompt crosses the 32-token sliding window in
    pieces), the running rows step every tick meanwhile, and every prompt's tokens equal one-shot prefill."""
    prompts = [engine.render(Request(id=str(i), prompt=p)) for i, p in enumerate(PROMPTS)]
    longest = max(len(p) for p in prompts) + max(LIMITS)
    whole = drain(QueueRun(batcher(engine, 3, longest, 4096), prompts, LIMITS, set()))
    b = batcher(engine, 3, longest, 4096)
    computed = count_prefill(b)
    run = QueueRun(b, prompts, LIMITS, set(), chunk=chunk)
    per_tick, stepped = [], []
    chunked: dict[int, tuple[list[int], bool]] = {}
    while not run.done:
        computed.clear()
        steps, running = run.steps, any(map(run.planner.decoding, range(3)))
        for f in run.tick():
            chunked[f.index] = (f.tokens, f.stopped)
        per_tick.append(sum(computed))
        stepped.append(run.steps == steps + 1 or not running)
    assert chunked == whole
    assert max(per_tick) <= chunk and sum(per_tick) == sum(len(p) for p in prompts) - run.cached_tokens
    assert all(stepped)  # a row that was running before a tick stepped in it
    assert max(len(p) for p in prompts) > chunk  # some prompt really went in pieces


def test_a_prompt_that_does_not_fit_the_rows_is_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="exceeds"):
        QueueRun(batcher(engine, 2, 8, 4096), [[1] * 6], [4], set())


def test_generate_continuous_equals_static_and_writes_in_input_order(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    common = [f"prompts.path={prompts}", "output.token_ids=true", "generation.max_new_tokens=10",
              "generation.batch_size=3"]
    static, cont = tmp_path / "static.jsonl", tmp_path / "cont.jsonl"
    generate([f"output.path={static}", "generation.batching=static", *common])
    generate([f"output.path={cont}", "generation.batching=continuous", *common])
    a, b = read_jsonl(static), read_jsonl(cont)
    assert [r["id"] for r in b] == [f"q{i}" for i in range(len(PROMPTS))]
    assert [r["completion_ids"] for r in b] == [r["completion_ids"] for r in a]
    run = json.loads(Path(f"{cont}.run.json").read_text())
    assert run["status"] == "done" and run["prompts_generated"] == len(PROMPTS)
    assert run["replica0"]["batches"][0]["continuous"] is True
    assert run["replica0"]["cached_tokens"] > 0  # the system message, reused by prompts that joined freed rows
    overlapped = tmp_path / "async.jsonl"  # async scheduling: the same records
    generate([f"output.path={overlapped}", "generation.batching=continuous", "generation.async_scheduling=true",
              *common])
    assert [(r["id"], r["completion_ids"]) for r in read_jsonl(overlapped)] == [(r["id"], r["completion_ids"]) for r in b]


def test_continuous_needs_the_static_cache() -> None:
    from runtime.errors import UserError

    with pytest.raises(UserError, match="generation.batching=static"):
        Engine(compose("generate", ["model.device=cpu", "generation.batching=continuous",
                                    "generation.kv_cache=dynamic"]))
    with pytest.raises(UserError, match="async_scheduling overlaps the steps of continuous batching"):
        Engine(compose("generate", ["model.device=cpu", "generation.batching=static",
                                    "generation.async_scheduling=true"]))
