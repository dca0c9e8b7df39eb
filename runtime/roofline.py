"""The bytes a decode step must read, from the architecture: the floor that memory bandwidth sets.

A decode step of B sequences reads every attention/router/norm/lm_head weight once, the weights of
each expert that at least one of the B tokens is routed to, and the KV cache (sliding layers only
their window). Divided by the measured step time this gives the achieved GB/s; divided by the
machine's copy bandwidth, the fraction of the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MXFP4_BYTES_PER_PARAM = 4.25 / 8  # 4-bit values + one 8-bit scale per 32


@dataclass(frozen=True)
class StepBytes:
    attention: float
    experts: float
    other: float
    kv_cache: float

    @property
    def total(self) -> float:
        return self.attention + self.experts + self.other + self.kv_cache


def expert_bytes_per_param(experts: str, weight_bytes: float) -> float:
    """Bytes per expert weight as held in memory: 4.25 bits with experts=mxfp4 (4-bit values plus one
    8-bit scale per 32); every other implementation dequantizes MXFP4 at load to `weight_bytes`."""
    return MXFP4_BYTES_PER_PARAM if experts == "mxfp4" else weight_bytes


def expected_active_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts hit by `tokens` tokens each routed to top_k of num_experts (uniform routing)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def decode_step_bytes(
    cfg: Any, batch: int, context: int, weight_bytes: float = 2.0, expert_bytes: float = 2.0,
    tp_size: int = 1, ep_size: int = 1, vocab_split: int = 1,
) -> StepBytes:
    """Bytes one rank reads in one decode step of `batch` sequences with `context` cached tokens.

    weight_bytes: bytes per attention/router/lm_head parameter (2 for bf16); expert_bytes: bytes per
    expert weight as held in memory (2 for bf16, MXFP4_BYTES_PER_PARAM for MXFP4). Attention and the
    KV cache split over tp ranks, experts over tp*ep ranks, lm_head over `vocab_split` ranks (vocab
    parallel: tp*ep with our plan); router and norms are replicated.
    """
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attn_params = 2 * h * q + 2 * h * kv + q + 2 * kv + h + cfg.num_attention_heads
    active = expected_active_experts(cfg.num_local_experts, cfg.num_experts_per_tok, batch)
    expert_weight_params = 3 * h * inter
    expert_bias_params = 2 * inter + h
    experts = layers * active * (expert_weight_params * expert_bytes + expert_bias_params * weight_bytes)
    router = layers * (cfg.num_local_experts * (h + 1)) * weight_bytes
    norms = (2 * layers + 1) * h * 4
    lm_head = cfg.vocab_size * h * weight_bytes
    window = getattr(cfg, "sliding_window", None) or context
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * layers
    cached = sum(min(context, window) if t == "sliding_attention" else context for t in types)
    kv_cache = batch * cached * 2 * kv * weight_bytes
    return StepBytes(
        attention=layers * attn_params * weight_bytes / tp_size,
        experts=experts / (tp_size * ep_size),
        other=router + norms + lm_head / vocab_split,
        kv_cache=kv_cache / tp_size,
    )
