"""The launcher on a REAL two-node Slurm (slurmctld + 2 slurmd + munge on this machine): a 2-node x
1-process tensor-parallel job equals one process token for token; a preempted job resumes with a
complete output and no duplicates; failures are reported with their cause."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, generate, read_jsonl
from tests.slurm_cluster import SlurmCluster

CPU_JOB = ["launcher=slurm", "launcher.num_nodes=2", "launcher.gpus_per_node=0", "launcher.procs_per_node=1",
           "launcher.time=00:10:00", "launcher.poll_seconds=0.5", "parallel.tp_size=2", "model.device=cpu",
           "output.token_ids=true"]


def launch(cluster: SlurmCluster, run_root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**cluster.env, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "launcher", "job=generate", f"launcher.run_root={run_root}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def submitted(proc: subprocess.CompletedProcess) -> tuple[str, Path]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"submitted job (\d+): .* run directory (\S+)", proc.stdout)
    assert m, proc.stdout
    return m.group(1), Path(m.group(2))


def test_two_node_tensor_parallel_job_equals_one_process(slurm: SlurmCluster, tmp_path: Path) -> None:
    proc = launch(slurm, tmp_path, *CPU_JOB, "generation.max_new_tokens=10", "launcher.wait=true")
    job_id, run_dir = submitted(proc)
    assert f"job {job_id} COMPLETED" in proc.stdout
    assert json.loads((run_dir / "job.json").read_text())["job_id"] == job_id
    script = (run_dir / "job.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "parallel.tp_size=2" in script
    assert (run_dir / "logs" / "node0.log").exists() and (run_dir / "logs" / "node1.log").exists()
    assert len(list((run_dir / "logs").rglob("stderr.log"))) == 2  # one per rank, one rank per node
    single = tmp_path / "single.jsonl"
    generate([f"output.path={single}", "generation.max_new_tokens=10", "output.token_ids=true"])
    ours = read_jsonl(run_dir / "completions.jsonl")
    assert [r["completion_ids"] for r in ours] == [r["completion_ids"] for r in read_jsonl(single)]
    run = json.loads((run_dir / "completions.jsonl.run.json").read_text())
    assert run["layout"]["world_size"] == 2 and run["status"] == "done"


def test_relative_paths_mean_the_directory_the_launcher_ran_in(slurm: SlurmCluster, tmp_path: Path) -> None:
    """As in a local launch: prompts.path and output.path relative to where `python -m launcher` ran (the job
    ran in the repository: "prompts.path=p.jsonl does not exist")."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "p.jsonl").write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(3)))
    env = {**slurm.env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "launcher", "job=generate", "launcher.run_root=runs", *CPU_JOB,
                           "prompts.path=p.jsonl", "output.path=out/c.jsonl", "generation.max_new_tokens=2",
                           "launcher.wait=true"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    job_id, run_dir = submitted(proc)
    assert f"job {job_id} COMPLETED" in proc.stdout
    assert run_dir.parent == work / "runs"
    assert [r["id"] for r in read_jsonl(work / "out" / "c.jsonl")] == ["0", "1", "2"]


def _wait_for_records(path: Path, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{path} did not reach {n} records in {timeout} s")


@pytest.mark.parametrize("how", ["signal", "requeue"])
def test_preempted_job_resumes_complete_without_duplicates(slurm: SlurmCluster, tmp_path: Path, how: str) -> None:
    """signal: USR1 to the batch shell (as --signal=B:USR1@N does before the time limit): the ranks stop
    after the current batch and the job requeues itself. requeue: `scontrol requeue` kills the job."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(24)))
    args = [*CPU_JOB, f"prompts.path={prompts}", "generation.batch_size=1", "generation.max_new_tokens=16"]
    job_id, run_dir = submitted(launch(slurm, tmp_path, *args))
    out = run_dir / "completions.jsonl"
    _wait_for_records(out, 3, timeout=240)
    if how == "signal":
        slurm.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    else:
        slurm.requeue(job_id)
    assert slurm.wait_job(job_id, timeout=480) == "COMPLETED", slurm.job_info(job_id)
    assert int(slurm.job_info(job_id).get("Restarts", "0")) >= 1  # it really ran twice
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == [str(i) for i in range(24)]  # complete, in order, none twice
    single = tmp_path / "single.jsonl"
    generate([f"prompts.path={prompts}", f"output.path={single}", "generation.max_new_tokens=16",
              "output.token_ids=true"])
    assert [r["completion_ids"] for r in recs] == [r["completion_ids"] for r in read_jsonl(single)]
    log = "".join(p.read_text() for p in run_dir.glob("slurm-*.out"))
    if how == "signal":
        assert "stop requested" in log and "requeueing job" in log


def test_stopped_job_that_cannot_requeue_is_not_completed(slurm: SlurmCluster, tmp_path: Path) -> None:
    """Stopped with prompts left and `scontrol requeue` refused (here: --no-requeue): the job must not end
    COMPLETED, or `launcher.wait` and afterok dependencies take a partial output for a finished one."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(24)))
    args = [*CPU_JOB, f"prompts.path={prompts}", "generation.batch_size=1", "generation.max_new_tokens=16",
            "launcher.sbatch_extra=[--no-requeue]"]
    job_id, run_dir = submitted(launch(slurm, tmp_path, *args))
    out = run_dir / "completions.jsonl"
    _wait_for_records(out, 3, timeout=240)
    slurm.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    assert slurm.wait_job(job_id, timeout=300) == "FAILED", slurm.job_info(job_id)
    assert slurm.job_info(job_id)["ExitCode"] == "75:0"  # EX_TEMPFAIL, as a stopped runtime exits: run it again
    assert len(read_jsonl(out)) < 24
    assert "requeue refused" in "".join(p.read_text() for p in run_dir.glob("slurm-*.out"))


def test_serve_job_prints_the_head_node_address(slurm: SlurmCluster, tmp_path: Path) -> None:
    """job=serve: the launcher follows the job until the server answers, prints its address, and leaves it
    running; a 2-node x 1-rank tensor-parallel server answers the openai client; scancel stops it."""
    openai = pytest.importorskip("openai")
    env = {**slurm.env, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "job=serve", f"launcher.run_root={tmp_path}", "launcher=slurm",
         "launcher.num_nodes=2", "launcher.gpus_per_node=0", "launcher.procs_per_node=1", "launcher.time=00:10:00",
         "launcher.poll_seconds=0.5", "parallel.tp_size=2", "model.device=cpu", "serve.port=0",
         "serve.max_len=256"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    job_id, run_dir = submitted(proc)
    m = re.search(r"serving tiny at (http://\S+/v1) \(head node (\S+), bound to 127.0.0.1:\d+\)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert f"scancel {job_id}" in proc.stdout and "ssh -N -L" in proc.stdout
    try:
        client = openai.OpenAI(base_url=m.group(1), api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                           temperature=0)
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
        assert "the server (rank 0) runs on the head node" in "".join(p.read_text() for p in run_dir.glob("slurm-*.out"))
    finally:
        slurm.run(["scancel", job_id], check=True)
    assert slurm.wait_job(job_id, timeout=120) in ("CANCELLED", "COMPLETED")


def test_failed_job_shows_exit_code_and_log_tail(slurm: SlurmCluster, tmp_path: Path) -> None:
    proc = launch(slurm, tmp_path, *CPU_JOB, "model=gpt-oss-20b", "model.path=/no/such/checkpoint", "launcher.wait=true")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"job \d+ ended FAILED \(exit code [1-9]", proc.stderr), proc.stderr
    assert "model.path=/no/such/checkpoint does not exist" in proc.stderr  # the failing rank's log tail


def test_unknown_partition_is_reported(slurm: SlurmCluster, tmp_path: Path) -> None:
    proc = launch(slurm, tmp_path, *CPU_JOB, "launcher.partition=nosuchpart")
    assert proc.returncode == 2
    assert "sbatch refused" in proc.stderr and "partition" in proc.stderr.lower() and "sinfo -s" in proc.stderr


def test_node_script_outside_slurm_says_so() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([str(ROOT / "slurm" / "torchrun.sh"), "runtime.generate"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not inside a Slurm job" in proc.stderr


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "slurm").glob("*.sbatch")))
def test_sbatch_scripts_start_one_rank_per_gpu_of_the_allocation(script: str) -> None:
    """The hand-usable scripts take the ranks per node from the allocation's GPUs (--gpus-per-node
    changed in the #SBATCH lines), 8 where Slurm does not say, GPTOSS_PROCS_PER_NODE first."""
    line = next(ln for ln in (ROOT / "slurm" / script).read_text().splitlines()
                if ln.startswith("export GPTOSS_PROCS_PER_NODE="))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GPTOSS_"))}

    def procs(**extra: str) -> str:
        return subprocess.run(["bash", "-c", f"{line}; echo $GPTOSS_PROCS_PER_NODE"], env={**env, **extra},
                              capture_output=True, text=True, check=True).stdout.strip()

    assert procs(SLURM_GPUS_ON_NODE="4") == "4" and procs() == "8"
    assert procs(SLURM_GPUS_ON_NODE="4", GPTOSS_PROCS_PER_NODE="2") == "2"
