"""Shared helpers: run the real entry points on the real tiny model, in process or under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.slurm_cluster import slurm  # noqa: F401  (a real two-node Slurm, one per session)

ROOT = Path(__file__).resolve().parent.parent
CPU = ["model.device=cpu"]  # CPU tests stay on the CPU on a GPU machine too


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def generate(overrides: list[str]) -> dict[str, Any] | None:
    """`python -m runtime.generate OVERRIDES` in this process; returns the run record."""
    from runtime import config
    from runtime.generate import run

    return run(config.compose("generate", CPU + overrides))


def torchrun(nproc: int, module: str, overrides: list[str], timeout: int = 600,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m MODULE OVERRIDES` on the CPU with gloo (`env`: extra
    environment variables)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *CPU, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


class _Traced(Exception):
    """Raised by traced_targets' backend once dynamo has handed it the whole graph."""


def traced_targets(fn: Any, *args: Any) -> list[str]:
    """The targets of the one graph torch.compile(fullgraph=True) traces from fn(*args), stopped before inductor
    compiles or runs anything (the kernels need no GPU to be traced)."""
    import torch

    graphs = []

    def backend(gm: torch.fx.GraphModule, inputs: list) -> None:
        graphs.append([str(n.target) for n in gm.graph.nodes])
        raise _Traced

    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="_Traced"):
        torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return graphs[0]


def compile_for_hopper(fn: Any, consts: dict[str, Any], types: dict[str, str],
                       divisible: tuple[str, ...] = (), num_warps: int = 4, num_stages: int = 2) -> Any:
    """A @triton.jit kernel compiled to sm_90 code by Triton's own ptxas, no GPU needed: `consts` its constexpr
    arguments (those it has), `types` the others' Triton types (default i32); pointers and the `divisible` arguments
    marked multiples of 16, as Triton marks such arguments at a launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    names = fn.arg_names
    consts = {n: v for n, v in consts.items() if n in names}
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    src = ASTSource(fn, sig, constexprs={(names.index(n),): v for n, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                           if n.endswith("_ptr") or n in divisible})
    return compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    """The embedded tiny model's cached checkpoint directory (built on first use)."""
    from runtime import checkpoint, config

    m = config.compose("generate", []).model
    from omegaconf import OmegaConf

    return checkpoint.ensure_synthetic(m.name, OmegaConf.to_container(m.arch), m.synthetic_format, m.synthetic_seed)
