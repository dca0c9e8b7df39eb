"""A real, throwaway Slurm cluster on this one machine, for tests of the launcher.

Debian's Slurm (22.05): one munged with its own key and socket, one slurmctld and N slurmd
("n1".."nN", all on 127.0.0.1 with their own ports), every path under one work directory and
every command run with ``SLURM_CONF`` pointing at its slurm.conf.  Nothing of the system's
/etc/slurm or /etc/munge is used, and nothing is left running after ``stop()``.

    from tests.slurm_cluster import slurm  # noqa: F401   (in conftest.py)

    def test_x(slurm):
        job = slurm.sbatch(script_path, ["-N2", "--ntasks-per-node=1"])
        assert slurm.wait_job(job, 60) == "COMPLETED"

Things a user of the cluster must know:
- node names (n1, n2) do not resolve: use 127.0.0.1 as the rendezvous host;
- both "nodes" are this machine; each is given ``cpus_per_node`` CPUs;
- ``$SLURM_NODEID`` in a batch script's body is node 0's: per-node values need
  ``srun bash -c '...'``;
- accounting is off (no sacct): ``wait_job`` reads ``scontrol show job``; finished jobs stay
  visible for an hour (MinJobAge=3600);
- ``%N`` in -o/--output is the machine's hostname on every "node": tell nodes apart with
  ``%n`` (node id) or ``%t`` (task id) in ``srun -o``;
- signals: ``--signal=B:SIG@N`` and ``scancel --signal=SIG --batch`` reach the batch shell only;
  ``--signal=SIG@N`` and plain ``scancel --signal=SIG`` reach the job steps' tasks only;
  ``scancel --signal=SIG --full`` reaches both.  ``@N`` is checked every 30 s (it comes up to
  ~30 s early) and time limits are whole minutes.  A bash trap runs only between commands:
  ``sleep 1 & wait $!``, not a long foreground command;
- requeue: the job keeps its id, SLURM_RESTART_COUNT is unset in the first run and 1 in the
  second, the old run gets SIGTERM (SIGKILL KillWait=5 s later), the output file is truncated
  unless ``--open-mode=append``, and the job waits 120 s (Reason=BeginTime) before running
  again, which ``wait_job`` shortens to ~2 s.
"""

from __future__ import annotations

import atexit
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest

# The binaries a cluster needs: daemons in /usr/sbin, clients in /usr/bin.
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmstepd")
CLIENTS = ("sinfo", "squeue", "sbatch", "srun", "scontrol", "scancel")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

# Job states after which a job will not run again by itself.
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL",
    "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED",
})


def _search_path(path: str | None = None) -> str:
    """PATH plus the system directories (root's sbin is not always on a user's PATH)."""
    parts = [p for p in (path if path is not None else os.environ.get("PATH", "")).split(os.pathsep) if p]
    return os.pathsep.join(parts + [d for d in SYSTEM_PATH if d not in parts])


def _which(name: str) -> str | None:
    return shutil.which(name, path=_search_path())


def _missing() -> list[str]:
    return [b for b in DAEMONS + CLIENTS if _which(b) is None]


def _apt(args: list[str], timeout: float) -> str | None:
    """Runs apt-get ARGS; None on success, else a one-line reason."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "-q", "-y", "-o", "DPkg::Lock::Timeout=120", *args]
    try:
        p = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                           check=False)
    except subprocess.TimeoutExpired:
        return f"`apt-get {' '.join(args)}` took longer than {timeout:.0f} s"
    except OSError as e:
        return f"`apt-get` could not run: {e}"
    if p.returncode != 0:
        lines = [ln.strip() for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
        errs = [ln for ln in lines if ln.startswith(("E:", "W:"))] or lines[-2:]
        return f"`apt-get {' '.join(args)}` failed ({p.returncode}): {' | '.join(errs)[:400]}"
    return None


def install_slurm(timeout: float = 600) -> str | None:
    """Makes sure Slurm and munge are installed; None when they are, else why they cannot be.

    Installs Debian's packages with apt-get when a binary is missing and we are root (running
    `apt-get update` first when the install fails without it).  Bounded by `timeout` seconds.
    """
    missing = _missing()
    if not missing:
        return None
    if sys.platform != "linux":
        return f"Slurm binaries missing ({', '.join(missing)}) and this is not Linux"
    if os.geteuid() != 0:
        return f"Slurm binaries missing ({', '.join(missing)}) and not root, so cannot apt-get install them"
    if _which("apt-get") is None:
        return f"Slurm binaries missing ({', '.join(missing)}) and no apt-get to install them"
    deadline = time.monotonic() + timeout
    install = ["install", "--no-install-recommends", *PACKAGES]
    left = lambda: max(deadline - time.monotonic(), 1)
    err = _apt(install, left())
    if err is not None:  # maybe the package lists are missing or stale
        err = _apt(["update"], left()) or _apt(install, left())
    if err is not None:
        return err
    missing = _missing()
    if missing:
        return f"apt-get installed {' '.join(PACKAGES)} but these are still missing: {', '.join(missing)}"
    return None


def _free_ports(n: int) -> list[int]:
    """n distinct TCP ports that are free on 127.0.0.1 right now."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _total_memory_mb() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError):
        return 4096


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"==> {path}: (none)"
    return f"==> {path} <==\n" + "\n".join(text[-lines:])


