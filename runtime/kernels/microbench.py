"""Time one MoE layer of gpt-oss-20b (32 experts, 2880 x 2880, top-4, bf16) on the GPU: our Triton
kernel against transformers' grouped_mm, each replayed from a CUDA graph as in the decode loop, with
the bytes each must read and the bandwidth reached.

    python -m runtime.kernels.microbench [--tokens 1 8 64 1024]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    import triton.testing
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from runtime import kernels

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 1024])
    args = ap.parse_args()
    kernels.register()
    cfg = GptOssConfig(num_local_experts=32, num_experts_per_tok=4)
    ex = GptOssExperts(cfg).cuda().bfloat16()
    for p in ex.parameters():
        p.data.normal_(0, 0.02)
    e, h, i, k = 32, cfg.hidden_size, cfg.intermediate_size, 4
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    copy_bw = 2 * src.numel() / copy_ms / 1e6
    print(f"copy bandwidth {copy_bw:.0f} GB/s")
    print(f"{'tokens':>6} {'impl':>10} {'ms':>8} {'GB read':>8} {'GB/s':>8} {'of copy':>8}")
    for t in args.tokens:
        x = torch.randn(t, h, device="cuda").bfloat16()
        idx = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(t)])
        w = torch.softmax(torch.randn(t, k, device="cuda"), -1).bfloat16()
        active = idx.unique().numel()
        nbytes = active * (3 * h * i + 2 * i + h) * 2
        for impl in ("triton", "grouped_mm"):
            cfg._experts_implementation = impl
            ex(x, idx, w)  # compile / autotune outside the graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # as in the decode loop: no launch overhead in the timing
                ex(x, idx, w)
            ms = triton.testing.do_bench(graph.replay, return_mode="median")
            gbs = nbytes / ms / 1e6
            print(f"{t:>6} {impl:>10} {ms:8.3f} {nbytes / 1e9:8.3f} {gbs:8.0f} {gbs / copy_bw:8.1%}")


if __name__ == "__main__":
    main()
