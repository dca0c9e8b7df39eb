"""Time one MoE layer of gpt-oss (2880 x 2880 experts, top-4) on the GPU, each implementation replayed
from a CUDA graph as in the decode loop, with the bytes each must read and the bandwidth reached.

bf16 (default): our Triton kernel against transformers' grouped_mm on bf16 weights.
--format mxfp4: our MXFP4 kernel on 4-bit experts against our bf16 Triton kernel on the same weights
dequantized (what every other implementation holds), bytes counted as each holds them (4.25 vs 16 bits).

    python -m runtime.kernels.microbench [--tokens 1 8 64 1024] [--format bf16|mxfp4] [--experts 32|128]
        [--decode-max-pairs N] [--block-m N] [--configs] [--bf16-dequant-max-m N]
        [--gemv-pairs-per-expert N] [--reg-a | --no-reg-a] [--one-stage] [--only mxfp4] [--kernels]

--configs (mxfp4): after each token count, every autotuned tile of the MXFP4 kernels that ran with its time (the
GEMVs' tiles with and without PREFETCH, the blocks' with and without ONE_STAGE).
--kernels: after each result, the GPU time of each kernel in one replay (torch.profiler over 20 replays): what the
layer's kernels take without the replay's own launch cost, as they run inside a decode step's graph.

--flash: instead, decode attention over the paged cache at gpt-oss's shapes (64 query heads, 8 KV heads, head size
64; a full layer and a 128-token window) with the split-K parts merged by torch and in the kernel
(flash.MERGE_IN_KERNEL), at each token count as the batch, and with --split-keys at each least number of keys a
split (flash.SPLIT_KEYS: fewer keys, more programs at batch 1):

    python -m runtime.kernels.microbench --flash --tokens 1 8 16 --split-keys 64 128 256

--router: instead, the MoE router at decode (2880 inputs, 128 and 32 experts, top-4): cuBLAS's GEMM then the top-k
kernel against the GEMV and top-k in one launch (router.GEMV_MAX_TOKENS), at each token count:

    python -m runtime.kernels.microbench --router --tokens 1 2 4 8 16
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch


def _copy_bandwidth() -> float:
    """GB/s of a 256 MiB device-to-device copy (read + write), the bound each result is given as a share of."""
    import triton.testing

    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") / 1e6


def _graphed(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """fn captured as a CUDA graph (compiled / autotuned first, outside the capture)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # as in the decode loop: no launch overhead in the timing
        fn()
    return graph.replay


