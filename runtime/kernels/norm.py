"""RMSNorm in one Triton launch, for the steps torch runs op by op (prefills, and decode without generation.compile).

transformers' GptOssRMSNorm is six elementwise and reduction kernels in eager mode (to fp32, square, mean, rsqrt,
two multiplies, back to the model dtype), each reading and writing the whole [T, H] activation, twice a layer. On the
H200 the 120b's 1,024-token prefill spent ~70 us a layer in them (docs/benchmarks.md, twelfth session); one launch
reads the input once and writes the output once. Inside torch.compile the module keeps transformers' forward:
inductor already makes one kernel of it there, with the residual add before it.

Same function: y = (w * (x / sqrt(mean(x^2) + eps))) in fp32, rounded once to x's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.kernels.moe import HAVE_TRITON, eager_launch

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, H, eps, BLOCK_H: tl.constexpr):
        """Row program_id(0) of x [T, H] -> out (one pass: the whole row in registers)."""
        row = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)
        ok = h < H
        x = tl.load(x_ptr + row * H + h, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + h, mask=ok, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
        tl.store(out_ptr + row * H + h, (w * (x * inv)).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H], weight [H] -> [..., H] in x's dtype (see the module doc)."""
    h = x.shape[-1]
    rows = x.reshape(-1, h).contiguous()
    out = torch.empty_like(rows)
    if rows.shape[0]:
        block = triton.next_power_of_2(h)
        _rms_norm_kernel[(rows.shape[0],)](rows, weight.contiguous(), out, h, float(eps), BLOCK_H=block,
                                           num_warps=8 if block >= 4096 else 4)
    return out.view(x.shape)


class FusedRMSNormForward:
    """Mixed into transformers' GptOssRMSNorm by runtime.fused: same module and parameter; rms_norm where Triton
    runs and torch is not compiling the step (inductor fuses the original better: with the residual add)."""

    def forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:  # type: ignore[misc]
        if eager_launch(hidden_states.device):
            return rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return super().forward(hidden_states)  # type: ignore[misc]