def _proc_state(pid: int) -> str | None:
    """The state letter of /proc/PID (R, S, Z, ...), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split(" ", 1)[0]


def _alive(pid: int) -> bool:
    return _proc_state(pid) not in (None, "Z", "X")  # exited daemons may linger as zombies


class SlurmCluster:
    """munged + slurmctld + `nodes` slurmd, all under `workdir`; a context manager."""

    def __init__(self, workdir: Path, nodes: int = 2, cpus_per_node: int = 2, partition: str = "debug"):
        self.workdir = Path(workdir).resolve()
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.partition = partition
        self.node_names = [f"n{i}" for i in range(1, nodes + 1)]
        self.conf = self.workdir / "slurm.conf"
        self.logdir = self.workdir / "log"
        self.marker = f"SLURM_TEST_CLUSTER={self.workdir}"  # every process of ours carries it
        self._munge_dir: Path | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._env: dict[str, str] | None = None

    # ----------------------------------------------------------------- environment
    @property
    def munge_socket(self) -> Path:
        assert self._munge_dir is not None, "start() first"
        return self._munge_dir / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        """The environment for slurm commands and the jobs they submit (sbatch --export=ALL)."""
        if self._env is None:
            # Drop what an enclosing Slurm job would leak into ours.
            leaks = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SCONTROL_")
            base = {k: v for k, v in os.environ.items() if not k.startswith(leaks)}
            # This interpreter's directory (the venv) first, so jobs find the same python.
            path = _search_path(os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", "")]))
            k, v = self.marker.split("=", 1)
            self._env = {**base, "PATH": path, "SLURM_CONF": str(self.conf), k: v}
        return dict(self._env)

    def run(self, args: list[str], timeout: float = 60, check: bool = False, **kw) -> subprocess.CompletedProcess:
        """Runs a slurm client command (e.g. ["sinfo", "-N"]) against this cluster."""
        kw.setdefault("cwd", self.workdir)
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout, check=check,
                              stdin=subprocess.DEVNULL, **kw)

    # ----------------------------------------------------------------- configuration
    def _write_config(self) -> None:
        w = self.workdir
        for d in ("state", "log", "run", *(f"spool/{n}" for n in self.node_names)):
            (w / d).mkdir(parents=True, exist_ok=True)
        # munged wants its socket directory owner-writable only, and a socket path < 108 bytes.
        munge_dir = w / "munge"
        if len(str(munge_dir / "munge.socket")) > 100:
            munge_dir = Path(tempfile.mkdtemp(prefix="munge-"))
        munge_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(munge_dir, 0o755)
        self._munge_dir = munge_dir
        key = w / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)

        ctld_port, node_ports = _free_ports(1)[0], []
        for _ in range(100):  # slurmd ports must be a contiguous range
            base = random.randrange(20000, 60000)
            node_ports = list(range(base, base + self.nodes))
            if ctld_port not in node_ports and self._ports_free(node_ports):
                break
        user = pwd.getpwuid(os.getuid()).pw_name
        mem = max(_total_memory_mb() // max(self.nodes, 1) - 256, 256)
        nodes = f"n[1-{self.nodes}]" if self.nodes > 1 else "n1"
        ports = f"{node_ports[0]}-{node_ports[-1]}" if self.nodes > 1 else str(node_ports[0])
        node_line = (f"NodeName={nodes} NodeHostname=localhost NodeAddr=127.0.0.1 Port={ports} "
                     f"CPUs={self.cpus_per_node} RealMemory={mem} State=UNKNOWN")
        self.conf.write_text(f"""\
