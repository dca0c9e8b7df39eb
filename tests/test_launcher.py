"""The launcher's builders as plain data, its CLI (dry run, errors), and a real local launch."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launcher import build, submit
from launcher.__main__ import compose_launch, main, split_args
from runtime.errors import UserError
from tests.conftest import ROOT, read_jsonl


def launcher_cfg(*overrides: str):  # noqa: ANN201
    return compose_launch(list(overrides)).launcher


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_split_args() -> None:
    ours, theirs, dry = split_args(["job=generate", "launcher=slurm", "launcher.num_nodes=2", "parallel.tp_size=2",
                                    "prompts.developer=Be brief.", "--dry-run", "+launcher.env.NCCL_DEBUG=WARN"])
    assert ours == ["job=generate", "launcher=slurm", "launcher.num_nodes=2", "+launcher.env.NCCL_DEBUG=WARN"]
    assert theirs == ["parallel.tp_size=2", "prompts.developer=Be brief."] and dry


def test_shape_checks_counts() -> None:
    slurm = launcher_cfg("launcher=slurm", "launcher.num_nodes=2", "launcher.gpus_per_node=8")
    assert build.shape(slurm, 8, 2, 1) == build.Shape(2, 8)
    with pytest.raises(UserError, match=r"num_nodes\(2\) \* procs_per_node\(8\) = 16 ranks, but tp\(8\) \* ep\(1\) \* dp\(1\) = 8"):
        build.shape(slurm, 8, 1, 1)
    cpu = launcher_cfg("launcher=slurm", "launcher.num_nodes=2", "launcher.gpus_per_node=0")
    assert build.shape(cpu, 2, 1, 1) == build.Shape(2, 1)
    with pytest.raises(UserError, match="do not split over 2 nodes"):
        build.shape(cpu, 3, 1, 1)
    local = launcher_cfg()
    assert build.shape(local, 2, 2, 1) == build.Shape(1, 4)
    with pytest.raises(UserError, match="launcher=local runs on this machine only"):
        build.shape(launcher_cfg("launcher.num_nodes=2"), 2, 1, 1)
    with pytest.raises(UserError, match="one rank per GPU"):
        build.shape(launcher_cfg("launcher=slurm", "launcher.procs_per_node=4", "launcher.gpus_per_node=2"), 4, 1, 1)


def test_torchrun_argv() -> None:
    argv = build.torchrun_argv("generate", ["parallel.tp_size=2", "prompts.developer=Be brief."], build.Shape(1, 2),
                               "/usr/bin/python3", Path("/r/logs"))
    assert argv[:5] == ["/usr/bin/python3", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert argv[-4:] == ["-m", "runtime.generate", "parallel.tp_size=2", "prompts.developer=Be brief."]


def test_sbatch_script() -> None:
    lc = launcher_cfg("launcher=slurm", "launcher.num_nodes=2", "launcher.gpus_per_node=8", "launcher.partition=gpu",
                      "launcher.time=02:00:00", "launcher.account=proj", "launcher.qos=high", "launcher.constraint=h100",
                      "launcher.cpus_per_task=32", "launcher.sbatch_extra=[--exclusive]",
                      "+launcher.env.NCCL_SOCKET_IFNAME=ib0", "launcher.setup=[module load cuda]")
    text = build.sbatch_script("generate", ["parallel.tp_size=8", "parallel.ep_size=2", "prompts.developer=Be brief."],
                               build.Shape(2, 8), lc, Path("/runs/x"))
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for opt in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--time=02:00:00", "--partition=gpu",
                "--account=proj", "--qos=high", "--constraint=h100", "--cpus-per-task=32", "--exclusive",
                "--requeue", "--signal=B:USR1@120", "--output=/runs/x/slurm-%j.out"):
        assert f"#SBATCH {opt}" in lines, opt
    assert "module load cuda" in lines and "export NCCL_SOCKET_IFNAME=ib0" in lines
    assert "export GPTOSS_PROCS_PER_NODE=8" in lines and "export GPTOSS_RUN_DIR=/runs/x" in lines
    assert lines[-1] == (f"exec {build.NODE_SCRIPT} runtime.generate parallel.tp_size=8 parallel.ep_size=2 "
                         "'prompts.developer=Be brief.'")
    no_requeue = build.sbatch_script("generate", [], build.Shape(1, 8),
                                     launcher_cfg("launcher=slurm", "launcher.requeue=false"), Path("/r"))
    assert "--requeue" not in no_requeue and "export GPTOSS_REQUEUE=0" in no_requeue


def test_sbatch_script_with_spaces_in_paths() -> None:
    """sbatch splits an #SBATCH line at spaces unless quoted: a run directory under "my project" was refused
    ("Invalid directive found in batch script: project/runs/...")."""
    text = build.sbatch_script("generate", [], build.Shape(1, 1),
                               launcher_cfg("launcher=slurm", "launcher.job_name=my job"), Path("/home/u/my project/r"))
    directives = [shlex.split(ln) for ln in text.splitlines() if ln.startswith("#SBATCH ")]
    assert ["#SBATCH", "--output=/home/u/my project/r/slurm-%j.out"] in directives
    assert ["#SBATCH", "--job-name=my job"] in directives
    assert all(len(d) == 2 for d in directives), directives


def test_dry_run_prints_and_submits_nothing(tmp_path: Path) -> None:
    proc = cli("job=generate", "launcher=slurm", "launcher.num_nodes=2", "launcher.gpus_per_node=8",
               "launcher.partition=gpu", "launcher.time=02:00:00", f"launcher.run_root={tmp_path}",
               "parallel.tp_size=8", "parallel.ep_size=2", "--dry-run", env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash") and "#SBATCH --nodes=2" in proc.stdout
    config = proc.stdout.split("# --- resolved generate config ---\n")[1].split("# --- launcher ---")[0]
    assert OmegaConf.create(config).parallel.ep_size == 2
    assert not any(tmp_path.iterdir())  # no run directory, no submission


def test_local_dry_run_prints_a_command_the_shell_runs_as_is(tmp_path: Path) -> None:
    proc = cli("job=generate", "launcher=local", f"launcher.run_root={tmp_path}", "prompts.developer=Be brief.",
               "--dry-run")
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout.splitlines()[0])
    assert argv[argv.index("runtime.generate") + 1] == "prompts.developer=Be brief."  # one argument, not two
    assert not any(tmp_path.iterdir())


def test_serve_job_dry_run(tmp_path: Path) -> None:
    proc = cli("job=serve", "launcher=slurm", "launcher.num_nodes=2", "launcher.gpus_per_node=8",
               f"launcher.run_root={tmp_path}", "parallel.tp_size=8", "parallel.ep_size=2", "serve.port=9000",
               "--dry-run", env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout.split("# --- resolved serve config ---\n")[0]
    last = script.splitlines()[-1]
    assert last.startswith(f"exec {build.NODE_SCRIPT} runtime.serve ") and "serve.port=9000" in last
    assert f"serve.out_dir={tmp_path}/serve-" in last  # the server's files go to the run directory
    config = proc.stdout.split("# --- resolved serve config ---\n")[1].split("# --- launcher ---")[0]
    assert OmegaConf.create(config).serve.port == 9000
    bad = cli("job=serve", "launcher=local", "serve.max_batchs=3", "--dry-run")
    assert bad.returncode != 0 and "max_batchs" in bad.stderr


def test_launches_in_the_same_second_get_their_own_run_directories(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep submits several jobs a second: each gets its own run directory. (They shared one: the second
    job's script and config replaced the first's, and it resumed the first's output, skipping every prompt.)"""
    ids = iter(["1", "2"])
    monkeypatch.setattr(submit, "require_sbatch", lambda: None)
    monkeypatch.setattr(submit, "submit", lambda script: next(ids))
    monkeypatch.setattr(time, "strftime", lambda fmt, *t: "20260101-000000")
    for n in (2, 4):
        assert main(["launcher=slurm", "launcher.gpus_per_node=0", "launcher.procs_per_node=1",
                     f"launcher.run_root={tmp_path}", f"generation.max_new_tokens={n}"]) == 0
    first, second = sorted(tmp_path.iterdir())
    assert (first.name, second.name) == ("generate-20260101-000000", "generate-20260101-000000-2")
    for run_dir, n in ((first, 2), (second, 4)):
        cfg = OmegaConf.load(run_dir / "config.yaml")
        assert cfg.generation.max_new_tokens == n and cfg.output.path == f"{run_dir}/completions.jsonl"
        assert f"output.path={run_dir}/completions.jsonl" in (run_dir / "job.sbatch").read_text()


