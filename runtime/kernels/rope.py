"""Rotary position embedding of q and k, one Triton launch each, for the steps torch runs op by op (prefills, and
decode without generation.compile).

transformers' apply_rotary_pos_emb splits each of q and k in halves and runs four multiplies, an add, a subtract and
a cat on them: seven kernels a tensor, fourteen a layer in eager mode. Here one program per token reads its heads
(from q/k as the fused q/k/v matmul left them: strided views) and writes the rotated heads contiguous, as the cat
would. Inside torch.compile transformers' function runs: inductor makes one kernel of it there.

Same function: out = [x1 cos - x2 sin, x2 cos + x1 sin] for the halves x1, x2 of each head, in fp32, rounded once
to x's dtype (transformers rounds after each op in bf16: the results differ by at most about one bf16 rounding).
"""

from __future__ import annotations

import torch
from transformers.models.gpt_oss.modeling_gpt_oss import apply_rotary_pos_emb

from runtime.kernels.moe import HAVE_TRITON, eager_launch

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, T, H, sx_b, sx_h, sx_t, sc_b, sc_t, sc_d,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        """Token (b, t) = divmod(program_id(0), T) of x [B, H, T, 2 HALF] (any strides, the last dimension dense)
        -> out [B, H, T, 2 HALF] contiguous; cos/sin [B, T, HALF] (both with strides sc_b, sc_t, sc_d)."""
        pid = tl.program_id(0)
        b = (pid // T).to(tl.int64)
        t = (pid % T).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, HALF)[None, :]
        ok = h < H
        src = x_ptr + b * sx_b + t * sx_t + h * sx_h + d
        x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
        at = b * sc_b + t * sc_t + d * sc_d  # (transformers' cos/sin are transposed views: sc_d = T)
        c = tl.load(cos_ptr + at).to(tl.float32)
        s = tl.load(sin_ptr + at).to(tl.float32)
        dst = out_ptr + ((b * H + h) * T + t) * (2 * HALF) + d
        tl.store(dst, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(dst + HALF, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=ok)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    out = torch.empty((b, h, t, d), dtype=x.dtype, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    sc_b, sc_t, sc_d = cos.stride()
    if b * t:
        _rope_kernel[(b * t,)](x, out, cos, sin, t, h, x.stride(0), x.stride(1), x.stride(2),
                               sc_b if cos.shape[0] == b else 0, sc_t, sc_d, HALF=d // 2,
                               BLOCK_H=triton.next_power_of_2(h), num_warps=4)
    return out


def apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, T, D], k [B, Hkv, T, D], cos/sin [B, T, D/2] -> (q, k) rotated: transformers' apply_rotary_pos_emb,
    in one launch each where Triton runs and torch is not compiling (see the module doc)."""
    half = q.shape[-1] // 2
    if (not eager_launch(q.device) or cos.shape[-1] != half
            or half & (half - 1) or cos.dim() != 3 or cos.shape[0] not in (1, q.shape[0]) or cos.shape[1] != q.shape[2]
            or sin.shape != cos.shape or sin.stride() != cos.stride()):
        return apply_rotary_pos_emb(q, k, cos, sin)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
