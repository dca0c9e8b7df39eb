"""The MoE router's top-k and softmax in one Triton kernel.

transformers' GptOssTopKRouter runs the router GEMM, then a sort-based topk (two kernels) and a
softmax: ~10 us of launches per layer at decode, where the experts of a batch of one take ~80 us.
Here the GEMM stays cuBLAS's (F.linear, many SMs) and one program per token takes the top-k of its
logits and their softmax in registers. Same function: top-k by value (ties go to the lower expert
id, in descending order), the scores are the softmax of the top-k logits in the model dtype. Used up
to MAX_TOKENS tokens (decode); longer inputs take transformers' path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.kernels.moe import HAVE_TRITON, triton_usable

MAX_TOKENS = 256

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _topk_softmax_kernel(logits_ptr, scores_ptr, idx_ptr, E, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, BLOCK_E)
        v = tl.load(logits_ptr + t * E + e, mask=e < E, other=float("-inf")).to(tl.float32)
        k = tl.arange(0, BLOCK_K)
        top_v = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
        top_i = tl.zeros([BLOCK_K], dtype=tl.int32)
        for j in tl.static_range(TOP_K):  # repeated arg-max, highest first
            m = tl.max(v, axis=0)
            i = tl.min(tl.where(v == m, e, BLOCK_E), axis=0)
            top_v = tl.where(k == j, m, top_v)
            top_i = tl.where(k == j, i, top_i)
            v = tl.where(e == i, float("-inf"), v)
        p = tl.exp(top_v - tl.max(top_v, axis=0))
        p = p / tl.sum(p, axis=0)
        k_ok = k < TOP_K
        tl.store(scores_ptr + t * TOP_K + k, p.to(scores_ptr.dtype.element_ty), mask=k_ok)
        tl.store(idx_ptr + t * TOP_K + k, top_i.to(tl.int64), mask=k_ok)


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], weight [E, H], bias [E] -> (logits [T, E], scores [T, k], expert ids [T, k])."""
    logits = F.linear(x, weight, bias)  # [T, E], in the model dtype
    t, e = logits.shape
    scores = torch.empty((t, top_k), dtype=x.dtype, device=x.device)
    idx = torch.empty((t, top_k), dtype=torch.long, device=x.device)
    _topk_softmax_kernel[(t,)](logits, scores, idx, e, TOP_K=top_k, BLOCK_E=triton.next_power_of_2(e),
                               BLOCK_K=triton.next_power_of_2(top_k), num_warps=1)
    return logits, scores, idx


class FusedRouterForward:
    """Mixed into transformers' GptOssTopKRouter by runtime.fused: same module, same parameters,
    `route` for decode-sized inputs.

    `rows_in_use` (set by the continuous batcher around its decode step, else None): a bool tensor whose first T
    entries say which of the step's T tokens belong to a sequence. The others (free rows of a step size bigger
    than the running sequences) are routed to expert id `num_experts` with weight 0, which the experts kernels
    skip (as they skip another rank's experts): a step of 100 sequences in a 512-row step pays the experts for 100.
    """

    rows_in_use: torch.Tensor | None = None

    def forward(self: nn.Module, hidden_states: torch.Tensor):  # type: ignore[misc]
        if hidden_states.shape[0] <= MAX_TOKENS and triton_usable(hidden_states.device):
            logits, scores, idx = route(hidden_states, self.weight, self.bias, self.top_k)
        else:
            logits, scores, idx = super().forward(hidden_states)  # type: ignore[misc]
        if self.rows_in_use is not None:
            used = self.rows_in_use[: hidden_states.shape[0], None]
            idx = torch.where(used, idx, self.num_experts)
            scores = scores * used.to(scores.dtype)
        return logits, scores, idx
