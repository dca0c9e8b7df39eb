"""A real `torchrun -m runtime.serve` on the CPU (gloo), for a test module to drive over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import CPU, ROOT

START_SECONDS = 600  # a failure guard only: loading the tiny model takes seconds


@dataclass
class Server:
    base_url: str
    """The OpenAI base_url (http://127.0.0.1:PORT/v1)."""
    root: str
    """http://127.0.0.1:PORT"""
    out_dir: Path
    log: Path
    """torchrun's stdout and stderr (every rank's log lines)."""
    leader_pid: int
    proc: subprocess.Popen

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def torchrun_server(tmp: Path, nproc: int, overrides: list[str], env: dict[str, str] | None = None,
                    device: list[str] = CPU) -> Iterator[Server]:
    """Start the server, wait until it answers (endpoint.json), yield it; stop it with SIGTERM to rank 0
    (every rank then leaves cleanly, which is checked) and kill what is left."""
    out_dir, log = tmp / "serve", tmp / "serve.log"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "runtime.serve", *device, "serve.port=0", f"serve.out_dir={out_dir}", *overrides]
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    endpoint = out_dir / "endpoint.json"
    deadline = time.monotonic() + START_SECONDS
    while not endpoint.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc)
            pytest.fail(f"{' '.join(cmd)} did not come up (exit {proc.returncode}):\n{log.read_text()[-6000:]}")
        time.sleep(0.2)
    ep = json.loads(endpoint.read_text())
    server = Server(ep["base_url"], ep["base_url"].removesuffix("/v1"), out_dir, log, ep["pid"], proc)
    try:
        yield server
    finally:
        os.kill(server.leader_pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            code = None
        _kill(proc)
        if code != 0:
            pytest.fail(f"the server did not stop cleanly on SIGTERM (exit {code}):\n{log.read_text()[-4000:]}")


def _kill(proc: subprocess.Popen) -> None:
    """Kill the process group this helper started (torchrun and its ranks), if anything is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