def test_serve_job_does_not_announce_an_earlier_servers_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A serve.out_dir reused from an earlier launch holds that server's endpoint.json: the launcher printed its
    address at once as the new server's, though the new job had not even started (here it fails)."""
    out_dir = tmp_path / "serve"
    out_dir.mkdir()
    (out_dir / "endpoint.json").write_text(json.dumps({"base_url": "http://old:1/v1", "model": "tiny", "hostname": "old",
                                                       "host": "127.0.0.1", "port": 1}))
    monkeypatch.setattr(submit, "require_sbatch", lambda: None)
    monkeypatch.setattr(submit, "submit", lambda script: "7")
    monkeypatch.setattr(submit, "job_state", lambda job_id: ("FAILED", "1:0"))
    rc = main(["job=serve", "launcher=slurm", "launcher.gpus_per_node=0", "launcher.procs_per_node=1",
               f"launcher.run_root={tmp_path}", f"serve.out_dir={out_dir}"])
    assert rc == 1 and "http://old:1/v1" not in capsys.readouterr().out


def test_errors_are_clear(tmp_path: Path) -> None:
    bad = cli("launcher=slurm", "launcher.num_nodes=2", "parallel.tp_size=8", f"launcher.run_root={tmp_path}")
    assert bad.returncode == 2 and "tp(8) * ep(1) * dp(1) = 8" in bad.stderr
    typo = cli("launcher=slurm", "generation.max_new_token=3", "--dry-run")
    assert typo.returncode != 0 and "max_new_token" in typo.stderr
    no_sbatch = cli("launcher=slurm", "launcher.gpus_per_node=0", "launcher.procs_per_node=1",
                    f"launcher.run_root={tmp_path}", env={"PATH": str(Path(sys.executable).parent)})
    assert no_sbatch.returncode == 2 and "sbatch is not on PATH" in no_sbatch.stderr
    assert not any(tmp_path.iterdir())


