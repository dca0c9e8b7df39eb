"""The bf16 projections at decode sizes (a few tokens) as one Triton GEMV each.

At batch 1 a gpt-oss decode step reads its attention weights once per layer: q/k/v [5,120 x 2,880] and o
[2,880 x 4,096] in bf16, 29.5 and 23.6 MB, and the router's [32 or 128 x 2,880]. cuBLAS runs q/k/v at 69% of
the H200's copy rate, o_proj and the router as split-K GEMMs plus a reduce kernel each (docs/benchmarks.md, the
third session's batch-1 profile of the 120b: 0.98 ms of its 3.29 ms step). Here one kernel streams each weight
once: program n takes BLOCK_N output features over the whole inner dimension, for every token of the step (at
most MAX_TOKENS), accumulates in fp32 and adds the bias. Two forms, chosen by the token count: one token
multiplies and sums in registers (no tensor cores, nothing padded); 2..MAX_TOKENS tokens go through tl.dot with
the tokens padded to 16 rows (the weight tile is what costs; the padded rows' math is free beside it).

The tile is fixed per form (TILES), not autotuned: the router and, under expert parallel, attention are
replicated on every rank, and ranks whose autotuners timed their way to different tiles would add the same
products in different orders, get logits an ulp apart and pick different experts on a near-tie. A fixed tile
gives every rank the same bits (as cuBLAS does on identical GPUs), and no step pays for tuning mid-run.
`microbench --gemv` times every CANDIDATES tile at the real shapes, to choose TILES from.

Used by attention=triton's fused projections and by the fused router (runtime/kernels/router.py) when
`generation.gemv_max_tokens` > 0 (off by default until it is timed on a GPU: `python -m
runtime.kernels.microbench --gemv`). Where Triton cannot run (no GPU, and not TRITON_INTERPRET=1), and for more
tokens, F.linear.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from runtime.kernels.moe import HAVE_TRITON, triton_usable

MAX_TOKENS = 16
"""Most tokens a step may have for the GEMV (tl.dot's smallest row block)."""

Tile = tuple[int, int, int, int]
"""(BLOCK_N output features, BLOCK_K inputs per iteration, num_warps, num_stages)."""

CANDIDATES: tuple[Tile, ...] = ((16, 256, 4, 3), (16, 512, 4, 3), (32, 256, 4, 3), (32, 128, 4, 4), (16, 512, 8, 2),
                                (32, 512, 8, 3), (64, 128, 4, 3), (16, 1024, 8, 2))
"""The tiles `microbench --gemv` times (narrow output blocks, so a 2,880-wide o_proj still spreads over the SMs;
long inner blocks for wide loads); each compiles for sm_90 in both forms (tests/test_kernels.py)."""

TILES: dict[bool, Tile] = {False: (16, 512, 4, 3), True: (16, 256, 4, 3)}
"""The tile of each form (False: one token, True: tl.dot), the same on every rank; a guess until timed on a GPU."""

INTERPRETED_TILE: Tile = (16, 32, 4, 1)
"""Triton's CPU interpreter runs this small tile instead (its cost grows with the block)."""

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                     IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[M, N] = x[M, K] @ w[N, K].T (+ b[N]); program n: features [n * BLOCK_N, (n + 1) * BLOCK_N)."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        w_rows = w_ptr + n.to(tl.int64)[:, None] * K
        if DOT:  # 2..16 tokens: tensor cores, tokens padded to 16 rows
            m = tl.arange(0, 16)
            m_ok = m < M
            acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < K
                x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                if IEEE:
                    acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, tl.trans(w), acc)
            if HAS_BIAS:
                acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + m[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & n_ok[None, :])
        else:  # one token: products summed along K in registers
            acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < K
                x1 = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc1 += tl.sum(w.to(tl.float32) * x1[None, :], axis=1)
            if HAS_BIAS:
                acc1 += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + n, acc1.to(out_ptr.dtype.element_ty), mask=n_ok)


def usable(x: torch.Tensor, weight: torch.Tensor, max_tokens: int, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear` runs the Triton GEMV for this input (else it is F.linear): few enough tokens, dense weight
    and bias (the kernel indexes them as such) of x's dtype."""
    tokens = x.numel() // x.shape[-1] if x.numel() else 0
    return (0 < tokens <= min(max_tokens, MAX_TOKENS) and triton_usable(x.device) and weight.is_contiguous()
            and x.dtype == weight.dtype
            and (bias is None or (bias.is_contiguous() and bias.dtype == weight.dtype)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_tokens: int = MAX_TOKENS,
           tile: Tile | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias): x [..., K], weight [N, K], bias [N] or None; the Triton GEMV for at most
    `max_tokens` tokens (see the module doc), F.linear otherwise. `tile`: another than TILES' (microbench)."""
    if not usable(x, weight, max_tokens, bias):
        return F.linear(x, weight, bias)
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    dot = m > 1
    if os.environ.get("TRITON_INTERPRET") == "1":
        tile = INTERPRETED_TILE
    block_n, block_k, warps, stages = tile or TILES[dot]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x2, weight, bias if bias is not None else weight, out, m, n, k, x2.stride(0),
        HAS_BIAS=bias is not None, DOT=dot, IEEE=x.dtype == torch.float32, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages,
    )
    return out.view(*lead, n)
