"""Launcher values a hostile or careless user can give: nothing reaches a shell line it could break out of,
numbers out of range are refused, and what is allowed renders a script that runs exactly the job (executed
here with stub `srun`/`scontrol`: nothing else runs)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import build
from launcher.__main__ import compose_launch, hydra_quote
from runtime import config
from runtime.errors import UserError
from tests.conftest import ROOT
from tests.test_launcher import cli as launcher_cli


def cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """A slurm launch of generate from `tmp`, with run_root inside it."""
    return launcher_cli("job=generate", "launcher=slurm", f"launcher.run_root={tmp / 'runs'}", *args,
                        env={"PYTHONPATH": str(ROOT)}, cwd=tmp)


INJECT = "gpu\ntouch PWNED"


@pytest.mark.parametrize(("arg", "says"), [
    *[(f"launcher.{key}='{INJECT}'", f"launcher.{key}=") for key in
      ("partition", "account", "qos", "constraint", "mem", "time")],
    ("launcher.partition='gpu --exclusive'", "launcher.partition="),  # a space would add an sbatch option
    (f"launcher.job_name='{INJECT}'", "launcher.job_name="),
    ("launcher.sbatch_extra=['--exclusive\ntouch PWNED']", "launcher.sbatch_extra item"),
    ("launcher.sbatch_extra=[exclusive]", "each item is one sbatch option"),
    ("+launcher.env.A-B=1", "launcher.env.A-B: not a shell variable name"),
    ("launcher.num_nodes=0", "launcher.num_nodes=0 must be >= 1"),
    ("launcher.num_nodes=-2", "launcher.num_nodes=-2 must be >= 1"),
    ("launcher.gpus_per_node=-1", "launcher.gpus_per_node=-1 must be >= 0"),
    ("launcher.signal_seconds=-5", "launcher.signal_seconds=-5 must be between 1 and 65535"),
    ("launcher.port=99999", "launcher.port=99999: use a TCP port"),
    ("launcher.time=forever", "launcher.time='forever': use Slurm's"),
    ("launcher.run_root='/tmp/\\${x}'", "launcher.run_root="),  # would be an interpolation in the job's config
    ("launcher=kube", "launcher=kube: use launcher=local"),
    ("launcher.poll_seconds=nan", "launcher.poll_seconds=nan must be a positive number"),
    ("launcher.signal_seconds=7200", "launcher.signal_seconds=7200 is not before the end of launcher.time=01:00:00"),
    ("launcher.num_nodes=abc", "launcher.num_nodes"),
])
def test_bad_values_are_refused_before_anything_is_written(tmp_path: Path, arg: str, says: str) -> None:
    proc = cli(tmp_path, arg, "--dry-run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "runs").exists()


def test_check_accepts_what_slurm_accepts() -> None:
    lc = compose_launch(["launcher=slurm", "launcher.time=2-00:00:00", "launcher.mem=200G",
                         "launcher.constraint='h100&ib'", "launcher.job_name=my job", "launcher.signal_seconds=300",
                         "launcher.sbatch_extra=[--exclusive,'--reservation=demo']", "+launcher.env.NCCL_DEBUG=INFO",
                         "launcher.port=29500"]).launcher
    build.check(lc)
    text = build.sbatch_script("generate", [], build.Shape(1, 8), lc, Path("/r"))
    assert "#SBATCH --signal=B:USR1@300" in text.splitlines()  # a signal_seconds other than the default
    assert "#SBATCH --constraint=h100&ib" in text.splitlines() and "export NCCL_DEBUG=INFO" in text
    for t in ("30", "01:00:00", "1-12", "10:00", "UNLIMITED"):
        lc.time = t
        build.check(lc)
    lc.time = "1 hour"
    with pytest.raises(UserError, match="launcher.time='1 hour'"):
        build.check(lc)


def test_the_rendered_script_runs_the_job_and_nothing_else(tmp_path: Path) -> None:
    """What the checks let through (a job name with spaces and `$(...)`, an env value with a newline and
    `$(...)`, a run directory with spaces, parentheses and a quote) renders a script that, executed with
    stub srun/scontrol, hands srun exactly the job's arguments and runs nothing else."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun-args"
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\n[ \"$1 $2\" = 'show hostnames' ] && echo n1\n"
                                      "[ \"$1 $2\" = 'show node' ] && echo 'NodeName=n1 NodeAddr=127.0.0.1 x=y'\n"
                                      "exit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    root = tmp_path / "my runs (old) it's"
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "job=generate", "launcher=slurm", f"launcher.run_root={hydra_quote(str(root))}",
         "launcher.gpus_per_node=0",
         f"launcher.job_name={hydra_quote('my $(touch PWNED1) job')}",
         f"+launcher.env.NOTE={hydra_quote('a' + chr(10) + 'b $(touch PWNED2)')}",
         f"prompts.developer={hydra_quote('Be brief; $(touch PWNED3)')}", "--dry-run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout.split("# --- resolved generate config ---")[0]
    run_dir = next(line.split("=", 1)[1] for line in script.splitlines() if line.startswith("export GPTOSS_RUN_DIR="))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1",
           "SLURM_JOB_NUM_NODES": "1"}
    ran = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert not list(tmp_path.rglob("PWNED*"))
    args = record.read_text().splitlines()
    tail = args[args.index("runtime.generate") + 1 :]
    assert config.compose("generate", [a for a in tail if a.startswith("prompts.")]).prompts.developer == \
        "Be brief; $(touch PWNED3)"
    out = next(a for a in tail if a.startswith("output.path="))

    path = config.compose("generate", [out]).output.path  # what the job's Hydra reads: the run directory's file
    assert path.startswith(str(root)) and path.endswith("/completions.jsonl"), (path, run_dir)
