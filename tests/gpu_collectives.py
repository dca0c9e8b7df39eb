"""Run under torchrun on GPUs (tests/test_gpu_multi.py): the forward's collectives (runtime/allreduce.py)
against NCCL, eagerly and replayed from a CUDA graph with new inputs, then their cost per call at
decode sizes (printed as `TIMING ...` lines; a record, not a check). Prints `OK` on rank 0 at the end."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from runtime import distributed

CALLS = 72  # all-reduces in one gpt-oss-120b decode step at tp=2 (two per layer)


def main() -> None:
    world, rank, local = distributed.env_world()
    layout = distributed.make_layout(world, 1, 1)
    device = distributed.resolve_device("cuda", layout)
    mode = os.environ.get("ALL_REDUCE", "one_shot")
    groups = distributed.init(layout, device, "nccl", torch.bfloat16, mode)
    red = groups.tp_reduce
    assert red.path == mode, (red.path, mode)
    from runtime.allreduce import Reducer

    red32 = Reducer(groups.tp, device, torch.float32, mode)
    gen = torch.Generator(device=device).manual_seed(1234 + rank)
    for r, dtype in ((red, torch.bfloat16), (red32, torch.float32)):
        for shape in ((1, 1, 2880), (8, 1, 2880), (64, 1, 2880), (1, 1024, 2880), (3, 7)):
            x = torch.randn(shape, device=device, dtype=dtype, generator=gen)
            want = x.float().clone()
            dist.all_reduce(want, group=groups.tp)
            got = r(x)
            assert got.shape == x.shape and got.dtype == dtype
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
            err = ((got.float() - want).norm() / want.norm()).item()
            assert err <= tol, (shape, dtype, err)
        # captured in a CUDA graph, replayed on new inputs (the decode step's use)
        static = torch.zeros(8, 1, 2880, device=device, dtype=dtype)
        r(static)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = r(r(static) * 0.5)
        for _ in range(3):
            static.copy_(torch.randn(static.shape, device=device, dtype=dtype, generator=gen))
            want = static.float().clone()
            dist.all_reduce(want, group=groups.tp)
            want = want.to(dtype).float() * 0.5
            want = want.to(dtype).float()
            dist.all_reduce(want, group=groups.tp)
            graph.replay()
            err = ((out.float() - want).norm() / want.norm()).item()
            assert err <= (2e-2 if dtype == torch.bfloat16 else 1e-5), (dtype, err)
        del graph
    # vocab-parallel logits: gathered in group-rank order along the last dimension
    part = torch.full((2, 3), float(rank), device=device, dtype=torch.bfloat16)
    whole = red.gather_last(part)
    assert whole.shape == (2, 3 * world) and whole[0].tolist() == [float(r) for r in range(world) for _ in range(3)]

    # cost per call at decode sizes: CALLS chained all-reduces in one graph, replayed
    for batch in (1, 8, 64):
        x = torch.randn(batch, 1, 2880, device=device, dtype=torch.bfloat16, generator=gen)

        def chain(fn):  # noqa: ANN001, ANN202
            y = x
            for _ in range(CALLS):
                y = fn(y) * 0.5
            return y

        times = {}
        for name, fn in (("ours", red), ("nccl", _nccl(groups.tp))):
            chain(fn)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                chain(fn)
            for _ in range(3):
                g.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                g.replay()
            end.record()
            end.synchronize()
            times[name] = start.elapsed_time(end) / 20 / CALLS * 1e3
            del g
        if rank == 0:
            print(f"TIMING batch={batch} path={red.path} us_per_call ours={times['ours']:.2f} "
                  f"nccl={times['nccl']:.2f} (each with a scale kernel)", flush=True)
    groups.release()
    distributed.shutdown()
    if rank == 0:
        print("OK", flush=True)
    distributed.finish(0)


def _nccl(group):  # noqa: ANN001, ANN202
    def reduce(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    return reduce


if __name__ == "__main__":
    main()