def test_launcher_never_imports_torch() -> None:
    code = ("import sys; from launcher.__main__ import main; from launcher import build, submit;"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_local_launch_runs_torchrun(tmp_path: Path) -> None:
    proc = cli("job=generate", "launcher=local", f"launcher.run_root={tmp_path}", "parallel.tp_size=2",
               "model.device=cpu", "generation.max_new_tokens=4", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    assert "--nproc_per_node=2" in (run_dir / "command.txt").read_text()
    assert OmegaConf.load(run_dir / "config.yaml").parallel.tp_size == 2
    assert len(read_jsonl(run_dir / "completions.jsonl")) == 4
    assert len(list((run_dir / "logs").rglob("stderr.log"))) == 2  # one per rank


SCRIPTS = sorted(str(p) for p in (ROOT / "slurm").iterdir())


def test_scripts_pass_shellcheck(tmp_path: Path) -> None:
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is missing in CI: .ci/run installs it (apt-get install shellcheck)")
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    rendered = tmp_path / "job.sbatch"
    rendered.write_text(build.sbatch_script("generate", ["parallel.tp_size=2", "prompts.developer=a b"],
                                            build.Shape(2, 1), launcher_cfg("launcher=slurm"), tmp_path))
    proc = subprocess.run(["shellcheck", "-s", "bash", *SCRIPTS, str(rendered)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
