"""runtime/allreduce.py on the CPU: the forward's collectives under gloo (the path every CPU and gloo
run takes), which messages the one-shot path would take, and the custom ops' shapes under torch.compile's
fake tensors. The one-shot path itself needs GPUs: tests/test_gpu_multi.py and tests/gpu_collectives.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from runtime.allreduce import ONE_SHOT_MAX_BYTES, Reducer
from tests.conftest import ROOT

WORKER = textwrap.dedent("""
    import torch, torch.distributed as dist
    from runtime import distributed
    layout = distributed.make_layout(2, 1, 1)
    groups = distributed.init(layout, torch.device("cpu"), "gloo", torch.float32, "auto")
    r = groups.tp_reduce
    assert r.path == "gloo", r.path
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3) * (layout.rank + 1)
    out = r(x)
    assert torch.equal(out, torch.arange(6, dtype=torch.float32).reshape(2, 3) * 3), out
    assert torch.equal(x, torch.arange(6, dtype=torch.float32).reshape(2, 3) * (layout.rank + 1))  # input kept
    whole = r.gather_last(torch.full((2, 2), float(layout.rank)))
    assert whole.tolist() == [[0.0, 0.0, 1.0, 1.0]] * 2, whole
    compiled = torch.compile(lambda t: r(t) * 2, backend="eager", fullgraph=True)  # an opaque op to dynamo
    assert torch.equal(compiled(x), out * 2)
    # the one-shot setup's verdict is the group's: one rank failing to map peer memory sends every rank to
    # NCCL, before any rank runs the one-shot kernel (its peers would spin on the GPU waiting for it)
    from runtime.allreduce import Reducer
    r2 = Reducer.__new__(Reducer)
    r2.group, r2.device, r2.dtype, r2.size = groups.tp, torch.device("cpu"), torch.float32, 2
    r2._buffer = r2._copy_op = None
    r2._local_reason = lambda: None
    def bad_map():
        r2._buffer = torch.empty(4)
        if layout.rank == 1:
            raise RuntimeError("no peer access")
    def no_probe():
        raise AssertionError("the probe ran although a rank had failed")
    r2._map, r2._probe = bad_map, no_probe
    reason = r2._setup_one_shot()
    assert r2._buffer is None, "a failed setup must not leave the one-shot path on"
    want = "RuntimeError: no peer access" if layout.rank == 1 else "another rank of its group"
    assert reason.startswith(want), reason
    groups.release()
    distributed.shutdown()
    if layout.rank == 0:
        print("OK", flush=True)
""")


def test_sums_and_gathers_over_gloo(tmp_path) -> None:  # noqa: ANN001
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_which_messages_take_the_one_shot_path() -> None:
    """Decode-sized hidden states do; prefill-sized ones, other dtypes, strided views and sizes that are not
    whole 16-byte vectors (the kernel refuses them: seen on the H200s with a [3, 7] bf16 tensor) go to NCCL."""
    r = Reducer.__new__(Reducer)
    r.dtype, r._buffer = torch.bfloat16, torch.empty(0)
    assert r.takes_one_shot(torch.empty(1, 1, 2880, dtype=torch.bfloat16))
    assert r.takes_one_shot(torch.empty(64, 1, 2880, dtype=torch.bfloat16))
    assert not r.takes_one_shot(torch.empty(1, 1024, 2880, dtype=torch.bfloat16))  # prefill: > 1 MiB
    assert ONE_SHOT_MAX_BYTES < 1024 * 2880 * 2
    assert not r.takes_one_shot(torch.empty(3, 7, dtype=torch.bfloat16))
    assert not r.takes_one_shot(torch.empty(1, 2880, dtype=torch.float32))
    assert not r.takes_one_shot(torch.empty(2880, 2, dtype=torch.bfloat16).t())
    assert not r.takes_one_shot(torch.empty(0, 2880, dtype=torch.bfloat16))
    r._buffer = None  # no peer memory mapped (CPU, or the setup failed): never
    assert not r.takes_one_shot(torch.empty(1, 1, 2880, dtype=torch.bfloat16))


def test_one_shot_is_refused_on_the_cpu() -> None:
    from runtime import distributed
    from runtime.errors import UserError

    lay = distributed.make_layout(1, 1, 1, world=(1, 0, 0))
    with pytest.raises(UserError, match="parallel.all_reduce='fast': use one of"):
        distributed.init(lay, torch.device("cpu"), "gloo", torch.float32, "fast")
