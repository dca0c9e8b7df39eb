"""runtime.generate against hostile but realistic inputs (issue 13): an edited prompts file on resume, a
prompt longer than the model's context, an output file that cannot be written, a prompts file that is not
UTF-8 or holds a lone surrogate, values the sampler cannot use. Each is refused before the weights load,
with a message naming the fix, or recorded, and no record is lost or written twice."""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import pytest

from runtime import collect
from runtime.errors import UserError
from tests.conftest import generate, read_jsonl

COMMON = ["generation.max_new_tokens=4", "generation.batch_size=2"]


def prompts_file(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


def test_resume_refuses_a_prompts_file_edited_since(tmp_path: Path) -> None:
    """Ids default to line positions: a line inserted at the top shifted them, so the rerun skipped the new
    prompt, wrote another twice and paired ids with the wrong prompts. It is refused now, naming the ids."""
    p, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    prompts_file(p, ["one", "two", "three"])
    generate([f"prompts.path={p}", f"output.path={out}", *COMMON])
    before = out.read_text()
    prompts_file(p, ["zero", "one", "two", "three"])
    with pytest.raises(UserError, match=r"3 prompt\(s\) in .*p.jsonl are not the ones already written .* "
                                        r"\(id '0', '1', '2'\).*new output.path"):
        generate([f"prompts.path={p}", f"output.path={out}", *COMMON])
    assert out.read_text() == before
    # the same file again (or explicit ids with new prompts appended) resumes as before
    prompts_file(p, ["one", "two", "three", "four"])
    generate([f"prompts.path={p}", f"output.path={out}", *COMMON])
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == ["0", "1", "2", "3"] and [r["prompt"] for r in recs][-1] == "four"


def test_a_prompt_longer_than_the_context_is_found_before_loading(tmp_path: Path) -> None:
    """It allocated a KV cache for ~140k tokens and died out of memory on every rerun; now an error names it
    before any weight is read, or (prompts.too_long=record) it gets an error record in its place."""
    p, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    prompts_file(p, ["short one", "word " * 140_000, "short two"])
    with pytest.raises(UserError, match=r"1 prompt\(s\) in .*p.jsonl do not fit the model's 131072 positions .*"
                                        r"id '1': 1400\d\d tokens.*prompts.too_long=record"):
        generate([f"prompts.path={p}", f"output.path={out}", *COMMON])
    assert not out.exists()
    record = generate([f"prompts.path={p}", f"output.path={out}", "prompts.too_long=record", *COMMON])
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == ["0", "1", "2"]  # in input order
    assert recs[1]["finish_reason"] == "error" and "exceeds the model's 131072 positions" in recs[1]["error"]
    assert recs[0]["finish_reason"] != "error" and recs[2]["completion_tokens"] >= 1
    assert record["prompts_too_long"] == 1 and record["status"] == "done"
    generate([f"prompts.path={p}", f"output.path={out}", "prompts.too_long=record", *COMMON])  # resumes: nothing
    assert [r["id"] for r in read_jsonl(out)] == ["0", "1", "2"]


def test_an_output_that_cannot_be_written_is_refused_before_loading(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("")
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.raises(UserError, match=r"output.path=.*out.jsonl: the file cannot be written"):
            generate(["model=gpt-oss-20b", "model.path=/definitely/missing", f"output.path={out}"])
    finally:
        subprocess.run(["chattr", "-i", str(out)])
    with pytest.raises(UserError, match="its directory cannot be created"):
        generate([f"output.path={out}/inside/out.jsonl"])  # a file where a directory must be


def test_a_failed_write_marks_the_run_record_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No space left (found at the first append): a clear error, and the run record says `failed` and why
    (it said `running`)."""
    out = tmp_path / "out.jsonl"

    def full(self, records):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(collect.JsonlWriter, "append", full)
    with pytest.raises(UserError, match=r"writing .*out.jsonl failed \(No space left on device\): free space"):
        generate([f"output.path={out}", *COMMON])
    run = json.loads(Path(f"{out}.run.json").read_text())
    assert run["status"] == "failed" and "No space left on device" in run["error"]


@pytest.mark.parametrize(("raw", "match"), [
    (b'{"prompt": "caf\xe9"}\n', r"p.jsonl:2: not valid UTF-8 \(byte 0xe9 at byte 16 of the line\)"),
    (b'{"prompt": "half \\ud800 a pair"}\n', r"p.jsonl:2: prompt holds a lone UTF-16 surrogate \(\\ud800 at "
                                            r"character 6\)"),
    (b'{"messages": [{"role": "user", "content": "\\udfff"}]}\n', r"messages\[0\].content holds a lone UTF-16"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", r"p.jsonl:2: (JSON nested too deeply|expected a JSON object)"),
])
def test_undecodable_prompts_name_the_line(tmp_path: Path, raw: bytes, match: str) -> None:
    p = tmp_path / "p.jsonl"
    p.write_bytes(b'{"prompt": "fine"}\n' + raw)
    with pytest.raises(UserError, match=match):
        collect.read_prompts(p)


@pytest.mark.parametrize(("override", "match"), [
    ("generation.temperature=inf", "generation.temperature=inf must be a finite number"),
    ("generation.temperature=1e-40", r"generation.temperature=1e-40 must be a finite number >= 1e-05"),
    ("generation.top_p=nan", r"generation.top_p=nan must be in \(0, 1\]"),
])
def test_generation_values_the_sampler_cannot_use(tmp_path: Path, override: str, match: str) -> None:
    """temperature=inf sampled uniformly and 1e-40 crashed in torch.multinomial: both refused up front."""
    with pytest.raises(UserError, match=match):
        generate(["generation=sample", override, f"output.path={tmp_path / 'o.jsonl'}"])


def test_a_stopped_run_under_torchrun(tmp_path: Path) -> None:
    """What a user sees when a torchrun job is asked to stop (SIGTERM to a rank, or the stop file): every
    rank exits 75 ("stopped, run again"); torchrun itself turns non-zero worker codes into its own exit 1
    and lists `exitcode: 75` per rank; the run record says `stopped`; the same command again finishes.
    (slurm/torchrun.sh reads the STOPPED marker instead and requeues, or exits 75 itself.)"""
    import os
    import sys

    from tests.conftest import CPU, ROOT

    out, stop = tmp_path / "out.jsonl", tmp_path / "STOP"
    stop.touch()  # asked to stop before the first batch
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTOSS_STOP_FILE": str(stop)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "runtime.generate", *CPU, "parallel.tp_size=2", f"output.path={out}", *COMMON]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "exitcode  : 75" in proc.stderr and "run the same command again" in proc.stderr
    assert json.loads(Path(f"{out}.run.json").read_text())["status"] == "stopped"
    assert Path(f"{stop}PED").exists()  # the marker slurm/torchrun.sh requeues on
    stop.unlink()
    env.pop("GPTOSS_STOP_FILE")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and len(read_jsonl(out)) == 4, done.stderr[-2000:]


def _generate_until_started(out: Path, *overrides: str) -> subprocess.Popen[str]:
    """runtime.generate of one prompt and up to 100,000 new tokens, returned once it says what it will generate."""
    import os
    import sys

    from tests.conftest import CPU, ROOT

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "runtime.generate", *CPU, "generation.max_new_tokens=100000",
                             "generation.batch_size=1", "prompts.texts=[hi]", f"output.path={out}", *overrides],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # type: ignore[union-attr]
        if "to generate" in line:
            break
    return proc


def test_a_second_stop_signal_exits_at_once(tmp_path: Path) -> None:
    """With static rounds one SIGTERM stops after the current batch; a batch of 100,000 new tokens would hold
    the job for many minutes (and a second SIGTERM was ignored too). The second signal now ends the process at
    once; the output keeps every record of the batches finished before (none here)."""
    import signal
    import time

    out = tmp_path / "out.jsonl"
    proc = _generate_until_started(out, "generation.batching=static")
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert proc.poll() is None  # the first asks to stop after the batch
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=60)  # a hang detector, not a timing
    finally:
        proc.kill()
    assert code == -signal.SIGTERM
    assert not out.exists() or out.read_text() == ""


def test_one_stop_signal_ends_a_continuous_run_between_steps(tmp_path: Path) -> None:
    """With continuous batching (the default) there is no batch to wait for: the ranks agree on a stop every
    Engine.SYNC_STEPS decode steps, so one SIGTERM part-way through a 100,000-token request ends it at the next
    such step with exit 75 ("run again") and a run record that says `stopped`. (The second-signal test raced
    with this on a fast machine.)"""
    import signal
    import time

    from runtime.engine import Engine
    from runtime.preemption import EXIT_STOPPED

    out = tmp_path / "out.jsonl"
    proc = _generate_until_started(out)
    time.sleep(2)  # decoding (~100 steps a second on the CPU)
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=120)  # a hang detector, not a timing
    finally:
        proc.kill()
    assert code == EXIT_STOPPED
    assert not out.exists() or out.read_text() == ""
    run = json.loads(Path(f"{out}.run.json").read_text())
    steps = run["replica0"]["decode_steps"]
    assert run["status"] == "stopped" and steps > 0 and steps % Engine.SYNC_STEPS == 0, run
