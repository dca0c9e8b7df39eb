"""Tensor and expert parallelism for gpt-oss, applied in one place to transformers' own module tree.

transformers' `tp_plan="auto"` keeps gpt-oss's attention whole on every rank (parallel.plan=transformers
runs it for comparison), so the plan is ours:

- attention (tensor parallel over tp ranks): q/k/v colwise by heads, o rowwise, `sinks` by head;
  the KV cache then holds only the local KV heads. o_proj's partial outputs are summed over the
  tp group; its bias lives on tp rank 0 only (zeros elsewhere) so the sum adds it once.
- experts (expert parallel over ep ranks, tensor parallel inside each expert over tp ranks): each
  rank keeps experts [ep_rank*E/ep, (ep_rank+1)*E/ep) and, of each, the hidden units
  [tp_rank*I/tp, ...): gate_up columns (gate/up interleaved, so a contiguous range), down_proj rows.
  Tokens routed elsewhere get weight 0 here; the partial outputs are summed over the tp*ep ranks
  of the replica. down_proj's bias lives on tp rank 0 only. With experts=mxfp4 the same split is
  taken of the checkpoint's uint8 blocks/scales: gate_up rows (out features) of this rank's units,
  down's input groups of 32 of this rank's units (so I/tp must be a multiple of 32).
- embeddings and lm_head (vocab parallel over the tp*ep ranks of the replica): each rank keeps rows
  [r*V/mp, (r+1)*V/mp) of both. The embedding looks up the ids in its range (zeros for the others) and
  the rows are summed over the replica; lm_head computes its slice of the logits and the slices are
  gathered, so every rank holds the whole [.., V] logits for sampling. At batch 1 that takes 1.16 GB
  (the 20b and 120b's lm_head) off each step's reads, split over the ranks.
- router and norms stay replicated.

The sums go through `runtime.allreduce` (one-shot over NVLink peer memory at decode sizes, NCCL or gloo
otherwise).

The model is built on the meta device; `shard` shrinks the meta parameters and returns, for each
parameter, the slice of the full checkpoint tensor this rank must load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from runtime.checkpoint import MXFP4_GROUP
from runtime.distributed import Groups, LayoutError, WorldLayout


@dataclass(frozen=True)
class Shard:
    """Which part of the full checkpoint tensor a rank loads."""

    index: tuple[slice, ...] = ()
    """One slice per leading dimension (empty: the whole tensor)."""
    zero: bool = False
    """Load nothing: the rank holds zeros of the sliced shape (biases added on one rank only)."""


def _range(size: int, parts: int, part: int) -> slice:
    n = size // parts
    return slice(part * n, (part + 1) * n)


def _set_meta(module: nn.Module, name: str, shape: tuple[int, ...]) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(torch.empty(shape, dtype=old.dtype, device="meta"), requires_grad=False))


class ParallelMoE(nn.Module):
    """gpt-oss MLP with this rank's experts: full routing, local experts, partial sums combined.

    Keeps the child names `router` and `experts` so parameter names match the checkpoint.
    """

    def __init__(self, mlp: nn.Module, first_expert: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.router = mlp.router
        self.experts = mlp.experts
        self.first_expert = first_expert
        self.reduce = reduce

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)  # [T, H]
        _, scores, experts = self.router(x)  # [T, k] weights and global expert ids
        n_local = self.experts.num_experts
        local = experts - self.first_expert
        mine = (local >= 0) & (local < n_local)
        # grouped_mm/batched_mm skip (or zero-weight) the sentinel id n_local; the eager loop cannot
        # index it, so there the foreign slots go to expert 0 with weight 0.
        sentinel = 0 if self.experts.config._experts_implementation == "eager" else n_local
        local = torch.where(mine, local, torch.full_like(local, sentinel))
        out = self.reduce(self.experts(x, local, scores * mine))
        return out.reshape(batch, seq, hidden), scores


class VocabParallelEmbedding(nn.Module):
    """This rank's rows [start, start + n) of the embedding; rows of other ranks' ids are summed in."""

    def __init__(self, emb: nn.Embedding, start: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.weight = emb.weight  # [n, H] once sharded (name kept: model.embed_tokens.weight)
        self.start = start
        self.reduce = reduce

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        rows = F.embedding(torch.where(mine, local, torch.zeros_like(local)), self.weight)
        return self.reduce(rows * mine[..., None].to(rows.dtype))


class VocabParallelLMHead(nn.Module):
    """This rank's slice of the vocabulary's logits, gathered into the whole [.., V] on every rank."""

    def __init__(self, head: nn.Linear, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.weight = head.weight  # [V/mp, H] once sharded (name kept: lm_head.weight)
        self.bias = head.bias
        self.gather = gather

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.gather(F.linear(hidden, self.weight, self.bias))


class _Local:
    """Stands in for a group's collectives where a model is built sharded but never run together
    (tests that inspect one rank's shard in one process)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x

    gather_last = __call__


def check_mxfp4_split(hf_config: object, tp_size: int) -> None:
    """experts=mxfp4 keeps each expert's 4-bit groups whole: a tp rank's hidden units must be whole
    groups of 32 (down_proj's input is split by tp)."""
    inter = hf_config.intermediate_size
    if (inter // tp_size) % MXFP4_GROUP:
        ok = [d for d in range(1, inter // MXFP4_GROUP + 1) if (inter // MXFP4_GROUP) % d == 0]
        raise LayoutError(
            f"experts=mxfp4 with parallel.tp_size={tp_size} gives each rank {inter}/{tp_size} = {inter / tp_size:g} "
            f"hidden units per expert, not a multiple of the MXFP4 group of {MXFP4_GROUP}: use a tp_size dividing "
            f"{inter // MXFP4_GROUP} (one of {ok}) and split the rest with parallel.ep_size, or experts=grouped_mm "
            f"(dequantizes the experts to bf16 at load)"
        )


def shard(model: nn.Module, layout: WorldLayout, groups: Groups) -> dict[str, Shard]:
    """Shard a meta-device GptOssForCausalLM in place; returns {param name: Shard} for every parameter."""
    cfg = model.config
    tp, tp_rank, ep, ep_rank = layout.tp_size, layout.tp_rank, layout.ep_size, layout.ep_rank
    plan: dict[str, Shard] = {name: Shard() for name, _ in model.named_parameters()}
    if layout.mp_size == 1:
        return plan
    tp_reduce, mp_reduce = groups.tp_reduce or _Local(), groups.mp_reduce or _Local()
    head_dim = cfg.head_dim
    n_exp, inter = cfg.num_local_experts, cfg.intermediate_size
    e_sl, i_sl = _range(n_exp, ep, ep_rank), _range(inter, tp, tp_rank)
    gu_sl = slice(2 * i_sl.start, 2 * i_sl.stop)  # interleaved gate/up columns of hidden units i_sl
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        attn = layer.self_attn
        if tp > 1:
            q_sl = _range(cfg.num_attention_heads * head_dim, tp, tp_rank)
            kv_sl = _range(cfg.num_key_value_heads * head_dim, tp, tp_rank)
            for proj, sl in (("q_proj", q_sl), ("k_proj", kv_sl), ("v_proj", kv_sl)):
                lin = getattr(attn, proj)
                _set_meta(lin, "weight", (sl.stop - sl.start, lin.in_features))
                _set_meta(lin, "bias", (sl.stop - sl.start,))
                lin.out_features = sl.stop - sl.start
                plan[p + f"self_attn.{proj}.weight"] = Shard((sl,))
                plan[p + f"self_attn.{proj}.bias"] = Shard((sl,))
            o = attn.o_proj
            _set_meta(o, "weight", (o.out_features, q_sl.stop - q_sl.start))
            o.in_features = q_sl.stop - q_sl.start
            plan[p + "self_attn.o_proj.weight"] = Shard((slice(None), q_sl))
            plan[p + "self_attn.o_proj.bias"] = Shard(zero=tp_rank != 0)
            h_sl = _range(cfg.num_attention_heads, tp, tp_rank)
            _set_meta(attn, "sinks", (h_sl.stop - h_sl.start,))
            plan[p + "self_attn.sinks"] = Shard((h_sl,))
            o.register_forward_hook(lambda _m, _in, out, r=tp_reduce: r(out))

        experts = layer.mlp.experts
        n_local, i_local = e_sl.stop - e_sl.start, i_sl.stop - i_sl.start
        x = p + "mlp.experts."
        if hasattr(experts, "gate_up_proj_blocks"):  # experts=mxfp4: the checkpoint's 4-bit tensors
            h_groups, i_groups = cfg.hidden_size // MXFP4_GROUP, i_local // MXFP4_GROUP
            # gate_up rows (out features) of this rank's units; down's input groups of this rank's units
            g_sl = slice(i_sl.start // MXFP4_GROUP, i_sl.stop // MXFP4_GROUP)
            _set_meta(experts, "gate_up_proj_blocks", (n_local, 2 * i_local, h_groups, 16))
            _set_meta(experts, "gate_up_proj_scales", (n_local, 2 * i_local, h_groups))
            _set_meta(experts, "down_proj_blocks", (n_local, cfg.hidden_size, i_groups, 16))
            _set_meta(experts, "down_proj_scales", (n_local, cfg.hidden_size, i_groups))
            for name in ("gate_up_proj_blocks", "gate_up_proj_scales"):
                plan[x + name] = Shard((e_sl, gu_sl))
            for name in ("down_proj_blocks", "down_proj_scales"):
                plan[x + name] = Shard((e_sl, slice(None), g_sl))
        else:
            _set_meta(experts, "gate_up_proj", (n_local, cfg.hidden_size, 2 * i_local))
            _set_meta(experts, "down_proj", (n_local, i_local, cfg.hidden_size))
            plan[x + "gate_up_proj"] = Shard((e_sl, slice(None), gu_sl))
            plan[x + "down_proj"] = Shard((e_sl, i_sl))
        _set_meta(experts, "gate_up_proj_bias", (n_local, 2 * i_local))
        _set_meta(experts, "down_proj_bias", (n_local, cfg.hidden_size))
        plan[x + "gate_up_proj_bias"] = Shard((e_sl, gu_sl))
        plan[x + "down_proj_bias"] = Shard((e_sl,), zero=tp_rank != 0)
        experts.num_experts, experts.intermediate_size = n_local, i_local
        layer.mlp = ParallelMoE(layer.mlp, e_sl.start, mp_reduce)
    _shard_vocab(model, layout, mp_reduce, plan)
    return plan


def _shard_vocab(model: nn.Module, layout: WorldLayout, mp_reduce: Any, plan: dict[str, Shard]) -> None:
    """Embedding and lm_head rows split over the replica's tp*ep ranks (see the module doc)."""
    vocab, mp = model.config.vocab_size, layout.mp_size
    if vocab % mp:
        return  # no real gpt-oss (vocab 201088 = 2**7 * 1571); such a model keeps them whole
    sl = _range(vocab, mp, layout.rank % mp)
    emb, head = model.model.embed_tokens, model.lm_head
    _set_meta(emb, "weight", (sl.stop - sl.start, emb.weight.shape[1]))
    _set_meta(head, "weight", (sl.stop - sl.start, head.in_features))
    plan["model.embed_tokens.weight"] = Shard((sl,))
    plan["lm_head.weight"] = Shard((sl,))
    if head.bias is not None:
        _set_meta(head, "bias", (sl.stop - sl.start,))
        plan["lm_head.bias"] = Shard((sl,))
    model.model.embed_tokens = VocabParallelEmbedding(emb, sl.start, mp_reduce)
    model.lm_head = VocabParallelLMHead(head, mp_reduce.gather_last)
