"""python -m launcher job=generate launcher=local|slurm [launcher.*=...] [runtime overrides ...] [--dry-run]

    python -m launcher job=generate launcher=local parallel.tp_size=2
    python -m launcher job=generate launcher=slurm launcher.num_nodes=2 launcher.gpus_per_node=8 \
        launcher.partition=gpu launcher.time=02:00:00 parallel.tp_size=8 parallel.ep_size=2 --dry-run
    python -m launcher job=serve launcher=slurm launcher.num_nodes=2 launcher.gpus_per_node=8 \
        model=gpt-oss-120b model.path=/ckpt parallel.tp_size=8 parallel.ep_size=2   # prints the server's address

`job=`, `launcher=` and `launcher.*` configure the launch (launcher/config.py); every other argument is
a runtime override, checked against the job's config here and passed to it verbatim.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from launcher import build, submit
from launcher.config import JOBS, OUTPUTS
from runtime import config as runtime_config
from runtime.errors import UserError, exit_on_user_error

log = logging.getLogger("launcher")


def split_args(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """(launcher overrides, runtime overrides, dry_run)."""
    ours, theirs, dry_run = [], [], False
    for arg in argv:
        key = arg.lstrip("+~").split("=", 1)[0]
        if arg == "--dry-run":
            dry_run = True
        elif key in ("job", "launcher") or key.startswith("launcher."):
            ours.append(arg)
        else:
            theirs.append(arg)
    return ours, theirs, dry_run


def compose_launch(ours: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    for arg in ours:
        if arg.split("=", 1)[0] == "launcher" and arg.split("=", 1)[-1] not in ("local", "slurm"):
            raise UserError(f"{arg}: use launcher=local (torchrun on this machine) or launcher=slurm")
    try:
        with initialize_config_dir(config_dir=str(runtime_config.CONF_DIR), version_base=None):
            cfg = compose(config_name="launch", overrides=ours)
    except (HydraException, OmegaConfBaseException) as e:
        what = str(e).splitlines()[0] if str(e) else type(e).__name__
        cause = str(e.__cause__).splitlines()[0] if e.__cause__ is not None and str(e.__cause__) else ""
        why = f": {cause}" if cause and cause not in what else ""
        raise UserError(f"{what}{why} (the launcher's fields and their types: launcher/config.py; quote values "
                        "with spaces or shell/Hydra characters)") from None
    if cfg.job not in JOBS:
        raise UserError(f"job={cfg.job!r}: use one of {sorted(JOBS)}")
    if cfg.launcher.kind not in ("local", "slurm"):
        raise UserError(f"launcher.kind={cfg.launcher.kind!r}: use launcher=local or launcher=slurm")
    build.check(cfg.launcher)
    return cfg


def hydra_quote(value: str) -> str:
    """`value` as one Hydra override value: single-quoted (so spaces, parentheses, commas and `=` stay
    literal); inside, a quote and the backslashes before it are escaped. Plain paths stay as they are."""
    if re.fullmatch(r"[\w/.:@%+-]+", value):
        return value
    out = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    out = re.sub(r"(\\*)$", lambda m: m.group(1) * 2, out)
    return "'" + out + "'"


def new_run_dir(root: Path, job: str, stamp: str) -> Path:
    """<root>/<job>-<stamp>, or <job>-<stamp>-2, -3, ... where a launch in the same second took it."""
    base = (root / f"{job}-{stamp}").resolve()
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ours, theirs, dry_run = split_args(argv)
    launch = compose_launch(ours)
    job, lc = launch.job, launch.launcher
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = new_run_dir(Path(lc.run_root), job, stamp)
    key, name = OUTPUTS[job]
    if not any(o.split("=", 1)[0].lstrip("+") == key for o in theirs):
        theirs = [*theirs, f"{key}={hydra_quote(f'{run_dir}/{name}')}"]
    cfg = runtime_config.compose(job, theirs)  # refuses unknown keys before anything is submitted
    par = cfg.parallel
    sh = build.shape(lc, par.tp_size, par.ep_size, par.dp_size)
    resolved = OmegaConf.to_yaml(cfg)
    if lc.kind == "local":
        argv_ = build.torchrun_argv(job, theirs, sh, lc.python, run_dir / "logs")
        text = shlex.join(argv_) + "\n"
    else:
        text = build.sbatch_script(job, theirs, sh, lc, run_dir)
    if dry_run:
        print(text, end="")
        print(f"# --- resolved {job} config ---\n{resolved}", end="")
        print(f"# --- launcher ---\n{OmegaConf.to_yaml(launch)}", end="")
        return 0
    if lc.kind == "slurm":
        submit.require_sbatch()
    try:
        run_dir.mkdir(parents=True)
    except FileExistsError:
        raise build.LaunchError(f"run directory {run_dir} was just taken by another launch: launch again") from None
    (run_dir / "logs").mkdir()
    (run_dir / "config.yaml").write_text(resolved)
    (run_dir / "launch.yaml").write_text(OmegaConf.to_yaml(launch))
    if lc.kind == "local":
        (run_dir / "command.txt").write_text(text)
        log.info("run directory %s: torchrun with %d process(es)", run_dir, sh.procs_per_node)
        return submit.run_local(argv_)
    script = run_dir / "job.sbatch"
    script.write_text(text)
    endpoint = Path(cfg.serve.out_dir) / "endpoint.json" if job == "serve" else None
    if endpoint is not None and endpoint.exists():  # an earlier server's (serve.out_dir reused): not this one's
        log.info("removing %s, left by an earlier server", endpoint)
        endpoint.unlink()
    job_id = submit.submit(script)
    (run_dir / "job.json").write_text(json.dumps({"job_id": job_id, "submitted": stamp, "argv": argv}, indent=2))
    print(f"submitted job {job_id}: {sh.num_nodes} node(s) x {sh.procs_per_node} rank(s); run directory {run_dir}")
    if endpoint is not None:
        return _announce_server(job_id, endpoint, run_dir, lc.poll_seconds)
    if not lc.wait:
        return 0
    state, code = submit.wait(job_id, lc.poll_seconds)
    if state != "COMPLETED":
        log.error("%s", submit.failure_report(run_dir, job_id, state, code))
        return 1
    print(f"job {job_id} COMPLETED; outputs in {run_dir}")
    return 0


def _announce_server(job_id: str, endpoint: Path, run_dir: Path, poll_seconds: float) -> int:
    """Follow a serve job until its server answers, print where (the head node's address), leave it running."""
    print(f"waiting for the server to answer (its address goes to {endpoint}); Ctrl-C stops the waiting, "
          f"not the job", flush=True)
    ended = submit.wait_for_file(job_id, endpoint, poll_seconds)
    if ended is not None:
        log.error("%s", submit.failure_report(run_dir, job_id, *ended))
        return 1
    ep = json.loads(endpoint.read_text())
    print(f"serving {ep['model']} at {ep['base_url']} (head node {ep['hostname']}, bound to {ep['host']}:{ep['port']})")
    if ep["host"] in ("127.0.0.1", "localhost"):
        print(f"  from another machine: ssh -N -L {ep['port']}:127.0.0.1:{ep['port']} {ep['hostname']}, then "
              f"http://127.0.0.1:{ep['port']}/v1 (or launch with serve.host=0.0.0.0 and an API key)")
    print(f"  stop it with: scancel {job_id}")
    return 0


if __name__ == "__main__":
    with exit_on_user_error(log):
        sys.exit(main(sys.argv[1:]))
