"""The model-parallel collectives of a forward pass: the all-reduce after o_proj, the MoE and the
vocab-parallel embedding, and the all-gather of vocab-parallel logits.

At decode a message is a few KB (batch x hidden), so NCCL's fixed cost per call (~10-20 us, twice
per layer) is most of what it costs. `one_shot` sends it another way: every rank copies its part into
a buffer of symmetric memory (PyTorch's `torch.distributed._symmetric_memory`, mapped into every
rank of the group over NVLink peer access) and one kernel per rank reads all peers' parts and sums
them (`symm_mem.one_shot_all_reduce`). No NVLink multicast is involved (it is off on our machines).
The op is capturable in a CUDA graph. Messages above ONE_SHOT_MAX_BYTES (prefill) go to NCCL, where
bandwidth matters more than latency; gloo (CPU) always takes the process group's all-reduce.

Both collectives are registered as custom ops (`gptoss::all_reduce`, `gptoss::all_gather_last`) so
torch.compile treats them as opaque calls and CUDA-graph capture sees exactly these kernels.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from runtime.errors import UserError

log = logging.getLogger(__name__)

ONE_SHOT_MAX_BYTES = 1 << 20
"""Largest message the one-shot path takes (batch 64 x hidden 2880 x bf16 is 369 KB); larger ones
(prefill) go to NCCL."""

MODES = ("auto", "one_shot", "nccl")

_REDUCERS: list[Reducer] = []  # custom ops take an index into this list (ops cannot take Python objects)


class Reducer:
    """Sum over one process group by the fastest path this group has; see the module doc."""

    def __init__(self, group: Any, device: torch.device, dtype: torch.dtype, mode: str = "auto") -> None:
        """`mode`: one of MODES (distributed.init checks it)."""
        self.group, self.device, self.dtype = group, device, dtype
        self.size = dist.get_world_size(group)
        self.path = "nccl" if device.type == "cuda" else "gloo"
        self._buffer: torch.Tensor | None = None
        self._copy_op = None
        if device.type == "cuda" and mode != "nccl":
            reason = self._setup_one_shot()
            if reason is None:
                self.path = "one_shot"
            elif mode == "one_shot":
                raise UserError(f"parallel.all_reduce=one_shot is not available here: {reason}; "
                                "use parallel.all_reduce=auto (falls back to NCCL) or nccl")
            else:
                log.warning("one-shot all-reduce unavailable (%s): using NCCL", reason)
        self.index = len(_REDUCERS)
        _REDUCERS.append(self)

    def _setup_one_shot(self) -> str | None:
        """Allocate and map the symmetric buffer and probe it; the reason it cannot be used, or None.

        Every step ends with the group agreeing (a MAX over "failed here"): a rank that took NCCL while its
        peers ran the one-shot kernel would leave them spinning on the GPU, where no timeout finds them."""
        reason = self._local_reason()
        for step in (self._map, self._probe):
            reason = self._agree(reason)
            if reason is not None:
                break
            try:
                reason = step()
            except Exception as e:  # no P2P, no driver support, out of memory: NCCL it is
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        else:
            reason = self._agree(reason)
        if reason is not None:
            self._buffer = self._copy_op = None
        return reason

    def _local_reason(self) -> str | None:
        """What this rank alone can tell: the dtype, the PyTorch build, one node."""
        if self.dtype not in (torch.bfloat16, torch.float32):
            return f"dtype {self.dtype} (one-shot sums bf16 and fp32)"
        if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce"):
            return "this PyTorch has no symm_mem.one_shot_all_reduce"
        ranks = dist.get_process_group_ranks(self.group)
        if any(r // _local_world() != ranks[0] // _local_world() for r in ranks):
            return "the group spans several nodes (peer memory is per node)"
        return None

    def _agree(self, reason: str | None) -> str | None:
        """This rank's reason, or another's: every rank of the group leaves with the same verdict."""
        failed = torch.tensor([0 if reason is None else 1], device=self.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.group)
        if reason is None and failed.item():
            return "another rank of its group could not set it up (see that rank's warning)"
        return reason

    def _map(self) -> str | None:
        import torch.distributed._symmetric_memory as symm_mem

        elems = ONE_SHOT_MAX_BYTES // torch.empty((), dtype=self.dtype).element_size()
        buf = symm_mem.empty(elems, dtype=self.dtype, device=self.device)
        symm_mem.rendezvous(buf, self.group.group_name)
        self._buffer = buf
        self._copy_op = getattr(torch.ops.symm_mem, "one_shot_all_reduce_copy", None)
        return None

    def _probe(self) -> str | None:
        """One real reduction now, so a failure shows here and not inside a CUDA-graph capture."""
        probe = torch.full((8,), float(dist.get_rank(self.group) + 1), dtype=self.dtype, device=self.device)
        got = self._one_shot(probe)
        want = self.size * (self.size + 1) / 2
        if not torch.allclose(got.float(), torch.full_like(got.float(), want)):
            return f"the probe reduction gave {got.tolist()}, not {want}"
        return None

    def _one_shot(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        flat = self._buffer[:n]  # type: ignore[index]
        name = self.group.group_name
        if self._copy_op is not None:
            return self._copy_op(flat, x.reshape(-1), "sum", name).view_as(x)
        flat.copy_(x.reshape(-1))
        return torch.ops.symm_mem.one_shot_all_reduce(flat, "sum", name).view_as(x)

    def takes_one_shot(self, x: torch.Tensor) -> bool:
        """Whether `x` goes the one-shot way: a mapped buffer, our dtype, dense, at most ONE_SHOT_MAX_BYTES,
        and a whole number of 16-byte vectors (the kernel refuses sizes that are not 4-byte aligned;
        every hidden-state message is a multiple of 2880 elements)."""
        nbytes = x.numel() * x.element_size()
        return (self._buffer is not None and x.dtype == self.dtype and x.is_contiguous()
                and 0 < nbytes <= ONE_SHOT_MAX_BYTES and nbytes % 16 == 0
                and x.storage_offset() * x.element_size() % 16 == 0)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.takes_one_shot(x):
            return self._one_shot(x)
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=self.group)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.gptoss.all_reduce(x, self.index)

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` concatenated along the last dimension, in group-rank order."""
        return torch.ops.gptoss.all_gather_last(x, self.index)

    def _gather_last(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if self.path == "gloo":
            parts = [torch.empty_like(x) for _ in range(self.size)]
            dist.all_gather(parts, x, group=self.group)
            return torch.cat(parts, dim=-1)
        stacked = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(stacked, x, group=self.group)
        return torch.cat(stacked.unbind(0), dim=-1)

    def release(self) -> None:
        """Drop the symmetric buffer (before the process group goes)."""
        self._buffer = None


def _local_world() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or 1 << 30  # unknown: treat the job as one node


@torch.library.custom_op("gptoss::all_reduce", mutates_args=())
def _all_reduce_op(x: torch.Tensor, reducer: int) -> torch.Tensor:
    return _REDUCERS[reducer].run(x)


@_all_reduce_op.register_fake
def _(x: torch.Tensor, reducer: int) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("gptoss::all_gather_last", mutates_args=())
def _all_gather_last_op(x: torch.Tensor, reducer: int) -> torch.Tensor:
    return _REDUCERS[reducer]._gather_last(x)


@_all_gather_last_op.register_fake
def _(x: torch.Tensor, reducer: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] * _REDUCERS[reducer].size))
