"""Distributed setup in one place: the world layout (dp x ep x tp over ranks), its validation, the
process groups, and the few collectives the rest of the runtime uses.

Everything here is a no-op in a single process, so `python -m runtime.generate` needs no torchrun.
Rank order is dp-major, then ep, then tp: the ranks of one tensor-parallel group are neighbours
(on one node when tp_size <= GPUs per node), which is where the most traffic flows.
"""

from __future__ import annotations

from runtime.errors import UserError, exit_on_user_error

import logging
import os
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_control: Any = None
"""Every rank in one gloo group (made by `init`): the host objects and flags the scheduler, the offline queue and
the entries exchange (plans, finished records, stop votes) travel on it, so they never wait for a GPU stream.
On NCCL they would: a collective of host objects on the default group copies through the device, and its
receive waits for everything queued before it, which undoes async scheduling's overlap."""


class LayoutError(UserError):
    """The parallel configuration cannot run on this world or this model; the message names the fix."""


@dataclass(frozen=True)
class WorldLayout:
    """Where this rank sits: world rank and its coordinates in the (dp, ep, tp) grid."""

    world_size: int
    rank: int
    local_rank: int
    tp_size: int
    ep_size: int
    dp_size: int

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def ep_rank(self) -> int:
        return (self.rank // self.tp_size) % self.ep_size

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp_size * self.ep_size)

    @property
    def mp_size(self) -> int:
        """Ranks holding one model replica (tp * ep)."""
        return self.tp_size * self.ep_size

    @property
    def is_replica_leader(self) -> bool:
        """The one rank per replica that reports its results."""
        return self.rank % self.mp_size == 0

    @property
    def is_writer(self) -> bool:
        """The one rank that speaks and writes files."""
        return self.rank == 0

    def describe(self) -> dict[str, int]:
        return {"world_size": self.world_size, "tp_size": self.tp_size, "ep_size": self.ep_size, "dp_size": self.dp_size}


def env_world() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from torchrun's / Slurm's environment; (1, 0, 0) outside it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return world_size, rank, local_rank


def make_layout(tp_size: int, ep_size: int, dp_size: int, world: tuple[int, int, int] | None = None) -> WorldLayout:
    """Validate the degrees against the world size; every factor is named in the message."""
    world_size, rank, local_rank = world or env_world()
    for name, value in (("tp_size", tp_size), ("ep_size", ep_size), ("dp_size", dp_size)):
        if value < 1:
            raise LayoutError(f"parallel.{name}={value} must be >= 1")
    if tp_size * ep_size * dp_size != world_size:
        hint = (
            f"launch {tp_size * ep_size * dp_size} processes (torchrun --nproc_per_node=...)"
            if world_size == 1
            else f"choose sizes whose product is {world_size}, e.g. parallel.tp_size={world_size}"
        )
        raise LayoutError(
            f"tp({tp_size}) * ep({ep_size}) * dp({dp_size}) = {tp_size * ep_size * dp_size} != world size "
            f"{world_size}: {hint}"
        )
    return WorldLayout(world_size, rank, local_rank, tp_size, ep_size, dp_size)


def validate_for_model(layout: WorldLayout, hf_config: Any) -> None:
    """Checks that need the model's shape (config.json) but no weights."""
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    experts, inter = hf_config.num_local_experts, hf_config.intermediate_size
    tp, ep = layout.tp_size, layout.ep_size
    if heads % tp or kv_heads % tp:
        ok = [d for d in range(1, kv_heads + 1) if kv_heads % d == 0 and heads % d == 0]
        raise LayoutError(
            f"parallel.tp_size={tp} must divide the {kv_heads} KV heads and {heads} query heads of "
            f"{hf_config.model_type}: use one of {ok} (and ep_size/dp_size for the other ranks)"
        )
    if experts % ep:
        ok = [d for d in range(1, experts + 1) if experts % d == 0]
        raise LayoutError(f"parallel.ep_size={ep} must divide the {experts} experts: use one of {ok}")
    if inter % tp:
        raise LayoutError(f"parallel.tp_size={tp} must divide the expert hidden size {inter}")


