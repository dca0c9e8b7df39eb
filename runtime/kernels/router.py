"""The MoE router at decode: its logits, top-k and softmax in one Triton kernel.

transformers' GptOssTopKRouter runs the router GEMM, then a sort-based topk (two kernels) and a softmax. Here, up to
GEMV_MAX_TOKENS tokens, one launch does it all: each program computes the logits of EXPERTS_PER_PROGRAM experts for
one token (a GEMV: the weight is 0.7 MB on the 120b, so many programs read it at once), stores them, and counts
itself in on the token's arrival counter (runtime/kernels/arrivals.py); the token's last program reads its logits
back and takes their top-k and softmax in registers. On the H200 the 120b's batch-1 step spent 158 us in cuBLAS's
split-K router GEMVs, ~66 us in their reduces and 55 us in the top-k kernel (36 layers, three launches each;
docs/benchmarks.md, tenth session). Beyond GEMV_MAX_TOKENS (prefills, big decode steps) the GEMM stays cuBLAS's
(F.linear) and one program per token takes the top-k and softmax: one launch instead of transformers' top-k (a sort
of each row's results after a gather, two kernels), its softmax and their copies. Same function either way:
top-k by value of the logits in the model dtype (ties go to the lower expert id, in descending order), the scores
are the softmax of the top-k logits in the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.kernels import arrivals
from runtime.kernels.moe import HAVE_TRITON, triton_usable

GEMV_MAX_TOKENS = 16
"""Up to this many tokens the router's GEMV runs in the same kernel as its top-k (route_gemv); 0: never. Each
token's programs read the whole weight, so beyond a few tokens cuBLAS's GEMM reads it once for all of them. On the
H200 (microbench --router, docs/benchmarks.md, twelfth session) one launch with 4 experts a program took 8.6 / 9.3 /
12.0 us at 1 / 8 / 16 tokens on the 120b's router against 11.0 / 12.2 / 12.6 for cuBLAS + the top-k kernel; with 2
experts a program up to 8 tokens, the 120b's batch-1 TPOT went from 3.02 to 2.92 ms."""
EXPERTS_PER_PROGRAM = 4
"""Experts whose logits one program of route_gemv computes (32 programs a token on the 120b's 128 experts). Each
program reads its rows whole in one pass (up to 4,096 inputs: gpt-oss has 2,880), so a token's logits wait for one
trip to memory; microbench --router times 1, 2 and 4 (4 was fastest at every token count from 1 to 16, on 32 and
128 experts)."""

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _store_topk_softmax(v, e, scores_ptr, idx_ptr, t, BLOCK_E: tl.constexpr, TOP_K: tl.constexpr,
                            BLOCK_K: tl.constexpr):
        """Logits v [BLOCK_E] of token t (fp32, -inf past the experts) -> the softmax scores and expert ids of their
        top-k, stored in row t: repeated arg-max, highest first, ties to the lower id."""
        k = tl.arange(0, BLOCK_K)
        top_v = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
        top_i = tl.zeros([BLOCK_K], dtype=tl.int32)
        for j in tl.static_range(TOP_K):
            m = tl.max(v, axis=0)
            i = tl.min(tl.where(v == m, e, BLOCK_E), axis=0)
            top_v = tl.where(k == j, m, top_v)
            top_i = tl.where(k == j, i, top_i)
            v = tl.where(e == i, float("-inf"), v)
        p = tl.exp(top_v - tl.max(top_v, axis=0))
        tl.store(scores_ptr + t * TOP_K + k, (p / tl.sum(p, axis=0)).to(scores_ptr.dtype.element_ty), mask=k < TOP_K)
        tl.store(idx_ptr + t * TOP_K + k, top_i.to(tl.int64), mask=k < TOP_K)

    @triton.jit
    def _topk_softmax_kernel(logits_ptr, scores_ptr, idx_ptr, E, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, BLOCK_E)
        v = tl.load(logits_ptr + t * E + e, mask=e < E, other=float("-inf")).to(tl.float32)
        _store_topk_softmax(v, e, scores_ptr, idx_ptr, t, BLOCK_E, TOP_K, BLOCK_K)

    @triton.jit
    def _route_gemv_kernel(x_ptr, w_ptr, b_ptr, logits_ptr, scores_ptr, idx_ptr, cnt_ptr, H, E,
                           TOP_K: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        """Program (token t, part): logits of experts part * ROWS ... for token t; the token's last program to
        arrive takes the top-k of all E (read back in the model dtype, as F.linear would give them)."""
        t = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        rows_ok = rows < E
        acc = tl.zeros([ROWS, BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            x = tl.load(x_ptr + t * H + h, mask=h < H, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * H + h[None, :], mask=rows_ok[:, None] & (h < H)[None, :],
                        other=0.0).to(tl.float32)
            acc += w * x[None, :]
        logit = tl.sum(acc, axis=1) + tl.load(b_ptr + rows, mask=rows_ok, other=0.0).to(tl.float32)
        tl.store(logits_ptr + t * E + rows, logit.to(logits_ptr.dtype.element_ty), mask=rows_ok)
        tl.debug_barrier()  # every thread's stores before the release
        if tl.atomic_add(cnt_ptr + t, 1, sem="acq_rel", scope="gpu") == tl.num_programs(1) - 1:
            tl.debug_barrier()
            e = tl.arange(0, BLOCK_E)
            v = tl.load(logits_ptr + t * E + e, mask=e < E, other=float("-inf"), cache_modifier=".cg").to(tl.float32)
            _store_topk_softmax(v, e, scores_ptr, idx_ptr, t, BLOCK_E, TOP_K, BLOCK_K)
            tl.atomic_xchg(cnt_ptr + t, 0)  # ready for the next call


def _top_k_outputs(x: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k kernels' outputs for x's tokens: scores [T, k] in x's dtype, expert ids [T, k]."""
    return (torch.empty((x.shape[0], top_k), dtype=x.dtype, device=x.device),
            torch.empty((x.shape[0], top_k), dtype=torch.long, device=x.device))


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], weight [E, H], bias [E] -> (logits [T, E], scores [T, k], expert ids [T, k]): route_gemv up to
    GEMV_MAX_TOKENS tokens (when the arrival counters exist), else cuBLAS's GEMM and the top-k kernel."""
    t, e = x.shape[0], weight.shape[0]
    counters = arrivals.table(x.device, "router") if t <= min(GEMV_MAX_TOKENS, arrivals.SLOTS) else None
    if counters is not None:
        return route_gemv(x, weight, bias, top_k, counters)
    logits = F.linear(x, weight, bias)  # [T, E], in the model dtype
    scores, idx = _top_k_outputs(x, top_k)
    _topk_softmax_kernel[(t,)](logits, scores, idx, e, TOP_K=top_k, BLOCK_E=triton.next_power_of_2(e),
                               BLOCK_K=triton.next_power_of_2(top_k), num_warps=1)
    return logits, scores, idx


def route_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, counters: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """route() in one launch: the GEMV's programs, then each token's last one takes the top-k (counters: the
    router's arrival counters, zero, at least T of them)."""
    t, h = x.shape
    e = weight.shape[0]
    assert counters.numel() >= t, (counters.numel(), t)
    logits = torch.empty((t, e), dtype=x.dtype, device=x.device)
    scores, idx = _top_k_outputs(x, top_k)
    rows = triton.next_power_of_2(min(EXPERTS_PER_PROGRAM, e))  # (a power of two: tl.arange)
    block_h = triton.next_power_of_2(h) if h <= 4096 else 1024  # (one pass over the inputs where they fit)
    _route_gemv_kernel[(t, triton.cdiv(e, rows))](
        x.contiguous(), weight.contiguous(), bias, logits, scores, idx, counters, h, e, TOP_K=top_k, ROWS=rows,
        BLOCK_H=block_h, BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(top_k),
        num_warps=8 if rows * block_h >= 8192 else 4)
    return logits, scores, idx


class FusedRouterForward:
    """Mixed into transformers' GptOssTopKRouter by runtime.fused: same module, same parameters, `route` wherever
    Triton runs.

    `rows_in_use` (set by the continuous batcher around its decode step, else None): a bool tensor whose first T
    entries say which of the step's T tokens belong to a sequence. The others (free rows of a step size bigger
    than the running sequences) are routed to expert id `num_experts` with weight 0, which the experts kernels
    skip (as they skip another rank's experts): a step of 100 sequences in a 512-row step pays the experts for 100.
    """

    rows_in_use: torch.Tensor | None = None

    def forward(self: nn.Module, hidden_states: torch.Tensor):  # type: ignore[misc]
        if triton_usable(hidden_states.device):
            logits, scores, idx = route(hidden_states, self.weight, self.bias, self.top_k)
        else:
            logits, scores, idx = super().forward(hidden_states)  # type: ignore[misc]
        if self.rows_in_use is not None:
            used = self.rows_in_use[: hidden_states.shape[0], None]
            idx = torch.where(used, idx, self.num_experts)
            scores = scores * used.to(scores.dtype)
        return logits, scores, idx