# Written by tests/slurm_cluster.py: a throwaway cluster on one machine.
ClusterName=test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool/%n
SlurmctldPidFile={w}/run/slurmctld.pid
SlurmdPidFile={w}/run/slurmd-%n.pid
SlurmctldLogFile={w}/log/slurmctld.log
SlurmdLogFile={w}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# Several slurmd on one host, whatever the hardware says.
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Start batch jobs within ~1 s of sbatch (default: ~2-3 s).
SchedulerParameters=batch_sched_delay=0,sched_interval=1
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# Requeue allowed (scontrol requeue, sbatch --requeue); finished jobs stay visible to scontrol.
JobRequeue=1
MinJobAge=3600
# Fast turnaround for tests.
KillWait=5
InactiveLimit=0
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=60
UnkillableStepTimeout=30
{node_line}
PartitionName={self.partition} Nodes={nodes} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    @staticmethod
    def _ports_free(ports: list[int]) -> bool:
        for p in ports:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    return False
        return True

    # ----------------------------------------------------------------- lifecycle
    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.logdir / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                                 stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True)

    def _check_alive(self) -> None:
        for name, p in self._procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited ({p.returncode}) while starting the cluster\n{self.log_tails()}")

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of each daemon's log (its stderr where it has no log file yet)."""
        tails = [_tail(self.logdir / "munged.out", lines)]
        for name in ["slurmctld", *(f"slurmd-{n}" for n in self.node_names)]:
            log, out = self.logdir / f"{name}.log", self.logdir / f"{name}.out"
            has_log = log.exists() and log.stat().st_size > 0
            tails += [_tail(log if has_log else out, lines)]
        return "\n".join(tails)

    def _wait(self, what: str, ok, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while True:
            self._check_alive()
            try:
                last = ok()
                if last is True:
                    return
            except subprocess.SubprocessError as e:
                last = e
            if time.monotonic() > deadline:
                raise TimeoutError(f"Slurm cluster in {self.workdir}: {what} not within {timeout:.0f} s "
                                   f"(last: {last!r})\n{self.log_tails()}")
            time.sleep(0.05)

    def start(self, timeout: float = 60) -> SlurmCluster:
        """Writes the configuration, starts the daemons and waits until every node is idle."""
        if self._procs:
            raise RuntimeError("cluster already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        atexit.register(self.stop)  # daemons run in their own sessions: don't leave them behind
        try:
            sock = self.munge_socket
            w = self.workdir  # munged -F logs to stderr: log/munged.out
            self._spawn("munged", [_which("munged"), "-F", "-f", f"--socket={sock}", f"--key-file={w}/munge.key",
                                   f"--pid-file={w}/run/munged.pid", f"--seed-file={w}/run/munged.seed",
                                   "--num-threads=4"])
            self._wait("munged socket", lambda: sock.exists(), timeout)
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait("slurmctld answering", lambda: self.run(["scontrol", "ping"], timeout=10).stdout.count("UP") > 0,
                       timeout)
            for n in self.node_names:
                self._spawn(f"slurmd-{n}", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", n])
            self._wait(f"all {self.nodes} nodes idle in partition {self.partition}", self._all_idle, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _all_idle(self):
        p = self.run(["sinfo", "-h", "-N", "-p", self.partition, "-o", "%N %t"], timeout=10)
        states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
        return True if states and all(states.get(n) == "idle" for n in self.node_names) else (states or p.stderr)

    def node_states(self) -> dict[str, str]:
        """{node: short state} in the partition, as sinfo shows it."""
        p = self.run(["sinfo", "-h", "-N", "-p", self.partition, "-o", "%N %t"], check=True)
        return dict(line.split() for line in p.stdout.splitlines() if line.strip())

    def _our_pids(self) -> list[int]:
        """Processes carrying our marker in their environment (daemons, slurmstepd, job tasks)."""
        needle = self.marker.encode() + b"\0"
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                environ = (d / "environ").read_bytes()
            except OSError:
                continue
            if needle in environ or environ.endswith(self.marker.encode()):
                pids.append(int(d.name))
        return pids

    def stop(self, timeout: float = 5) -> None:
        """Cancels all jobs, stops every daemon and kills whatever of ours is left; keeps all files.

        A slurmd that still has a job completing ignores SIGTERM for a while, so jobs are
        cancelled first (up to `timeout` s), then daemons get SIGTERM and, after up to
        `timeout` s more, SIGKILL; job processes left over (slurmstepd and tasks are not our
        children) are found by the marker in their environment and killed.
        """
        if not self._procs:
            return
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                jobs = self.run(["squeue", "-h", "-o", "%i"], timeout=5).stdout.split()
                if jobs:
                    self.run(["scancel", *jobs], timeout=5)
                    deadline = time.monotonic() + timeout
                    while self.run(["squeue", "-h", "-o", "%i"], timeout=5).stdout.split():
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.05)
            except subprocess.SubprocessError:
                pass
        # slurmd first (they kill their steps' processes), then slurmctld, then munged.
        order = [n for n in self._procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            p = self._procs.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name in order:
            p = self._procs.get(name)
            if p is None:
                continue
            try:
                p.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        # slurmstepd and job tasks are not our children: find them by the marker in their environment.
        for _ in range(50):
            left = [pid for pid in self._our_pids() if _alive(pid)]
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        self._procs.clear()
        atexit.unregister(self.stop)
        if self._munge_dir is not None and self._munge_dir.parent != self.workdir:
            shutil.rmtree(self._munge_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start() if not self._procs else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------- jobs
    def sbatch(self, script: str | Path, args: list[str] = (), cwd: Path | None = None) -> str:
        """Submits a batch script (a path, or the script's text) and returns the job id."""
        if not isinstance(script, Path) and "\n" in script:
            path = Path(tempfile.mkstemp(prefix="job-", suffix=".sh", dir=self.workdir)[1])
            path.write_text(script)
            script = path
        p = self.run(["sbatch", "--parsable", *args, str(script)], cwd=cwd or self.workdir)
        if p.returncode != 0:
            raise RuntimeError(f"sbatch failed ({p.returncode}): {p.stderr.strip()}")
        return p.stdout.strip().split(";")[0]

    def job_info(self, job_id: str | int) -> dict[str, str]:
        """`scontrol show job -o ID` as a dict (JobState, RestartCnt, ExitCode, NodeList, ...)."""
        p = self.run(["scontrol", "show", "job", "-o", str(job_id)], timeout=10)
        if p.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id}: {p.stderr.strip()}")
        return dict(m.groups() for m in re.finditer(r"(\w[\w:/]*)=(\S*)", p.stdout))

    def job_state(self, job_id: str | int) -> str:
        return self.job_info(job_id)["JobState"]

    def wait_job(self, job_id: str | int, timeout: float = 60, states: frozenset[str] | set[str] = FINAL_STATES,
                 hurry_requeued: bool = True) -> str:
        """Polls `scontrol show job` until the job's state is in `states` (default: a final one); returns it.

        A requeued job waits 120 s (Reason=BeginTime) before it may start again; with
        `hurry_requeued` it is made eligible 2 s from now (scontrol update StartTime=now+2)
        once the slurmstepd of its previous run are gone.  Not at once: slurmd revokes the
        job's credential when the old run is killed, with a resolution of one second, and a
        launch in that same second is refused ("Job credential revoked"): the job ends FAILED
        without running again.
        """
        deadline = time.monotonic() + timeout
        hurried = "0"  # the restart count last hurried
        while True:
            info = self.job_info(job_id)
            state = info["JobState"]
            if state in states:
                return state
            restarts = info.get("Restarts", "0")
            if (hurry_requeued and state == "PENDING" and info.get("Reason") == "BeginTime"
                    and restarts != hurried and not self._job_steps_alive(job_id)):
                self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+2"], timeout=10)
                hurried = restarts
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s\n"
                                   f"{self.run(['scontrol', 'show', 'job', str(job_id)]).stdout}\n"
                                   f"{self.log_tails(40)}")
            time.sleep(0.1)

    def _job_steps_alive(self, job_id: str | int) -> bool:
        """Whether a slurmstepd of the job is still there (its socket in a node's spool dir)."""
        spool = self.workdir / "spool"
        return any(spool.glob(f"*/*_{job_id}.*")) or any(spool.glob(f"*/job{int(job_id):05d}"))

    def requeue(self, job_id: str | int) -> None:
        """`scontrol requeue ID`; `wait_job` then skips the 120 s delay before it runs again."""
        p = self.run(["scontrol", "requeue", str(job_id)], timeout=10)
        if p.returncode != 0:
            raise RuntimeError(f"scontrol requeue {job_id} failed ({p.returncode}): {p.stderr.strip()}")

    def cancel_all(self, timeout: float = 30) -> None:
        """Cancels every job in the queue and waits until none is left running."""
        jobs = self.run(["squeue", "-h", "-o", "%i"], timeout=10).stdout.split()
        if jobs:
            self.run(["scancel", *jobs], timeout=10)
            for j in jobs:
                self.wait_job(j, timeout, hurry_requeued=False)


def _unavailable(reason: str) -> None:
    msg = f"no Slurm cluster: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A started 2-node Slurm cluster (partition "debug"), stopped at the end of the session.

    Skipped when Slurm cannot be installed, except under CI=true, where that fails.
    """
    reason = install_slurm()
    if reason is not None:
        _unavailable(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception as e:  # noqa: BLE001 -- a cluster that won't start is a failure, not a skip
        pytest.fail(f"Slurm cluster did not start: {e}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