def _kernel_times(replay: Callable[[], None], replays: int = 20) -> dict[str, float]:
    """GPU microseconds per replay of each kernel a graph launches (torch.profiler over `replays` replays), longest
    first."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            replay()
        torch.cuda.synchronize()
    times = {e.key: e.self_device_time_total / replays for e in prof.key_averages() if e.self_device_time_total > 0}
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def main() -> None:
    import triton.testing
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from runtime import checkpoint, kernels
    from runtime.kernels import moe, moe_mxfp4
    from runtime.roofline import MXFP4_BYTES_PER_PARAM

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 1024])
    ap.add_argument("--format", choices=["bf16", "mxfp4"], default="bf16")
    ap.add_argument("--experts", type=int, default=32, help="experts per layer: 32 (20b) or 128 (120b)")
    ap.add_argument("--decode-max-pairs", type=int, default=None,
                    help="mxfp4: use the GEMV launch up to this many (token, expert) pairs (tuning)")
    ap.add_argument("--block-m", type=int, default=None, help="mxfp4: pairs per block (default: moe_mxfp4.plan)")
    ap.add_argument("--configs", action="store_true", help="mxfp4: print each autotuned tile's time")
    ap.add_argument("--reg-a", action=argparse.BooleanOptionalAction, default=None,
                    help="mxfp4: the blocks with the weights as the register operand, or not (REG_A_BLOCKS: on)")
    ap.add_argument("--one-stage", action="store_true",
                    help="mxfp4: the register-operand blocks' autotuner also tries unpipelined tiles (ONE_STAGE_BLOCKS)")
    ap.add_argument("--bf16-dequant-max-m", type=int, default=None,
                    help="mxfp4: blocks of at most this many pairs dequantize straight to bf16 (BF16_DEQUANT_MAX_M)")
    ap.add_argument("--gemv-pairs-per-expert", type=int, default=None,
                    help="mxfp4: the pairs GEMV up to this many pairs per expert on average, any number of experts "
                         "(GEMV_PAIRS_PER_EXPERT; 0: off)")
    ap.add_argument("--kernels", action="store_true", help="each kernel's GPU time in one replay (torch.profiler)")
    ap.add_argument("--only", default=None, help="time only this implementation (e.g. mxfp4: no bf16 copy is made)")
    ap.add_argument("--flash", action="store_true", help="time decode attention's split merge, torch vs in the kernel")
    ap.add_argument("--split-keys", type=int, nargs="+", default=None,
                    help="--flash: each of these least keys per split in turn (flash.SPLIT_KEYS)")
    ap.add_argument("--router", action="store_true", help="time the decode router: cuBLAS + top-k vs one launch")
    args = ap.parse_args()
    if args.router:
        return router_bench(args.tokens)
    if args.flash:
        from runtime.kernels import flash

        for keys in args.split_keys or [flash.SPLIT_KEYS]:
            flash.SPLIT_KEYS = keys
            print(f"flash.SPLIT_KEYS = {keys}")
            flash_bench(args.tokens)
        return None
    if args.reg_a is None and args.bf16_dequant_max_m is not None:
        args.reg_a = False  # a variant of the plain blocks (the register-operand blocks always dequantize to bf16)
        print("(--bf16-dequant-max-m times the plain blocks: --no-reg-a implied)")
    if args.reg_a is not None:
        moe_mxfp4.REG_A_BLOCKS = args.reg_a
    if args.one_stage:
        moe_mxfp4.ONE_STAGE_BLOCKS = True
    if args.gemv_pairs_per_expert is not None:
        moe_mxfp4.GEMV_PAIRS_PER_EXPERT = args.gemv_pairs_per_expert
        moe_mxfp4.GEMV_PAIRS_MIN_EXPERTS = 0  # on any number of experts
    if args.bf16_dequant_max_m is not None:
        moe_mxfp4.BF16_DEQUANT_MAX_M = args.bf16_dequant_max_m
    if args.decode_max_pairs is not None:
        moe_mxfp4.DECODE_MAX_PAIRS = args.decode_max_pairs
    kernels.register()
    e, k = args.experts, 4
    cfg = GptOssConfig(num_local_experts=e, num_experts_per_tok=k)
    h, i = cfg.hidden_size, cfg.intermediate_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.format == "mxfp4":
        blocks_scales = {
            "gu": (torch.randint(0, 256, (e, 2 * i, h // 32, 16), dtype=torch.uint8, device="cuda", generator=gen),
                   torch.randint(118, 126, (e, 2 * i, h // 32), dtype=torch.uint8, device="cuda", generator=gen)),
            "dn": (torch.randint(0, 256, (e, h, i // 32, 16), dtype=torch.uint8, device="cuda", generator=gen),
                   torch.randint(118, 126, (e, h, i // 32), dtype=torch.uint8, device="cuda", generator=gen)),
        }
        gb = (torch.randn(e, 2 * i, device="cuda", generator=gen) * 0.02).bfloat16()
        db = (torch.randn(e, h, device="cuda", generator=gen) * 0.02).bfloat16()
        impls = {
            "mxfp4": (lambda x, idx, w: moe_mxfp4.fused_mxfp4_experts(x, idx, w, *blocks_scales["gu"], gb,
                                                                       *blocks_scales["dn"], db,
                                                                       block_m=args.block_m),
                      MXFP4_BYTES_PER_PARAM),
        }
        if args.only in (None, "triton-bf16"):  # the same weights dequantized, in transformers' layout
            gu, dn = (checkpoint.dequantize_mxfp4(*blocks_scales[n], torch.bfloat16).transpose(1, 2).contiguous()
                      for n in ("gu", "dn"))
            impls["triton-bf16"] = (lambda x, idx, w: moe.fused_experts(x, idx, w, gu, gb, dn, db), 2.0)
    else:
        ex = GptOssExperts(cfg).cuda().bfloat16()
        for p in ex.parameters():
            p.data.normal_(0, 0.02)

        def run_with(impl: str) -> Callable:
            def fn(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                cfg._experts_implementation = impl
                return ex(x, idx, w)
            return fn

        impls = {impl: (run_with(impl), 2.0) for impl in ("triton", "grouped_mm")}
    if args.only is not None:
        if args.only not in impls:
            raise SystemExit(f"--only {args.only}: one of mxfp4, triton-bf16 (--format mxfp4) or triton, grouped_mm")
        impls = {args.only: impls[args.only]}
    copy_bw = _copy_bandwidth()
    print(f"{args.format} experts={e} H={h} I={i} top-{k}; copy bandwidth {copy_bw:.0f} GB/s")
    print(f"{'tokens':>6} {'impl':>12} {'ms':>8} {'GB read':>8} {'GB/s':>8} {'of copy':>8}")
    for t in args.tokens:
        x = torch.randn(t, h, device="cuda").bfloat16()
        idx = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(t)])
        w = torch.softmax(torch.randn(t, k, device="cuda"), -1).bfloat16()
        active = idx.unique().numel()
        ref = (moe_mxfp4.reference_mxfp4_experts(x, idx, w, *blocks_scales["gu"], gb, *blocks_scales["dn"], db).float()
               if args.format == "mxfp4" else None)  # (a fast wrong tile must show)
        for name, (fn, weight_bytes) in impls.items():
            nbytes = active * (3 * h * i * weight_bytes + (2 * i + h) * 2)
            replay = _graphed(lambda fn=fn: fn(x, idx, w))
            ms = triton.testing.do_bench(replay, return_mode="median")
            gbs = nbytes / ms / 1e6
            err = ""
            if ref is not None:
                out = fn(x, idx, w).float()
                err = f" rel.err {((out - ref).norm() / ref.norm()).item():.1e}"
            print(f"{t:>6} {name:>12} {ms:8.3f} {nbytes / 1e9:8.3f} {gbs:8.0f} {gbs / copy_bw:8.1%}{err}")
            if args.kernels:
                for kernel, us in _kernel_times(replay).items():
                    print(f"{'':>6} {kernel[:40]:>40} {us:8.1f} us")
        if args.configs and args.format == "mxfp4":
            for kernel in (moe_mxfp4._gate_up_decode, moe_mxfp4._down_decode, moe_mxfp4._gate_up_blocks,
                           moe_mxfp4._down_blocks, moe_mxfp4._gate_up_reg_blocks, moe_mxfp4._down_reg_blocks):
                timings = getattr(kernel, "configs_timings", None) or {}  # the last autotuning run's (this t's)
                first = lambda v: v[0] if isinstance(v, (list, tuple)) else v  # noqa: E731
                for cfg, v in sorted(timings.items(), key=lambda kv: first(kv[1])):
                    print(f"{'':>6} {kernel.fn.__name__:>16} {first(v):8.3f} ms  {cfg}")


def flash_bench(batches: list[int], context: int = 1152) -> None:
    """Decode attention (one query per row, `context` cached positions) with the split-K merge in torch and in the
    kernel, each replayed from a CUDA graph; the merged outputs' difference. Only calls that split (a full layer,
    at most ~132 rows x KV heads) have a merge to compare."""
    import triton.testing

    from runtime.kernels import arrivals, flash
    from runtime.kvcache import BLOCK_SIZE

    hq, hkv, d = 64, 8, 64
    device = torch.device("cuda", torch.cuda.current_device())
    arrivals.prepare(device)
    print(f"decode attention, {hq} query / {hkv} KV heads, head size {d}, {context} cached positions")
    print(f"{'batch':>6} {'window':>7} {'splits':>7} {'torch merge us':>15} {'kernel merge us':>16} {'max diff':>9}")
    for b in batches:
        m = -(-context // BLOCK_SIZE)
        blocks = b * m + 1
        k_pool, v_pool = (torch.randn(blocks, hkv, BLOCK_SIZE, d, device=device).bfloat16() for _ in range(2))
        table = (torch.randperm(blocks - 1, device=device)[: b * m].view(b, m) + 1).int()
        mask = flash.PagedMask(table, torch.full((b, 1), context - 1, device=device))
        q = torch.randn(b, 1, hq, d, device=device).bfloat16().transpose(1, 2)
        sinks = torch.randn(hq, device=device).bfloat16()
        for window in (None, 128):
            splits = flash.decode_splits(device, b, hkv, 1, context, window)
            if splits == 1:
                print(f"{b:>6} {window or 'full':>7} {splits:>7} {'(no split: nothing to merge)':>42}")
                continue
            times, outs, saved = [], [], flash.MERGE_IN_KERNEL
            for merge in (False, True):
                flash.MERGE_IN_KERNEL = merge
                fn = lambda window=window: flash.flash_attention(q, k_pool, v_pool, sinks, mask, 0.125, window)  # noqa: E731
                outs.append(fn().float())
                times.append(1e3 * triton.testing.do_bench(_graphed(fn), return_mode="median"))
            flash.MERGE_IN_KERNEL = saved
            diff = (outs[0] - outs[1]).abs().max().item()
            print(f"{b:>6} {window or 'full':>7} {splits:>7} {times[0]:15.2f} {times[1]:16.2f} {diff:9.1e}")


def router_bench(tokens: list[int]) -> None:
    """The router at decode (x [T, 2880] bf16, top-4) through cuBLAS's GEMM and the top-k kernel, and in one launch
    (router.route_gemv) with 1, 2 and 4 experts a program (router.EXPERTS_PER_PROGRAM), each replayed from a CUDA
    graph; whether their expert ids agree."""
    import triton.testing

    from runtime.kernels import arrivals, router

    device = torch.device("cuda", torch.cuda.current_device())
    arrivals.prepare(device)
    per_program = (1, 2, 4)
    print(f"{'experts':>8} {'tokens':>7} {'cuBLAS + top-k us':>18} "
          + " ".join(f"{f'one launch, {n} a program':>24}" for n in per_program) + f" {'same ids':>9}")
    for experts in (128, 32):
        w = (torch.randn(experts, 2880, device=device) / 50).bfloat16()
        b = torch.randn(experts, device=device).bfloat16()
        for t in tokens:
            x = torch.randn(t, 2880, device=device).bfloat16()
            times, ids, saved = [], [], (router.GEMV_MAX_TOKENS, router.EXPERTS_PER_PROGRAM)
            for n in (0, *per_program):  # 0: cuBLAS + the top-k kernel
                router.GEMV_MAX_TOKENS, router.EXPERTS_PER_PROGRAM = (t if n else 0), (n or saved[1])
                ids.append(router.route(x, w, b, 4)[2])
                times.append(1e3 * triton.testing.do_bench(_graphed(lambda: router.route(x, w, b, 4)),
                                                           return_mode="median"))
            router.GEMV_MAX_TOKENS, router.EXPERTS_PER_PROGRAM = saved
            same = all(torch.equal(ids[0], i) for i in ids[1:])
            print(f"{experts:>8} {t:>7} {times[0]:18.2f} " + " ".join(f"{us:24.2f}" for us in times[1:])
                  + f" {str(same):>9}")


if __name__ == "__main__":
    main()
