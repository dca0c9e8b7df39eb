"""Pure builders: a launch described as plain data (argument lists, script text), no side effects."""

from __future__ import annotations

import math
import re
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


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|\d+-\d+|UNLIMITED|INFINITE|infinite|unlimited")


def check(lc: LauncherConfig) -> None:
    """Every launcher value before anything is rendered: numbers in range, and nothing that could end an
    `#SBATCH` line and run as a command in the batch script (a newline in launcher.partition did), add an
    sbatch option (a space), or make an `export` line fail on the nodes (a bad variable name)."""
    for key, low in (("num_nodes", 1), ("gpus_per_node", 0), ("procs_per_node", 1), ("cpus_per_task", 1)):
        value = getattr(lc, key)
        if value is not None and value < low:
            raise LaunchError(f"launcher.{key}={value} must be >= {low}")
    if lc.port is not None and not 1 <= lc.port <= 65535:
        raise LaunchError(f"launcher.port={lc.port}: use a TCP port (1-65535), or null for one derived from the job id")
    if not 1 <= lc.signal_seconds <= 65535:  # sbatch's --signal takes 0..65535 seconds
        raise LaunchError(f"launcher.signal_seconds={lc.signal_seconds} must be between 1 and 65535 (seconds before "
                          "the time limit at which the job is told to stop)")
    if not (math.isfinite(lc.poll_seconds) and lc.poll_seconds > 0):
        raise LaunchError(f"launcher.poll_seconds={lc.poll_seconds} must be a positive number of seconds")
    for key in ("time", "mem", "partition", "account", "qos", "constraint"):
        value = getattr(lc, key)
        if value is not None and (value == "" and key == "time" or not _one_word(value)):
            raise LaunchError(f"launcher.{key}={value!r}: Slurm takes one word here (no spaces, newlines or control "
                              f"characters)")
    if not _TIME.fullmatch(lc.time):
        raise LaunchError(f"launcher.time={lc.time!r}: use Slurm's MM, HH:MM:SS or D-HH:MM:SS")
    limit = _seconds(lc.time)
    if lc.requeue and limit is not None and lc.signal_seconds >= limit:
        raise LaunchError(f"launcher.signal_seconds={lc.signal_seconds} is not before the end of launcher.time="
                          f"{lc.time} ({limit} s): the stop signal would come at the start; lower it or raise the time")
    if lc.job_name is not None and (not lc.job_name or not _one_line(lc.job_name)):
        raise LaunchError(f"launcher.job_name={lc.job_name!r}: one line of printable characters")
    for line in lc.sbatch_extra:
        if not _one_line(line) or not line.startswith("-"):
            raise LaunchError(f"launcher.sbatch_extra item {line!r}: each item is one sbatch option on one line, "
                              "e.g. '--exclusive' or '--reservation=demo'")
    if "${" in lc.run_root or not _one_line(lc.run_root):
        raise LaunchError(f"launcher.run_root={lc.run_root!r}: a directory path on one line, without '${{' (the "
                          "job's config would read it as an interpolation)")
    for name in lc.env:
        if not _ENV_NAME.fullmatch(str(name)):
            raise LaunchError(f"launcher.env.{name}: not a shell variable name (letters, digits and _, not starting "
                              "with a digit)")


def _seconds(time: str) -> int | None:
    """Slurm's time formats in seconds (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS); None for unlimited."""
    if not time[0].isdigit():
        return None
    days, _, rest = time.rpartition("-") if "-" in time else ("0", "", time)
    parts = [int(p) for p in rest.split(":")]
    if "-" in time:  # D-HH[:MM[:SS]]
        h, m, s = (parts + [0, 0])[:3]
    else:  # MM, MM:SS, HH:MM:SS
        h, m, s = ([0] * (3 - len(parts)) + parts) if len(parts) == 3 else (0, parts[0], parts[1] if len(parts) > 1 else 0)
    return int(days) * 86400 + h * 3600 + m * 60 + s


def _one_line(value: str) -> bool:
    return bool(value) and all(ch.isprintable() for ch in value)


def _one_word(value: str) -> bool:
    return _one_line(value) and not any(ch.isspace() for ch in value)


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
