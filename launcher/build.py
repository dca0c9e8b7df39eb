"""Pure builders: a launch described as plain data (argument lists, script text), no side effects."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from launcher.config import JOBS, LauncherConfig
from runtime.errors import UserError

REPO = Path(__file__).resolve().parent.parent
NODE_SCRIPT = REPO / "slurm" / "torchrun.sh"


class LaunchError(UserError):
    """The launch cannot work as asked; the message names the fix."""


@dataclass(frozen=True)
class Shape:
    """Processes of a launch: num_nodes x procs_per_node ranks."""

    num_nodes: int
    procs_per_node: int

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.procs_per_node


def shape(launcher: LauncherConfig, tp: int, ep: int, dp: int) -> Shape:
    """Check the node and GPU counts against tp*ep*dp; every factor is named in the message."""
    world = tp * ep * dp
    nodes = launcher.num_nodes
    if launcher.kind == "local" and nodes != 1:
        raise LaunchError(f"launcher=local runs on this machine only: drop launcher.num_nodes={nodes} or use launcher=slurm")
    procs = launcher.procs_per_node or launcher.gpus_per_node
    if not procs:
        if world % nodes:
            raise LaunchError(f"tp({tp}) * ep({ep}) * dp({dp}) = {world} ranks do not split over {nodes} nodes")
        procs = world // nodes
    if nodes * procs != world:
        raise LaunchError(
            f"launcher.num_nodes({nodes}) * procs_per_node({procs}) = {nodes * procs} ranks, but "
            f"tp({tp}) * ep({ep}) * dp({dp}) = {world}: change the parallel sizes or the node/GPU counts"
        )
    if launcher.gpus_per_node and procs > launcher.gpus_per_node:
        raise LaunchError(f"procs_per_node({procs}) > gpus_per_node({launcher.gpus_per_node}): one rank per GPU")
    return Shape(nodes, procs)


def torchrun_argv(job: str, overrides: list[str], sh: Shape, python: str | None, log_dir: Path) -> list[str]:
    """The local launch: torchrun with a standalone rendezvous, one process per rank."""
    return [
        python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={sh.procs_per_node}",
        f"--log-dir={log_dir}", "--redirects=3", "--tee=3", "-m", JOBS[job], *overrides,
    ]


def sbatch_script(job: str, overrides: list[str], sh: Shape, lc: LauncherConfig, run_dir: Path) -> str:
    """The sbatch script: #SBATCH header, environment, then slurm/torchrun.sh with every override verbatim, run in
    the current directory."""
    name = lc.job_name or f"gptoss-{job}"
    # sbatch splits an #SBATCH line at unquoted spaces (and strips the quotes), as the shell does
    opts = [f"--job-name={shlex.quote(name)}", f"--nodes={sh.num_nodes}", "--ntasks-per-node=1", f"--time={lc.time}",
            f"--output={shlex.quote(f'{run_dir}/slurm-%j.out')}", "--open-mode=append"]
    if lc.gpus_per_node:
        opts.append(f"--gpus-per-node={lc.gpus_per_node}")
    for key in ("cpus_per_task", "mem", "partition", "account", "qos", "constraint"):
        value = getattr(lc, key)
        if value not in (None, ""):
            opts.append(f"--{key.replace('_', '-')}={value}")
    if lc.requeue:
        opts += ["--requeue", f"--signal=B:USR1@{lc.signal_seconds}"]
    opts += list(lc.sbatch_extra)
    env = {
        "GPTOSS_RUN_DIR": str(run_dir),
        "GPTOSS_PROCS_PER_NODE": str(sh.procs_per_node),
        "GPTOSS_PYTHON": lc.python or sys.executable,
        "GPTOSS_REQUEUE": "1" if lc.requeue else "0",
        **({"GPTOSS_PORT": str(lc.port)} if lc.port else {}),
        **{str(k): str(v) for k, v in lc.env.items()},
    }
    lines = ["#!/bin/bash", f"# Rendered by `python -m launcher job={job} launcher=slurm`; usable by hand: sbatch {run_dir}/job.sbatch"]
    lines += [f"#SBATCH {o}" for o in opts]
    lines += [*lc.setup, "set -euo pipefail"]  # setup first: some activate scripts trip over `set -u`
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    # Run where the launcher ran, as a local launch does (relative paths in the overrides mean the same),
    # with this repository's runtime first on the path.
    lines += [f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}",
              f"cd {shlex.quote(str(Path.cwd()))}"]
    lines += [" ".join(["exec", shlex.quote(str(NODE_SCRIPT)), JOBS[job], *map(shlex.quote, overrides)])]
    return "\n".join(lines) + "\n"
