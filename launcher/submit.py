"""The side effects: run a local launch, submit an sbatch script, follow a job to its end."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from launcher.build import LaunchError

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def run_local(argv: list[str]) -> int:
    """Run torchrun in the foreground; its exit code."""
    return subprocess.run(argv).returncode


def require_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch is not on PATH: run this on a Slurm login node (or load its module), or use launcher=local")


def submit(script: Path) -> str:
    """sbatch the script; the job id. Slurm's own complaint (unknown partition, ...) is shown."""
    require_sbatch()
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        msg = proc.stderr.strip() or proc.stdout.strip()
        hint = " (`sinfo -s` lists the partitions)" if "partition" in msg.lower() else ""
        raise LaunchError(f"sbatch refused {script}: {msg}{hint}")
    return proc.stdout.strip().split(";")[0]


def job_state(job_id: str) -> tuple[str, str]:
    """(JobState, ExitCode) from scontrol, or from sacct once the controller has forgotten the job."""
    proc = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    if proc.returncode == 0:
        state = re.search(r"JobState=(\S+)", proc.stdout)
        code = re.search(r"ExitCode=(\S+)", proc.stdout)
        return (state.group(1) if state else "UNKNOWN", code.group(1) if code else "?")
    if shutil.which("sacct"):
        acct = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode"],
                              capture_output=True, text=True, timeout=60)
        if acct.returncode == 0 and acct.stdout.strip():
            state, code = acct.stdout.strip().splitlines()[0].split("|")
            return state.split()[0], code
    return "UNKNOWN", "?"


def wait(job_id: str, poll_seconds: float, timeout: float | None = None) -> tuple[str, str]:
    """Poll until the job reaches a final state (requeues pass through PENDING and go on)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    unknown = 0
    while True:
        state, code = job_state(job_id)
        unknown = unknown + 1 if state == "UNKNOWN" else 0
        if state in FINAL_STATES or unknown >= 3:  # a controller hiccup is not the end of the job
            return state, code
        if deadline is not None and time.monotonic() > deadline:
            raise LaunchError(f"job {job_id} still {state} after {timeout:.0f} s")
        time.sleep(poll_seconds)


def wait_for_file(job_id: str, path: Path, poll_seconds: float, timeout: float | None = None) -> tuple[str, str] | None:
    """Poll until `path` exists (None) or the job reaches a final state first ((state, exit code))."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if path.is_file():
            return None
        state, code = job_state(job_id)
        if state in FINAL_STATES:
            return None if path.is_file() else (state, code)
        if deadline is not None and time.monotonic() > deadline:
            raise LaunchError(f"job {job_id} is {state} and {path} has not appeared after {timeout:.0f} s")
        time.sleep(poll_seconds)


def failure_report(run_dir: Path, job_id: str, state: str, code: str, tail_lines: int = 30) -> str:
    """The failing rank's log tail: the first per-rank stderr with a traceback, else the node logs."""
    logs = sorted((run_dir / "logs").rglob("stderr.log")) if (run_dir / "logs").is_dir() else []
    failing = [p for p in logs if re.search(r"Traceback|: error: ", p.read_text(errors="replace"))]
    picks = failing[:1] or sorted((run_dir / "logs").glob("node*.log"))[:2] or sorted(run_dir.glob("slurm-*.out"))
    parts = [f"job {job_id} ended {state} (exit code {code}); run directory {run_dir}"]
    for p in picks:
        tail = p.read_text(errors="replace").splitlines()[-tail_lines:]
        parts.append(f"--- last {len(tail)} lines of {p} ---\n" + "\n".join(tail))
    return "\n".join(parts)
