"""Load-time fusions for the fast path that keep transformers' module tree and parameter names.

At batch 1 a decode step is ~600 small launches; each saved launch is ~5 us of a ~4 ms step.
- attention=triton: q/k/v become one matmul. Their weights (this rank's shards) are copied into one
  buffer [(Hq + 2 Hkv) * D, H] once; q_proj/k_proj/v_proj keep their parameters as views of it, so
  nothing is stored twice and the state dict is unchanged. The attention module's class becomes a
  subclass whose forward runs the one matmul and splits it; the rest is transformers' forward.
  Where torch runs the step op by op (prefills; decode without generation.compile), q and k are rotated by one
  Triton launch each (runtime/kernels/rope.py) instead of transformers' fourteen small kernels.
- experts=triton or mxfp4: the router's sort-based top-k and softmax become one Triton kernel
  (runtime/kernels/router.py), by the same kind of subclass.
- Either: every RMSNorm becomes one Triton launch where torch runs op by op (runtime/kernels/norm.py; six
  kernels in transformers' eager forward), by the same kind of subclass.
All are applied after the weights are loaded and sharded (runtime/model.py). Inside torch.compile the subclasses
run transformers' code for RoPE and the norms, which inductor fuses better (with the residual adds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.gpt_oss.modeling_gpt_oss import (
    ALL_ATTENTION_FUNCTIONS,
    GptOssAttention,
    GptOssRMSNorm,
    GptOssTopKRouter,
    eager_attention_forward,
)

from runtime.kernels import rope
from runtime.kernels.norm import FusedRMSNormForward
from runtime.kernels.router import FusedRouterForward


class FusedRouter(FusedRouterForward, GptOssTopKRouter):
    """transformers' router with the one-kernel top-k + softmax (and at decode its GEMV in the same launch)."""


class FusedRMSNorm(FusedRMSNormForward, GptOssRMSNorm):
    """transformers' RMSNorm in one Triton launch where torch runs op by op."""


class FusedQKVAttention(GptOssAttention):
    """transformers' GptOssAttention with q, k and v computed by one matmul (see the module doc)."""

    qkv_weight: torch.Tensor  # [(Hq + 2 Hkv) * D, H] on this rank
    qkv_bias: torch.Tensor | None
    qkv_sizes: tuple[int, int, int]

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        qkv = F.linear(hidden_states, self.qkv_weight, self.qkv_bias)
        q, k, v = (t.view(hidden_shape).transpose(1, 2) for t in qkv.split(self.qkv_sizes, dim=-1))
        cos, sin = position_embeddings
        q, k = rope.apply(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling,
                                 sliding_window=self.sliding_window, s_aux=self.sinks, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _concat_as_views(linears: list[nn.Linear], name: str) -> torch.Tensor | None:
    """One buffer holding the linears' `name` tensors end to end; each linear's becomes a view of it."""
    parts = [getattr(m, name) for m in linears]
    if any(p is None for p in parts):
        return None
    whole = torch.cat([p.detach() for p in parts], dim=0)
    start = 0
    for m, p in zip(linears, parts):
        m._parameters[name] = nn.Parameter(whole[start : start + p.shape[0]], requires_grad=False)
        start += p.shape[0]
    return whole


def fuse_qkv(attn: GptOssAttention) -> None:
    lin = [attn.q_proj, attn.k_proj, attn.v_proj]
    sizes = tuple(m.weight.shape[0] for m in lin)
    weight = _concat_as_views(lin, "weight")
    bias = _concat_as_views(lin, "bias")
    attn.__class__ = FusedQKVAttention
    attn.qkv_weight, attn.qkv_bias, attn.qkv_sizes = weight, bias, sizes


def apply(model: nn.Module, attention: str, experts: str) -> None:
    """The fusions that go with the chosen implementations (see the module doc)."""
    from runtime.kernels import flash, moe, moe_mxfp4

    fast = attention == flash.NAME or experts in (moe.NAME, moe_mxfp4.NAME)
    for layer in model.model.layers:
        if attention == flash.NAME and type(layer.self_attn) is GptOssAttention:
            fuse_qkv(layer.self_attn)
        if experts in (moe.NAME, moe_mxfp4.NAME) and type(layer.mlp.router) is GptOssTopKRouter:
            layer.mlp.router.__class__ = FusedRouter
    for norm in model.modules() if fast else ():
        if type(norm) is GptOssRMSNorm:
            norm.__class__ = FusedRMSNorm
