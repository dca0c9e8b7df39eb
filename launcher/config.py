"""Typed configuration of `python -m launcher` (conf/launch.yaml + conf/launcher/*.yaml).

The launcher reads two configs: this one (where and how many processes) and the job's own runtime
config (what they run), composed from the same command line. It never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

JOBS = {"generate": "runtime.generate", "bench": "runtime.bench", "serve": "runtime.serve"}
"""job name -> the runtime entry module every launch path ends in."""
OUTPUTS = {"generate": ("output.path", "completions.jsonl"), "bench": ("bench.out_dir", "bench"),
           "serve": ("serve.out_dir", "serve")}
"""job name -> (the override that places its outputs, the name inside the run directory)."""


@dataclass
class LauncherConfig:
    kind: str = "local"
    """`local` (torchrun on this machine) or `slurm` (an sbatch script, submitted)."""
    num_nodes: int = 1
    """Nodes of the allocation (slurm); local launches use one."""
    gpus_per_node: int = 0
    """GPUs requested per node (`--gpus-per-node`); 0 for CPU-only nodes."""
    procs_per_node: int | None = None
    """Ranks per node; default gpus_per_node, else world size / num_nodes. num_nodes * procs_per_node
    must equal the runtime's tp_size * ep_size * dp_size."""
    cpus_per_task: int | None = None
    """CPUs per node-task (`--cpus-per-task`); null leaves Slurm's default."""
    mem: str | None = None
    """Memory per node (`--mem`, e.g. 200G); null leaves Slurm's default."""
    time: str = "01:00:00"
    """Time limit (`--time`, HH:MM:SS or D-HH:MM:SS)."""
    partition: str | None = None
    """Partition (`--partition`); null uses the cluster's default."""
    account: str | None = None
    """Account to charge (`--account`)."""
    qos: str | None = None
    """Quality of service (`--qos`)."""
    constraint: str | None = None
    """Node features required (`--constraint`, e.g. h100)."""
    job_name: str | None = None
    """Slurm job name; default gptoss-<job>."""
    sbatch_extra: list[str] = field(default_factory=list)
    """Extra `#SBATCH` options, verbatim, e.g. ['--exclusive', '--reservation=demo']."""
    env: dict[str, str] = field(default_factory=dict)
    """Variables exported for every rank, e.g. {NCCL_SOCKET_IFNAME: ib0, GLOO_SOCKET_IFNAME: eth0}."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run on each node before the job (module load, source .venv/bin/activate, ...)."""
    python: str | None = None
    """Python interpreter on the nodes; null uses the one running the launcher."""
    port: int | None = None
    """Rendezvous port on the head node; null derives a fixed one per job: 20000 + job id % 20000."""
    requeue: bool = True
    """On preemption or the time-limit signal, stop after the current batch and requeue the job."""
    signal_seconds: int = 120
    """Seconds before the time limit at which the job is told to stop (`--signal=B:USR1@N`)."""
    run_root: str = "runs"
    """Each launch gets a directory <run_root>/<job>-<timestamp> with the script, config, logs, outputs."""
    wait: bool = False
    """Slurm: wait for the job to end, then report success, or its exit code and the failing log's tail.
    (job=serve always waits until the server answers and prints its address, then leaves it running.)"""
    poll_seconds: float = 5.0
    """How often `wait` asks Slurm about the job."""


@dataclass
class LaunchConfig:
    """Root of `python -m launcher` (conf/launch.yaml)."""

    job: str = "generate"
    """Which runtime entry to launch: generate, bench or serve."""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    """Where and how many processes (conf/launcher/local.yaml, slurm.yaml)."""


ConfigStore.instance().store(name="launch_schema", node=LaunchConfig)
