"""The real throwaway Slurm cluster of tests/slurm_cluster.py: nodes, jobs, requeue, signals, teardown."""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, _alive

JOB = ["-N2", "--ntasks-per-node=1", "-t", "5"]


def _wait_for(path: Path, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in (content := path.read_text()):
            return content
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {path} within {timeout} s: "
                         f"{path.read_text() if path.exists() else '(no file)'}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_idle_nodes_in_debug(slurm: SlurmCluster) -> None:
    slurm.cancel_all()  # other tests' leftovers, if any
    deadline = time.monotonic() + 10
    while slurm.node_states() != {"n1": "idle", "n2": "idle"} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert slurm.node_states() == {"n1": "idle", "n2": "idle"}
    part = slurm.run(["scontrol", "show", "partition", "debug", "-o"], check=True).stdout
    assert "TotalNodes=2 " in part and "TotalCPUs=4 " in part and "Nodes=n[1-2] " in part


def test_batch_job_spans_both_nodes(slurm: SlurmCluster, tmp_path: Path) -> None:
    script = f"""#!/bin/bash
srun -o {tmp_path}/task-%t.out bash -c \
    'echo $SLURM_NODEID $SLURM_PROCID $SLURM_LOCALID $SLURM_JOB_NODELIST $SLURMD_NODENAME'
echo "batch on $SLURMD_NODENAME"
"""
    job = slurm.sbatch(script, [*JOB, "-o", f"{tmp_path}/batch-%j.out"])
    assert slurm.wait_job(job, 120) == "COMPLETED"
    rows = sorted((tmp_path / f"task-{t}.out").read_text().split() for t in (0, 1))
    assert rows == [["0", "0", "0", "n[1-2]", "n1"], ["1", "1", "0", "n[1-2]", "n2"]]
    assert (tmp_path / f"batch-{job}.out").read_text() == "batch on n1\n"  # the batch script runs on node 0
    assert slurm.job_info(job)["ExitCode"] == "0:0"


def test_failing_job_is_failed(slurm: SlurmCluster, tmp_path: Path) -> None:
    job = slurm.sbatch("#!/bin/bash\nsrun bash -c 'exit $SLURM_NODEID'\n", [*JOB, "-o", f"{tmp_path}/%j.out"])
    assert slurm.wait_job(job, 120) == "FAILED"
    assert slurm.job_info(job)["ExitCode"] == "1:0"


def test_torchrun_across_nodes_with_the_venv_python(slurm: SlurmCluster, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    (tmp_path / "allreduce.py").write_text("""
import os, sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(dist.get_rank(), dist.get_world_size(), t.item(), os.environ["SLURM_NODEID"], sys.executable, flush=True)
dist.destroy_process_group()
""")
    script = f"""#!/bin/bash
export OMP_NUM_THREADS=1
srun -o {tmp_path}/rank-%n.out -e {tmp_path}/rank-%n.err bash -c 'exec python -m torch.distributed.run --nnodes=2 --nproc_per_node=1 \\
    --node_rank=$SLURM_NODEID --master_addr=127.0.0.1 --master_port={_free_port()} {tmp_path}/allreduce.py'
"""
    job = slurm.sbatch(script, [*JOB, "-o", f"{tmp_path}/batch.out"])
    state = slurm.wait_job(job, 120)
    assert state == "COMPLETED", (tmp_path / "batch.out").read_text()
    for node in (0, 1):
        # (the ranks' stderr apart: torchrun and c10d warnings, e.g. a slow rendezvous on a loaded machine)
        out = (tmp_path / f"rank-{node}.out").read_text()
        assert len(out.split()) == 5, out + (tmp_path / f"rank-{node}.err").read_text()
        rank, world, total, nodeid, exe = out.split()
        assert (rank, world, float(total), nodeid) == (str(node), "2", 3.0, str(node))
        assert os.path.samefile(exe, sys.executable)


def test_requeue_runs_the_job_again(slurm: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "requeue.out"
    script = """#!/bin/bash
echo "run ${SLURM_RESTART_COUNT:-0}"
srun bash -c 'echo "step $SLURM_PROCID restart ${SLURM_RESTART_COUNT:-0}"'
if [ -z "$SLURM_RESTART_COUNT" ]; then sleep 300; fi
echo "done ${SLURM_RESTART_COUNT:-0}"
"""
    # --open-mode=append: without it the second run truncates the first run's output
    job = slurm.sbatch(script, [*JOB, "--requeue", "--open-mode=append", "-o", str(out)])
    _wait_for(out, "step 1 restart 0")
    slurm.requeue(job)
    assert slurm.wait_job(job, 120) == "COMPLETED"
    lines = out.read_text().splitlines()
    runs = [ln for ln in lines if re.fullmatch(r"(run|done) \d", ln)]
    assert runs == ["run 0", "run 1", "done 1"], lines
    assert sorted(ln for ln in lines if ln.startswith("step")) == [
        "step 0 restart 0", "step 0 restart 1", "step 1 restart 0", "step 1 restart 1"]
    assert slurm.job_info(job)["Restarts"] == "1"


def test_job_requeues_itself_on_usr1(slurm: SlurmCluster, tmp_path: Path) -> None:
    # The launcher's pattern: a trap that requeues its own job; slurm then SIGTERMs the old run.
    out = tmp_path / "self.out"
    script = """#!/bin/bash
echo "run ${SLURM_RESTART_COUNT:-0}"
trap 'echo requeue; scontrol requeue $SLURM_JOB_ID; echo "requeue rc $?"; sleep 2' USR1
trap 'echo "TERM"; exit 5' TERM
if [ -z "$SLURM_RESTART_COUNT" ]; then
    srun sleep 300 &
    echo ready
    while true; do sleep 1 & wait $!; done
fi
"""
    job = slurm.sbatch(script, [*JOB, "--open-mode=append", "-o", str(out)])  # JobRequeue=1: --requeue is the default
    _wait_for(out, "ready")
    time.sleep(0.5)  # let srun start its step
    assert slurm.run(["scancel", "--signal=USR1", "--batch", job]).returncode == 0
    assert slurm.wait_job(job, 120) == "COMPLETED"
    lines = out.read_text().splitlines()
    # the old run gets SIGTERM (bash runs the TERM trap once the USR1 trap is done or its sleep is killed)
    assert [ln for ln in lines if ln.startswith(("run", "requeue", "TERM"))] == [
        "run 0", "requeue", "requeue rc 0", "TERM", "run 1"], lines
    assert slurm.job_info(job)["Restarts"] == "1"


SIGNAL_SCRIPT = """#!/bin/bash
trap 'echo "batch got USR1"; kill $step; wait; exit 0' USR1
srun bash -c 'trap "echo step $SLURM_PROCID got USR1" USR1; echo "step $SLURM_PROCID ready"
              sleep 300 & wait; sleep 300' &
step=$!
echo ready
while true; do sleep 1 & wait $!; done  # a trap runs only between commands: wait, not a long sleep
"""


def test_usr1_reaches_the_batch_script(slurm: SlurmCluster, tmp_path: Path) -> None:
    # Before the time limit: fires at slurmctld's next 30 s check once less than 55 s are left.
    timed, now = tmp_path / "timed.out", tmp_path / "now.out"
    timed_job = slurm.sbatch(SIGNAL_SCRIPT, ["-N2", "--ntasks-per-node=1", "-t", "1", "--signal=B:USR1@55",
                                             "-o", str(timed)])
    # At once: scancel --batch signals the batch shell only, not the job steps.
    job = slurm.sbatch(SIGNAL_SCRIPT, [*JOB, "-o", str(now)])
    _wait_for(now, "step 1 ready")
    _wait_for(now, "step 0 ready")
    assert slurm.run(["scancel", "--signal=USR1", "--batch", job]).returncode == 0
    # Generous: on a loaded 2-core machine a node has been seen to confirm the job's end 30+ s late.
    assert slurm.wait_job(job, 120) == "COMPLETED"
    lines = now.read_text().splitlines()
    assert "batch got USR1" in lines and not any("step" in ln and "got USR1" in ln for ln in lines), lines

    assert slurm.wait_job(timed_job, 120) == "COMPLETED"  # not TIMEOUT: the trap ended it, inside the 1 min limit
    assert "batch got USR1" in timed.read_text().splitlines()


def test_stop_kills_daemons_and_job_processes(slurm: SlurmCluster, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    with SlurmCluster(tmp_path / "cluster") as cluster:
        daemons = [p.pid for p in cluster._procs.values()]
        assert all(_alive(pid) for pid in daemons)
        job = cluster.sbatch(f"#!/bin/bash\nsrun bash -c 'echo $$ >> {pids}; exec sleep 300'\n",
                             [*JOB, "-o", f"{tmp_path}/%j.out"])
        deadline = time.monotonic() + 30
        while not (pids.exists() and len(pids.read_text().split()) == 2) and time.monotonic() < deadline:
            time.sleep(0.1)
        tasks = [int(p) for p in pids.read_text().split()]
        assert len(tasks) == 2 and all(_alive(pid) for pid in tasks)
        assert cluster.job_state(job) == "RUNNING"
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 15
    assert not [pid for pid in daemons + tasks if _alive(pid)]
    assert not [pid for pid in cluster._our_pids() if _alive(pid)]
    assert (tmp_path / "cluster" / "log" / "slurmctld.log").stat().st_size > 0  # logs are kept
    # the session's cluster is untouched
    assert set(slurm.node_states()) == {"n1", "n2"}


def test_install_reason_when_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import slurm_cluster

    monkeypatch.setattr(slurm_cluster, "_missing", lambda: ["slurmctld"])
    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 1000)
    reason = slurm_cluster.install_slurm(timeout=5)
    assert reason is not None and "not root" in reason and "slurmctld" in reason


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_unavailable_fails_under_ci_and_skips_otherwise(monkeypatch: pytest.MonkeyPatch, ci: str, outcome) -> None:
    from tests import slurm_cluster

    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="no Slurm cluster: because"):
        slurm_cluster._unavailable("because")
