"""The MoE router in one Triton kernel: logits = x @ W^T + b, top-k experts, softmax over their logits.

transformers' GptOssTopKRouter runs a GEMM (plus cuBLAS's split-K reduction), a sort-based topk and a
softmax: five launches per layer, ~16 us at decode, more than a third of what the experts themselves
take at batch 1. Here one program per token does all of it in registers. Same function: the logits
are rounded to the model dtype before the top-k (as F.linear's output is), the top-k is by value
(ties go to the lower expert id), and the scores are the softmax of the top-k logits in the model
dtype. Used for up to MAX_TOKENS tokens (decode); longer inputs (prefill) take transformers' path,
where a GEMM is the better tool.
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.kernels.moe import HAVE_TRITON, triton_usable

MAX_TOKENS = 256

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _router_kernel(x_ptr, w_ptr, b_ptr, logits_ptr, scores_ptr, idx_ptr, H, E,
                       TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, BLOCK_E)
        e_ok = e < E
        acc = tl.zeros([BLOCK_E], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            h_ok = hh < H
            x = tl.load(x_ptr + t * H + hh, mask=h_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + e[:, None] * H + hh[None, :], mask=e_ok[:, None] & h_ok[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        acc += tl.load(b_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
        logit = acc.to(logits_ptr.dtype.element_ty)
        tl.store(logits_ptr + t * E + e, logit, mask=e_ok)
        v = tl.where(e_ok, logit.to(tl.float32), float("-inf"))
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
    t, h = x.shape
    e = weight.shape[0]
    logits = torch.empty((t, e), dtype=x.dtype, device=x.device)
    scores = torch.empty((t, top_k), dtype=x.dtype, device=x.device)
    idx = torch.empty((t, top_k), dtype=torch.long, device=x.device)
    block_e = triton.next_power_of_2(e)
    _router_kernel[(t,)](x.contiguous(), weight, bias, logits, scores, idx, h, e, TOP_K=top_k, BLOCK_E=block_e,
                         BLOCK_H=max(16, 4096 // block_e), BLOCK_K=triton.next_power_of_2(top_k), num_warps=4)
    return logits, scores, idx


class FusedRouterForward:
    """Mixed into transformers' GptOssTopKRouter by runtime.fused: same module, same parameters, the
    forward above for decode-sized inputs."""

    def forward(self: nn.Module, hidden_states: torch.Tensor):  # type: ignore[misc]
        if hidden_states.shape[0] <= MAX_TOKENS and triton_usable(hidden_states.device):
            return route(hidden_states, self.weight, self.bias, self.top_k)
        return super().forward(hidden_states)  # type: ignore[misc]
