"""`runtime.generate` end to end on the real tiny model (CPU): records, resume, batching, stops, the API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from runtime import Engine, Request, compose, harmony
from runtime.continuous import ContinuousBatcher
from runtime.engine import CALL, RETURN
from tests.conftest import CPU, generate, read_jsonl

FIELDS = {"id", "prompt", "text", "reasoning", "tool_calls", "finish_reason", "prompt_tokens", "completion_tokens",
          "parse_error", "prompt_sha256"}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(compose("generate", [*CPU, "generation.max_new_tokens=6", "output.token_ids=true"]))


def test_default_run_writes_records_and_run_record(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    record = generate([f"output.path={out}", "output.token_ids=true", "generation.max_new_tokens=8"])
    recs = read_jsonl(out)
    texts = compose("generate", []).prompts.texts
    assert [r["id"] for r in recs] == ["0", "1", "2", "3"] and [r["prompt"] for r in recs] == list(texts)
    for r, text in zip(recs, texts):
        assert set(r) == FIELDS | {"completion_ids"}
        assert r["prompt_tokens"] == len(harmony.render_text(text, "medium"))
        assert r["completion_tokens"] == len(r["completion_ids"]) <= 8
        assert r["finish_reason"] in ("stop", "length", "tool_calls")
    run = json.loads((tmp_path / "out.jsonl.run.json").read_text())
    assert run == json.loads(json.dumps(record, default=str))
    assert run["status"] == "done" and run["prompts_generated"] == 4
    assert run["completion_tokens"] == sum(r["completion_tokens"] for r in recs)
    assert run["prompt_tokens"] == sum(r["prompt_tokens"] for r in recs)
    assert run["layout"] == {"world_size": 1, "tp_size": 1, "ep_size": 1, "dp_size": 1}
    assert run["config"]["generation"]["max_new_tokens"] == 8 and run["versions"]["transformers"]
    assert run["output_tokens_per_second"] > 0
    assert "max_new_tokens: 8" in (tmp_path / "out.jsonl.config.yaml").read_text()


def test_resume_skips_done_and_repairs_a_crash(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    args = [f"output.path={out}", "output.token_ids=true", "generation.max_new_tokens=5", "generation.batch_size=2"]
    generate(args)
    full = out.read_text().splitlines()
    assert generate(args)["prompts_skipped"] == 4 and out.read_text().splitlines() == full  # nothing twice
    out.write_text("\n".join(full[:2]) + "\n" + full[2][:17])  # killed while writing the second batch
    record = generate(args)
    assert record["prompts_skipped"] == 2 and record["prompts_generated"] == 2
    assert out.read_text().splitlines() == full  # same records, input order, no duplicates
    assert [r["prompts_generated"] for r in record["earlier_runs"]] == [4, 0]  # earlier runs kept


def test_batching_and_left_padding_do_not_change_tokens(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    lines = ["hi", "A much longer prompt that spans well past the sliding window of the tiny model " * 2, "2+2?"]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in lines))
    runs = {}
    for bs in (1, 3):
        generate([f"prompts.path={prompts}", f"output.path={tmp_path}/b{bs}.jsonl", "output.token_ids=true",
                  f"generation.batch_size={bs}", "generation.max_new_tokens=10"])
        runs[bs] = [r["completion_ids"] for r in read_jsonl(tmp_path / f"b{bs}.jsonl")]
    assert runs[1] == runs[3]


def test_messages_prompts_and_developer(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"id": "m", "messages": [{"role": "user", "content": "Hi"}], "reasoning_effort": "high"}) + "\n"
        + json.dumps({"id": "p", "prompt": "Hi"}) + "\n"
    )
    generate([f"prompts.path={prompts}", f"output.path={tmp_path}/o.jsonl", "generation.max_new_tokens=2",
              "prompts.developer=Answer in French."])
    m, p = read_jsonl(tmp_path / "o.jsonl")
    assert m["messages"] == [{"role": "user", "content": "Hi"}] and "prompt" not in m
    assert p["prompt"] == "Hi" and "messages" not in p
    dev = [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]
    assert m["prompt_tokens"] == len(harmony.render_prompt(dev, "high"))
    assert p["prompt_tokens"] == len(harmony.render_prompt(dev, "medium"))
    assert len(harmony.render_prompt(dev, "medium")) > len(harmony.render_text("Hi", "medium"))


def test_engine_loads_once_generates_many(engine: Engine) -> None:
    first = engine.generate([Request(id="a", prompt="Hello"), Request(id="b", prompt="Bye")])
    again = engine.generate([Request(id="b", prompt="Bye")])
    assert [r["id"] for r in first] == ["a", "b"]
    assert again[0]["completion_ids"] == first[1]["completion_ids"]


def test_sampling_is_seeded() -> None:
    def run(seed: int) -> list[list[int]]:
        eng = Engine(compose("generate", [*CPU, "generation=sample", f"generation.seed={seed}",
                                          "generation.max_new_tokens=12", "output.token_ids=true"]))
        return [r["completion_ids"] for r in eng.generate([Request(id="0", prompt="Hi"), Request(id="1", prompt="Yo")])]

    assert run(1) == run(1) != run(2)


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_stops_on_harmony_stop_tokens(engine: Engine, monkeypatch: pytest.MonkeyPatch, batching: str) -> None:
    """Rows end on <|return|> / <|call|>, the others run to max_new_tokens; records are parsed from harmony
    (static rounds: the engine's sampler scripted; continuous batching: the batcher's, row r = request r)."""
    enc = harmony.encoding()
    answer = enc.encode("<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Paris",
                        allowed_special="all") + [RETURN]
    call = enc.encode('<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>{"q": 1}',
                      allowed_special="all") + [CALL]
    script = [answer, call, [42] * 20]
    step = {"i": 0}

    def scripted(logits: torch.Tensor) -> torch.Tensor:
        i = step["i"]
        step["i"] += 1
        return torch.tensor([s[i] if i < len(s) else 0 for s in script])

    drawn = [0, 0, 0]

    def scripted_rows(self: ContinuousBatcher, logits: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
        out = []
        for r in rows if rows is not None else range(self.rows):
            if r < 3:
                out.append(script[r][drawn[r]] if drawn[r] < len(script[r]) else 0)
                drawn[r] += 1
            else:
                out.append(0)
        step["i"] = drawn[2]
        return torch.tensor(out)

    monkeypatch.setattr(engine, "_sample", scripted)
    monkeypatch.setattr(ContinuousBatcher, "_choose", scripted_rows)
    engine.cfg.generation.max_new_tokens = 30
    engine.cfg.generation.batching = batching
    try:
        recs = engine.generate([Request(id=str(i), prompt="q") for i in range(3)])
    finally:
        engine.cfg.generation.max_new_tokens = 6
        engine.cfg.generation.batching = "auto"
    a, c, n = recs
    assert (a["finish_reason"], a["text"], a["reasoning"], a["completion_ids"]) == ("stop", "Paris", "Think.", answer)
    assert c["finish_reason"] == "tool_calls" and c["tool_calls"] == [{"name": "lookup", "arguments": '{"q": 1}'}]
    assert n["finish_reason"] == "length" and n["completion_tokens"] == 30
    assert step["i"] == 30


def test_chat_template_renderer(engine: Engine, tiny_checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    eng = Engine(compose("generate", [*CPU, "prompts.renderer=chat_template", "generation.max_new_tokens=2"]))
    msgs = [{"role": "user", "content": "Hi"}]
    ids = eng.render(Request(id="0", messages=msgs))
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    text = tok.decode(ids)
    # the checkpoint's template = harmony's rendering plus a "Current date" line in the system message
    assert text.startswith("<|start|>system<|message|>") and "Current date:" in text
    assert text.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")
    assert harmony.decode(engine.render(Request(id="0", messages=msgs))) == "\n".join(
        line for line in text.split("\n") if not line.startswith("Current date:"))
    assert eng.generate([Request(id="0", messages=msgs)])[0]["prompt_tokens"] == len(ids)


def test_interrupt_leaves_a_valid_file_and_resume_completes(tmp_path: Path) -> None:
    """Ctrl-C mid-run: the file holds only whole records; the re-run adds the rest, none twice."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    prompts = tmp_path / "p.jsonl"
    n = 40
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(n)))
    out = tmp_path / "out.jsonl"
    args = [*CPU, f"prompts.path={prompts}", f"output.path={out}", "generation.batch_size=1",
            "generation.max_new_tokens=24", "output.token_ids=true"]
    # Ctrl-C as on a terminal: SIGINT's default action in the run (a suite started in the background by a
    # non-interactive shell inherits SIGINT ignored, and so would the run, which then finished all prompts)
    proc = subprocess.Popen([sys.executable, "-m", "runtime.generate", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0, log
    partial = read_jsonl(out)  # every line parses
    assert 3 <= len(partial) < n
    assert json.loads(Path(f"{out}.run.json").read_text())["status"] == "interrupted"
    done = subprocess.run([sys.executable, "-m", "runtime.generate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ})
    assert done.returncode == 0, done.stderr[-2000:]
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == [str(i) for i in range(n)]
    assert recs[: len(partial)] == partial
