"""Flash attention with sinks in Triton, for the static KV cache: prefill and decode, one kernel.

Registered with transformers as the attention implementation `triton_sinks` (conf/attention/triton.yaml).
Same function as transformers' eager_attention_forward for gpt-oss: softmax over the scaled scores of the
visible keys plus one sink logit per head, the sink dropped after the softmax. How it differs:
- nothing of size T x S is materialised: keys stream through an online softmax (exp2, fp32 state);
  the sink is the softmax's starting state (max = sink, sum = 1), so a row that sees no key gives 0;
- the query heads that share a KV head are rows of one tile (row r = query r // G, head r % G), so
  each key and value is read once per KV head, for all G query heads (grouped-query attention);
- what a query sees comes from the cache's bookkeeping: with a static cache (`SlotMask`) slot s is
  visible to a query written at slot q when slot s holds a token (position >= 0), s <= q and, on
  sliding layers, s > q - window. Slots of a row hold consecutive positions, so this is the causal
  rule and the 128-token window; key blocks outside [q - window, q] are never read (sliding layers
  read the window, not the cache). With the paged cache (`PagedMask`, runtime/kvcache.py) the keys are
  a pool of blocks and each row's block table says where its position s lives (block s // BS of the
  row's list, slot s % BS); position s is visible to the query at position q by the same rule;
- decode (few query rows) splits the keys of a long cache over several programs (split-K) whose
  partial results are merged by their log-sum-exp, so a batch of one still fills the GPU. With
  MERGE_IN_KERNEL the merge runs in the kernel: each split counts itself in on a per-tile counter (an
  acquire-release atomic) and the last one to arrive merges every split's part and resets the counter, where
  a softmax over the splits and a weighted sum in torch cost two more launches per layer.
The bounds are read from tensors inside the kernel: no host sync, capturable in a CUDA graph.
Where Triton cannot run (no GPU and not TRITON_INTERPRET=1) the same SlotMask becomes an additive
mask (and a PagedMask's blocks are gathered first) for runtime.kernels.attention (gqa_sinks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from runtime.kernels import arrivals
from runtime.kernels import attention as gqa
from runtime.kernels.moe import HAVE_TRITON, triton_usable

NAME = "triton_sinks"
LOG2E = 1.4426950408889634

MERGE_IN_KERNEL = True
"""Decode's split-K parts merged by the kernel's last split of each tile (see the module doc), not by torch. On the
H200 (tenth session, docs/benchmarks.md): its GPU test passed (100 graph replays on new queries against the torch
merge; the interpreter runs programs one after another, so it cannot show a memory-ordering bug), one call with
1,152 cached tokens takes 14.1 instead of 21.5 us at batch 1 (microbench --flash, 128 keys a split), and a compiled
120b step shows no copy of the counters (the profile has no per-layer kernel besides the attention's own)."""
SPLIT_KEYS = 128
"""Decode splits a row's keys over programs of at least this many keys each (until the grid covers the GPU). With
the in-kernel merge, 128 keys beat 256 and 64 at batch 1 (14.1 / 16.6 / 15.2 us, 1,152 cached tokens, H200) and tie
at batch 8 and 16."""
if HAVE_TRITON:
    import triton
    import triton.language as tl


@dataclass
class SlotMask:
    """What each query may see in a static KV cache, given in place of an additive mask.

    slot_pos: [B, S] position of the token held in each cache slot, -1 for an empty or pad slot.
    q_slot:   [B, T] the slot each query's own key was written to.
    """

    slot_pos: torch.Tensor
    q_slot: torch.Tensor

    def by_layer(self) -> dict[str, SlotMask]:
        """As transformers' `attention_mask` mapping: the same mask for both layer types (the kernel
        takes the window from the layer)."""
        return {"full_attention": self, "sliding_attention": self}

    def additive(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """The same rule as an additive mask [B, 1, T, S] (for the torch fallback)."""
        s = torch.arange(self.slot_pos.shape[1], device=self.slot_pos.device)
        q = self.q_slot[:, None, :, None]
        vis = (self.slot_pos[:, None, None, :] >= 0) & (s <= q)
        if window:
            vis &= s > q - window
        return torch.where(vis, torch.zeros((), dtype=dtype, device=vis.device), torch.finfo(dtype).min)


@dataclass
class PagedMask:
    """What each query may see in the paged KV cache (runtime/kvcache.py), given in place of an additive mask:
    the keys passed are the layer's pools [blocks, Hkv, BS, D].

    table: [B, M] int32, the physical block of each row's block 0..M-1 (position p: block p // BS, slot p % BS).
    q_pos: [B, T] each query's position; it sees positions <= its own (in the window on sliding layers); -1: a
           pad query, which sees nothing.
    window_table: the sliding layers' own table (runtime/kvcache.py: blocks behind the window are given back),
           None: they read through `table` too.
    """

    table: torch.Tensor
    q_pos: torch.Tensor
    window_table: torch.Tensor | None = None

    def by_layer(self) -> dict[str, PagedMask]:
        sliding = self if self.window_table is None else PagedMask(self.window_table, self.q_pos)
        return {"full_attention": PagedMask(self.table, self.q_pos), "sliding_attention": sliding}

    def dense(self, key: torch.Tensor, value: torch.Tensor, window: int | None,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows' keys and values as consecutive slots [B, Hkv, M * BS, D] and the additive mask [B, 1, T, S]
        (for the torch fallback)."""
        from runtime.kvcache import gather

        bs = key.shape[2]
        used = max(1, -(-(int(self.q_pos.max()) + 1) // bs))  # the blocks any query reaches (a host sync: the
        table = self.table[:, :used]  # fallback runs where the kernel cannot, not in a CUDA graph)
        k, v = gather(key, table), gather(value, table)
        slots = torch.arange(k.shape[2], device=k.device).expand(k.shape[0], -1)
        return k, v, SlotMask(slots, self.q_pos).additive(window, dtype)


if HAVE_TRITON:

    @triton.jit
    def _flash_kernel(
        q_ptr, k_ptr, v_ptr, sink_ptr, slot_pos_ptr, q_slot_ptr, table_ptr, o_ptr, lse_ptr, fin_ptr, cnt_ptr,
        sq_b, sq_h, sq_t,  # q [B, Hq, T, D] strides (D contiguous)
        sk_b, sk_h, sk_s,  # k [B, Hkv, S, D] strides (paged: [blocks, Hkv, BS, D]; D contiguous)
        sv_b, sv_h, sv_s,  # v likewise
        so_p, so_b, so_t,  # out [P, B, T, Hq, D] strides (Hq, D contiguous)
        sf_b, sf_t,  # fin [B, T, Hq, D] strides (Hq, D contiguous): the merged output (MERGE)
        T, S, HKV, HQ, scale_log2, window, st_b,  # st_b: the block table's row stride
        G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
        IEEE: tl.constexpr, PAGED: tl.constexpr, BS: tl.constexpr, MERGE: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)  # rows x KV heads on the first axis: the one that may exceed 65,535
        pid_m = tl.program_id(1)
        split = tl.program_id(2)
        b = (pid_bh // HKV).to(tl.int64)
        hk = pid_bh % HKV
        r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows: (query, head of the group)
        t = r // G
        h = hk * G + r % G
        row_ok = t < T
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + t[:, None] * sq_t + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        qs = tl.load(q_slot_ptr + b * T + t, mask=row_ok, other=-1)
        # the keys any row of this block can see: [lo, hi)
        hi = tl.minimum(tl.max(qs, axis=0) + 1, S)
        first_q = tl.min(tl.where(row_ok & (qs >= 0), qs, S), axis=0)  # (pad queries see nothing)
        lo = tl.where(window > 0, tl.maximum(first_q - window + 1, 0), 0)
        chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), SPLITS), BLOCK_N) * BLOCK_N
        start = lo + split * chunk
        end = tl.minimum(start + chunk, hi)
        # the sink is the starting state of split 0's softmax: max = sink, sum = exp(0) = 1
        sink = tl.load(sink_ptr + h, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        first = (tl.zeros([BLOCK_M], dtype=tl.int32) + split) == 0
        m_i = tl.where(first, sink, float("-inf"))
        l_i = tl.where(first, 1.0, 0.0)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        for s0 in range(start, end, BLOCK_N):
            s = s0 + tl.arange(0, BLOCK_N)
            s_ok = s < end
            if PAGED:  # position s of row b: slot s % BS of the block its table lists at s // BS
                blk = tl.load(table_ptr + b * st_b + s // BS, mask=s_ok, other=0).to(tl.int64)
                k_at = blk * sk_b + hk * sk_h + (s % BS) * sk_s
                v_at = blk * sv_b + hk * sv_h + (s % BS) * sv_s
            else:
                k_at = b * sk_b + hk * sk_h + s * sk_s
                v_at = b * sv_b + hk * sv_h + s * sv_s
            kt = tl.load(k_ptr + k_at[None, :] + d[:, None], mask=s_ok[None, :], other=0.0)  # [D, N]
            if IEEE:
                sc = tl.dot(q, kt, input_precision="ieee")
            else:
                sc = tl.dot(q, kt)
            sc = (sc * scale_log2).to(tl.float32)  # (under torch.compile the scale may arrive as fp64)
            if PAGED:  # every position before a query's own is held
                vis = (s[None, :] <= qs[:, None]) & s_ok[None, :]
            else:
                pos = tl.load(slot_pos_ptr + b * S + s, mask=s_ok, other=-1)
                vis = (pos[None, :] >= 0) & (s[None, :] <= qs[:, None]) & s_ok[None, :]
            vis = vis & ((window == 0) | (s[None, :] > qs[:, None] - window))
            sc = tl.where(vis, sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(sc - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = tl.load(v_ptr + v_at[:, None] + d[None, :], mask=s_ok[:, None], other=0.0)  # [N, D]
            if IEEE:
                pv = tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
            else:
                pv = tl.dot(p.to(vt.dtype), vt)
            acc = acc * alpha[:, None] + pv
            m_i = m_new.to(tl.float32)
            l_i = l_i.to(tl.float32)
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        o = o_ptr + split * so_p + b * so_b + t[:, None] * so_t + h[:, None] * D + d[None, :]
        tl.store(o, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
        if SPLITS > 1:  # log-sum-exp (natural) of this split's part, for the merge
            lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
            rows_b = tl.num_programs(0) // HKV
            tl.store(lse_ptr + ((split * rows_b + b) * T + t) * HQ + h, lse, mask=row_ok)
            if MERGE:  # the tile's last split to arrive merges them all (the others' stores released to it)
                tile = pid_bh * tl.num_programs(1) + pid_m
                tl.debug_barrier()  # every thread's stores before the release
                arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
                if arrived == SPLITS - 1:
                    tl.debug_barrier()
                    m_run = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
                    total = tl.zeros([BLOCK_M], dtype=tl.float32)
                    merged = tl.zeros([BLOCK_M, D], dtype=tl.float32)
                    for p in range(SPLITS):  # one pass, rescaled as the running max grows (not unrolled: up to ~260)
                        lp = tl.load(lse_ptr + ((p * rows_b + b) * T + t) * HQ + h, mask=row_ok, other=float("-inf"))
                        part = tl.load(o_ptr + p * so_p + b * so_b + t[:, None] * so_t + h[:, None] * D + d[None, :],
                                       mask=row_ok[:, None], other=0.0)
                        m_new = tl.maximum(m_run, lp)
                        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                        keep = tl.exp(m_run - m_safe)
                        w = tl.exp(lp - m_safe)
                        merged = merged * keep[:, None] + w[:, None] * part
                        total = total * keep + w
                        m_run = m_new
                    merged = merged / tl.where(total > 0, total, 1.0)[:, None]
                    tl.store(fin_ptr + b * sf_b + t[:, None] * sf_t + h[:, None] * D + d[None, :],
                             merged.to(fin_ptr.dtype.element_ty), mask=row_ok[:, None])
                    tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next call


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def decode_splits(device: torch.device, b: int, hkv: int, t: int, s: int, window: int | None) -> int:
    """Programs a decode call splits each row's keys over: until the grid covers the GPU, >= SPLIT_KEYS keys a
    split."""
    span = min(s, (window or s) + t)  # keys one block of rows can see, at most
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(math.ceil(span / SPLIT_KEYS), math.ceil(2 * sms / (b * hkv))))


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                    mask: SlotMask | PagedMask, scaling: float, window: int | None) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, S, D] (the cache; with a PagedMask the pools [blocks, Hkv, BS, D]),
    sinks [Hq] -> [B, T, Hq, D]."""
    b, hq, t, d = q.shape
    paged = isinstance(mask, PagedMask)
    hkv = k.shape[1]
    s = mask.table.shape[1] * k.shape[2] if paged else k.shape[2]
    g = hq // hkv
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # the kernel steps D by 1
    rows = t * g
    decode = rows <= 64
    block_m = _pow2_at_least(rows, 16) if decode else 128
    block_n = 64
    splits = decode_splits(q.device, b, hkv, t, s, window) if decode else 1
    out = torch.empty((splits, b, t, hq, d), dtype=q.dtype if splits == 1 else torch.float32, device=q.device)
    lse = torch.empty((splits, b, t, hq) if splits > 1 else (1,), dtype=torch.float32, device=q.device)
    grid = (b * hkv, triton.cdiv(rows, block_m), splits)
    counters = arrivals.table(q.device, "flash") if splits > 1 and MERGE_IN_KERNEL else None
    merge = counters is not None and grid[0] * grid[1] <= arrivals.SLOTS
    fin = torch.empty((b, t, hq, d), dtype=q.dtype, device=q.device) if merge else out
    table = mask.table if paged else mask.slot_pos  # (the other pointer is not read)
    q_slot = mask.q_pos if paged else mask.q_slot
    _flash_kernel[grid](
        q, k, v, sinks, mask.q_pos if paged else mask.slot_pos, q_slot.contiguous(), table, out, lse, fin,
        counters if merge else lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        out.stride(0), out.stride(1), out.stride(2), fin.stride(0), fin.stride(1),
        t, s, hkv, hq, scaling * LOG2E, int(window or 0), table.stride(0),
        G=g, D=d, BLOCK_M=block_m, BLOCK_N=block_n, SPLITS=splits, IEEE=q.dtype == torch.float32,
        PAGED=paged, BS=k.shape[2] if paged else 1, MERGE=merge,
        num_warps=4 if decode else 8, num_stages=2 if decode else 3,
    )
    if splits == 1:
        return out[0]
    if merge:
        return fin
    weight = torch.softmax(lse, dim=0)  # [P, B, T, Hq]: each split's share of the total
    return (out * weight[..., None]).sum(0).to(q.dtype)


def supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """The kernel's constraints: Triton usable on this device, a power-of-two head size >= 16."""
    d = q.shape[-1]
    return triton_usable(q.device) and d >= 16 and d & (d - 1) == 0 and q.shape[1] % k.shape[1] == 0


def sinks_attention(
    module: nn.Module,
    query: torch.Tensor,  # [B, Hq, T, D]
    key: torch.Tensor,  # [B, Hkv, S, D]
    value: torch.Tensor,  # [B, Hkv, S, D]
    attention_mask: SlotMask | PagedMask | torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    s_aux: torch.Tensor | None = None,  # [Hq] sink logits
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature; a SlotMask or PagedMask selects the kernel, anything else
    (transformers' own masks with the dynamic cache, or no Triton here) the gqa_sinks path."""
    sinks = module.sinks if s_aux is None else s_aux
    if isinstance(attention_mask, PagedMask):
        if supported(query, key):
            return flash_attention(query, key, value, sinks, attention_mask, scaling, sliding_window), None
        key, value, attention_mask = attention_mask.dense(key, value, sliding_window, query.dtype)
    if isinstance(attention_mask, SlotMask):
        if supported(query, key):
            return flash_attention(query, key, value, sinks, attention_mask, scaling, sliding_window), None
        attention_mask = attention_mask.additive(sliding_window, query.dtype)
    return gqa.gqa_sinks_attention(module, query, key, value, attention_mask, scaling, s_aux=sinks)