def resolve_device(device: str, layout: WorldLayout) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise LayoutError("model.device=cuda but no CUDA GPU is visible: use model.device=cpu")
        torch.cuda.set_device(layout.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if device != "cpu":
        raise LayoutError(f"model.device={device!r}: use cuda, cpu or auto")
    return torch.device("cpu")


@dataclass
class Groups:
    """Process groups of this rank; None where the group has one member (no communication)."""

    tp: Any = None
    """The tp_size ranks sharing attention heads."""
    mp: Any = None
    """The tp*ep ranks of one model replica (MoE outputs, vocab slices and sampled tokens are combined here)."""
    tp_reduce: Any = None
    """The forward's sum over `tp` (runtime.allreduce.Reducer); None with one member."""
    mp_reduce: Any = None
    """The forward's sum and logits gather over `mp` (runtime.allreduce.Reducer); None with one member."""

    def paths(self) -> str:
        """How the forward's sums travel (one_shot / nccl / gloo, joined by /); `none` in one process."""
        return "/".join(sorted({r.path for r in (self.tp_reduce, self.mp_reduce) if r is not None})) or "none"

    def release(self) -> None:
        """Drop the reducers' peer-memory buffers (before the process group is destroyed)."""
        for r in (self.tp_reduce, self.mp_reduce):
            if r is not None:
                r.release()


def init(layout: WorldLayout, device: torch.device, backend: str = "auto", dtype: torch.dtype = torch.float32,
         all_reduce: str = "auto") -> Groups:
    """Create the default process group, this rank's sub-groups and their forward collectives
    (collective on every rank). `all_reduce`: auto | one_shot | nccl (runtime/allreduce.py)."""
    from runtime.allreduce import MODES, Reducer

    if all_reduce not in MODES:
        raise LayoutError(f"parallel.all_reduce={all_reduce!r}: use one of {list(MODES)}")
    if backend not in ("auto", "nccl", "gloo"):
        raise LayoutError(f"parallel.backend={backend!r}: use auto, nccl or gloo")
    if layout.world_size == 1:
        return Groups()
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=layout.rank,
            world_size=layout.world_size,
            timeout=timedelta(minutes=30),
            device_id=device if device.type == "cuda" else None,
        )
    global _control
    _control = dist.new_group(backend="gloo", timeout=timedelta(minutes=30))  # collective, like the ones below
    groups = Groups()
    tp, mp = layout.tp_size, layout.mp_size
    # new_group is collective: every rank creates every group, in the same order.
    for start in range(0, layout.world_size, tp):
        g = dist.new_group(list(range(start, start + tp))) if tp > 1 else None
        if start <= layout.rank < start + tp:
            groups.tp = g
    for start in range(0, layout.world_size, mp):
        g = dist.new_group(list(range(start, start + mp))) if mp > 1 else None
        if start <= layout.rank < start + mp:
            groups.mp = g
    if all_reduce == "one_shot" and device.type != "cuda":
        raise LayoutError("parallel.all_reduce=one_shot needs GPUs (NVLink peer memory): use auto or nccl")
    # symmetric-memory rendezvous is collective too: tp groups first, then mp groups, on every rank
    if groups.tp is not None:
        groups.tp_reduce = Reducer(groups.tp, device, dtype, all_reduce)
    if groups.mp is not None:
        groups.mp_reduce = Reducer(groups.mp, device, dtype, all_reduce)
    if layout.is_writer and groups.paths() != "none":
        log.info("forward collectives: %s (parallel.all_reduce=%s)", groups.paths(), all_reduce)
    return groups


def broadcast_from_leader_(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Make every rank of `group` hold the group leader's tensor (no-op for None)."""
    if group is not None:
        dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)
    return tensor


def gather_to_writer(obj: Any, layout: WorldLayout) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on the writer rank; None elsewhere."""
    if layout.world_size == 1:
        return [obj]
    out: list[Any] | None = [None] * layout.world_size if layout.is_writer else None
    dist.gather_object(obj, out, dst=0, group=_control)
    return out


def broadcast_object(obj: Any, layout: WorldLayout) -> Any:
    """The writer's `obj` on every rank."""
    if layout.world_size == 1:
        return obj
    box = [obj if layout.is_writer else None]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def any_rank(flag: bool, layout: WorldLayout) -> bool:
    """True on every rank if `flag` is true on any rank."""
    if layout.world_size == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return bool(t.item())


TEARDOWN_SECONDS = 60.0
"""How long `shutdown` waits for NCCL's teardown before it leaves it to the process exit."""


def shutdown() -> None:
    """Wait for every rank, then release the process group (NCCL); gloo's is left to `finish`.

    Callers free every CUDA graph first: a graph that captured NCCL collectives, still alive when the
    communicator is destroyed, makes `destroy_process_group` wait forever (pytorch/pytorch#115388; it
    hung every multi-GPU job after its last line). The destroy also runs under a deadline, so a teardown
    that hangs for any other reason costs TEARDOWN_SECONDS and a warning, not the job's time limit."""
    if not dist.is_initialized():
        return
    dist.barrier()
    if dist.get_backend() != "nccl":
        return
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    done = threading.Event()

    def destroy() -> None:
        global _control
        try:
            _control = None  # destroyed with the rest
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - the results are written; say so and leave
            log.warning("NCCL teardown failed: %s", e)
        finally:
            done.set()

    threading.Thread(target=destroy, name="nccl-teardown", daemon=True).start()
    if not done.wait(TEARDOWN_SECONDS):
        log.warning("NCCL teardown did not finish in %.0f s: exiting without it (results are written)",
                    TEARDOWN_SECONDS)


def finish(code: int = 0) -> None:
    """End an entry point. Under torchrun the process leaves with os._exit once its output is flushed:
    gloo's threads can otherwise abort the interpreter's teardown ("terminate called without an active
    exception"), turning a finished run into a failed one."""
    if env_world()[0] > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


def run_entry(body: Callable[[], Any], log: logging.Logger) -> None:
    """An entry point's body, then `finish` with its exit code: 0, a UserError's 2 (one `error:` line), a
    sys.exit code, or 1 after an uncaught exception's traceback. Under torchrun every way out goes through
    os._exit, so a process group or CUDA graph still alive after a failure cannot hang the interpreter's
    teardown (the job must end, not hold its nodes)."""
    code: int = 0
    try:
        with exit_on_user_error(log):
            body()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported, then the process leaves with 1
        log.exception("failed")
        code = 1
    finish(code)


def silence_non_writers(layout: WorldLayout) -> None:
    """Rank 0 speaks; the others log only warnings and errors."""
    level = logging.INFO if layout.is_writer else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank{layout.rank}] %(asctime)s %(name)s: %(message)s", force=True)
    if not layout.is_writer:
        import transformers

        transformers.logging.set_verbosity_error()


__all__ = [
    "Groups",
    "LayoutError",
    "WorldLayout",
    "any_rank",
    "broadcast_from_leader_",
    "broadcast_object",
    "env_world",
    "finish",
    "gather_to_writer",
    "init",
    "make_layout",
    "resolve_device",
    "shutdown",
    "run_entry",
    "silence_non_writers",
    "validate_for_model",
]
