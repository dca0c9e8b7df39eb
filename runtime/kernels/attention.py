"""Attention with sinks that reads each KV head once (grouped-query attention without repeat_kv).

transformers' eager path repeats every KV head for its 8 query heads (repeat_kv copies K and V, 8x the
bytes) and materialises the scores of all heads at once. Here the query heads of a KV group are one
batched matmul against that group's keys, and long prefills are processed a few sequences at a time
so the score tensor stays bounded. Same math as transformers' eager_attention_forward: scaled scores
plus additive mask, the per-head sink logit joins the softmax and is dropped after it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NAME = "gqa_sinks"
SCORE_BYTES_BUDGET = 1 << 30  # largest fp32 score tensor materialised at once


def gqa_sinks_attention(
    module: nn.Module,
    query: torch.Tensor,  # [B, Hq, T, D]
    key: torch.Tensor,  # [B, Hkv, S, D]
    value: torch.Tensor,  # [B, Hkv, S, D]
    attention_mask: torch.Tensor | None,  # [B, 1, T, S] additive
    scaling: float,
    dropout: float = 0.0,
    s_aux: torch.Tensor | None = None,  # [Hq] sink logits
    **_: Any,
) -> tuple[torch.Tensor, None]:
    b, hq, t, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    per_row = hq * t * s * 4
    step = max(1, min(b, SCORE_BYTES_BUDGET // max(per_row, 1)))
    sinks = module.sinks if s_aux is None else s_aux
    outs = [
        _attend(query[i : i + step], key[i : i + step], value[i : i + step],
                None if attention_mask is None else attention_mask[i : i + step], scaling, sinks, hkv)
        for i in range(0, b, step)
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    return out, None  # [B, T, Hq, D]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float,
            sinks: torch.Tensor, hkv: int) -> torch.Tensor:
    b, hq, t, d = q.shape
    g = hq // hkv
    qg = q.reshape(b, hkv, g * t, d)  # the g query heads of a KV head, stacked along the rows
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scaling  # [B, Hkv, g*T, S]
    scores = scores.view(b, hkv, g, t, -1)
    if mask is not None:
        scores = scores + mask[:, :, None].float()  # [B, 1, 1, T, S]
    sink = sinks.float().view(1, hkv, g, 1, 1).expand(b, hkv, g, t, 1)
    logits = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    out = torch.matmul(probs.to(v.dtype).view(b, hkv, g * t, -1), v)  # [B, Hkv, g*T, D]
    return out.view(b, hkv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, hq, d)
