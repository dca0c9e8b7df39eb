"""Fused MoE experts in Triton: every needed expert's weights are read once per step.

Registered with transformers as the experts implementation `triton` (conf/experts/triton.yaml), so
`experts=triton` swaps it into transformers' own GptOssExperts modules. Same function as
transformers' eager experts: for each (token, expert) pair, gate_up = x @ W_gu[e] + b_gu[e] (gate and
up interleaved), out = ((clamp(up) + 1) * g * sigmoid(1.702 g)) @ W_d[e] + b_d[e] with g = min(gate,
limit), weighted by the routing weight and summed over the token's experts.

How: up to DENSE_MAX_PAIRS (token, expert) pairs (decode), program m of the grid is expert m: it
takes the pairs routed to it from all of them (a mask) and returns at once when there are none, so
no sorting or layout kernels run. Beyond that, the pairs are sorted by expert and laid out in blocks
of BLOCK_M rows, each block holding pairs of one expert only (padded). One kernel computes gate_up + bias + SwiGLU for a
block x a slice of the expert's hidden units, a second one the down projection + bias, times the
routing weight. A block reads its expert's weight tile once for all its rows, so at decode (a few
pairs per expert) each active expert's weights cross memory once. The layout is computed with fixed shapes (no
host sync): by three small Triton launches in eager steps, by torch ops in compiled ones and where Triton cannot
run, so the whole thing can be captured in a CUDA graph. Expert id
`num_experts` marks a pair routed to another rank (expert parallel): it is skipped.

Where Triton cannot run (no GPU, and not TRITON_INTERPRET=1) the torch reference below is used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

NAME = "triton"
DENSE_MAX_PAIRS = 64  # up to this many (token, expert) pairs, no block layout: see fused_experts
DOWN_SPLIT_K = 4  # split of the down projection's inner dimension for a single token

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA torch and is pinned for CPU
    HAVE_TRITON = False


def triton_usable(device: torch.device) -> bool:
    return HAVE_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def eager_launch(device: torch.device) -> bool:
    """Whether a launch meant for steps torch runs op by op should run: Triton runs on `device` and torch is not
    compiling (inductor fuses torch's own ops there better: the block layout, the norms, RoPE)."""
    return triton_usable(device) and not torch.compiler.is_compiling()


def check_dense(**weights: torch.Tensor) -> None:
    """The kernels index weights as dense row-major arrays: refuse strided views (a caller's bug)."""
    for name, w in weights.items():
        if not w.is_contiguous():
            raise ValueError(f"{name} {tuple(w.shape)} has strides {w.stride()}: the experts kernels need dense "
                             f"weights (.contiguous())")


def tile_configs(tiles: list[tuple[int, int, int, int]], interpreted: tuple[int, int]) -> list:
    """Autotune configs from (BLOCK_N, BLOCK_K, num_warps, num_stages) tiles, tried once per problem
    shape on the GPU (Triton's autotuner, outside any graph); under Triton's CPU interpreter only the
    small `interpreted` (BLOCK_N, BLOCK_K) tile."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_N": interpreted[0], "BLOCK_K": interpreted[1]}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st) for bn, bk, w, st in tiles]


def _configs() -> list:
    return tile_configs([(32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3), (32, 256, 4, 3),
                         (128, 128, 8, 3)], interpreted=(64, 64))


if HAVE_TRITON:

    @triton.jit
    def _block_rows(pid_m, pair_ptr, block_expert_ptr, ids_ptr, num_pairs, BLOCK_M: tl.constexpr,
                    DENSE: tl.constexpr):
        """The expert of program row-block `pid_m` and its rows: (expert, pair id per row, row valid)."""
        r = tl.arange(0, BLOCK_M)
        if DENSE:  # few pairs: program pid_m is expert pid_m, its rows are all pairs, routed ones valid
            e = pid_m
            pair = r
            valid = tl.load(ids_ptr + r, mask=r < num_pairs, other=-1) == e
        else:  # block_layout: a block of pairs of one expert
            e = tl.load(block_expert_ptr + pid_m)
            pair = tl.load(pair_ptr + pid_m * BLOCK_M + r)
            valid = pair < num_pairs
        return e.to(tl.int64), pair, valid

    @triton.autotune(configs=_configs(), key=["pairs_bucket", "hidden", "inter"])
    @triton.jit
    def _gate_up_kernel(
        x_ptr, w_ptr, b_ptr, h_ptr, pair_ptr, block_expert_ptr, ids_ptr,
        num_pairs, num_experts, hidden, inter, pairs_bucket, limit, alpha,
        TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr, DENSE: tl.constexpr,
    ):
        pid_n = tl.program_id(1)
        e, pair, valid = _block_rows(tl.program_id(0), pair_ptr, block_expert_ptr, ids_ptr, num_pairs, BLOCK_M, DENSE)
        if tl.max(valid.to(tl.int32), axis=0) == 0:  # no pair for this expert here
            return
        tok = pair // TOP_K
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # hidden units of the expert
        n_ok = n < inter
        # gate/up are interleaved per hidden unit: the 2*BLOCK_N columns of these units are contiguous
        c = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
        c_ok = c < 2 * inter
        w_base = w_ptr + e * hidden * (2 * inter)
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < hidden
            a = tl.load(x_ptr + tok[:, None].to(tl.int64) * hidden + kk[None, :],
                        mask=valid[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_base + kk[:, None].to(tl.int64) * (2 * inter) + c[None, :],
                        mask=k_ok[:, None] & c_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        acc += tl.load(b_ptr + e * (2 * inter) + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        h = (up + 1.0) * gate * tl.sigmoid(gate * alpha)
        tl.store(h_ptr + pair[:, None].to(tl.int64) * inter + n[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=valid[:, None] & n_ok[None, :])

    @triton.autotune(configs=_configs(), key=["pairs_bucket", "hidden", "inter"])
    @triton.jit
    def _down_kernel(
        h_ptr, w_ptr, b_ptr, rw_ptr, out_ptr, pair_ptr, block_expert_ptr, ids_ptr,
        num_pairs, num_experts, hidden, inter, pairs_bucket,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
        DENSE: tl.constexpr, SPLIT_K: tl.constexpr,
    ):
        pid_n = tl.program_id(1)
        split = tl.program_id(2)  # this program's share of the hidden units (split-K); out[split] is its
        e, pair, valid = _block_rows(tl.program_id(0), pair_ptr, block_expert_ptr, ids_ptr, num_pairs, BLOCK_M, DENSE)
        if tl.max(valid.to(tl.int32), axis=0) == 0:
            return
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
        n_ok = n < hidden
        w_base = w_ptr + e * inter * hidden
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_len = tl.cdiv(tl.cdiv(inter, SPLIT_K), BLOCK_K) * BLOCK_K
        k_end = tl.minimum(split * k_len + k_len, inter)
        for k0 in range(split * k_len, k_end, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < k_end
            a = tl.load(h_ptr + pair[:, None].to(tl.int64) * inter + kk[None, :],
                        mask=valid[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_base + kk[:, None].to(tl.int64) * hidden + n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        bias = tl.load(b_ptr + e * hidden + n, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(split == 0, bias, 0.0)[None, :]
        weight = tl.load(rw_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        acc = acc * weight[:, None]
        out = out_ptr + (split * num_pairs + pair[:, None]).to(tl.int64) * hidden + n[None, :]
        tl.store(out, acc, mask=valid[:, None] & n_ok[None, :])

    @triton.jit
    def _layout_count_kernel(ids_ptr, hist_ptr, pair_ptr, P, E, rows, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
        """Chunk c = program_id(0) of the expert ids: its count per expert -> hist[c]; and its share of the rows of
        pair_ptr set to P (empty), before the scatter fills the used ones."""
        c = tl.program_id(0)
        i = c * CHUNK + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + i, mask=i < P, other=E)  # E: another rank's expert, not counted
        e = tl.arange(0, BLOCK_E)
        tl.store(hist_ptr + c * BLOCK_E + e, tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0))
        step = tl.num_programs(0) * CHUNK
        for r0 in range(c * CHUNK, rows, step):
            r = r0 + tl.arange(0, CHUNK)
            tl.store(pair_ptr + r, tl.full((CHUNK,), 0, tl.int64) + P, mask=r < rows)

    @triton.jit
    def _layout_offsets_kernel(hist_ptr, off_ptr, block_expert_ptr, chunks, E, num_blocks, BM,
                               BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
        """One program: each expert's run of rows (its count rounded up to BM), where each chunk's pairs of it
        start in that run -> off[c]; and each block's expert (E past the last run) -> block_expert. The chunks'
        counts are read BLOCK_C at a time (one load a step, not one a chunk: each waits on memory)."""
        e = tl.arange(0, BLOCK_E)
        cc = tl.arange(0, BLOCK_C)
        counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for c0 in range(0, chunks, BLOCK_C):
            c = c0 + cc
            counts += tl.sum(tl.load(hist_ptr + c[:, None] * BLOCK_E + e[None, :], mask=(c < chunks)[:, None],
                                     other=0), axis=0)
        padded = (counts + BM - 1) // BM * BM
        end = tl.cumsum(padded, axis=0)
        at = end - padded
        for c0 in range(0, chunks, BLOCK_C):
            c = c0 + cc
            h = tl.load(hist_ptr + c[:, None] * BLOCK_E + e[None, :], mask=(c < chunks)[:, None], other=0)
            tl.store(off_ptr + c[:, None] * BLOCK_E + e[None, :], at[None, :] + tl.cumsum(h, axis=0) - h,
                     mask=(c < chunks)[:, None])
            at += tl.sum(h, axis=0)
        end = tl.where(e < E, end, 2147483647)  # (lanes past the experts never count)
        for b0 in range(0, num_blocks, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            first_row = b * BM
            owner = tl.sum((end[None, :] <= first_row[:, None]).to(tl.int32), axis=1)  # runs ending at or before
            tl.store(block_expert_ptr + b, owner.to(tl.int64), mask=b < num_blocks)

    @triton.jit
    def _layout_scatter_kernel(ids_ptr, off_ptr, pair_ptr, P, E, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
        """Chunk c's pairs to their rows: its expert's start for this chunk + the pair's rank among the chunk's
        pairs of that expert (in pair order: the layout is the stable sort's)."""
        c = tl.program_id(0)
        i = c * CHUNK + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + i, mask=i < P, other=E)
        e = tl.arange(0, BLOCK_E)
        hot = (ids[:, None] == e[None, :]).to(tl.int32)
        rank = tl.cumsum(hot, axis=0)  # [CHUNK, BLOCK_E]: 1 for a chunk's first pair of an expert
        start = tl.load(off_ptr + c * BLOCK_E + e)
        row = tl.sum(hot * (start[None, :] + rank - 1), axis=1)
        tl.store(pair_ptr + row, i.to(tl.int64), mask=(i < P) & (ids < E))


def autotune_bucket(num_pairs: int, exact_up_to: int) -> int:
    """The pair count the MoE kernels key their autotuning on: exact up to `exact_up_to` (decode sizes), the next
    power of two beyond (prefill sizes vary, and a new key mid-serving stalls every stream while it tunes; the
    batcher's warm-up reaches every power of two)."""
    return num_pairs if num_pairs <= exact_up_to else 1 << (num_pairs - 1).bit_length()


LAYOUT_CHUNK = 64
"""Pairs per program of the block layout's count and scatter kernels (a [64, experts] one-hot each)."""


def block_layout(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs sorted by expert in blocks of `block_m` rows of one expert each.

    expert_ids: [P] expert of each (token, expert) pair; `num_experts` = not on this rank.
    Returns (pair id per padded row [num_blocks * block_m], P marks an empty row;
             expert per block [num_blocks], num_experts marks an empty block).
    num_blocks = ceil(P / block_m) + num_experts, an upper bound, so shapes never depend on routing.
    Pairs of one expert keep their order (a stable sort). Where Triton runs and torch is not compiling: three
    launches (count per chunk of pairs, the experts' runs and each chunk's place in them, scatter) instead of
    torch's sort and a dozen small ops, which an eager prefill runs one by one (~80 us a layer at 4,096 pairs on the
    H200). A compiled step keeps the torch ops, which inductor fuses into a few kernels beside the sort.
    """
    p = expert_ids.numel()
    dev = expert_ids.device
    num_blocks = -(-p // block_m) + num_experts
    if p and num_experts <= 256 and eager_launch(dev):
        ids = expert_ids.contiguous()
        chunks = triton.cdiv(p, LAYOUT_CHUNK)
        block_e = triton.next_power_of_2(num_experts)
        hist = torch.empty((chunks, block_e), dtype=torch.int32, device=dev)
        offsets = torch.empty_like(hist)
        pair = torch.empty(num_blocks * block_m, dtype=torch.long, device=dev)
        block_expert = torch.empty(num_blocks, dtype=torch.long, device=dev)
        _layout_count_kernel[(chunks,)](ids, hist, pair, p, num_experts, pair.numel(), CHUNK=LAYOUT_CHUNK,
                                        BLOCK_E=block_e)
        _layout_offsets_kernel[(1,)](hist, offsets, block_expert, chunks, num_experts, num_blocks, block_m,
                                     BLOCK_E=block_e, BLOCK_B=64, BLOCK_C=max(1, 4096 // block_e))
        _layout_scatter_kernel[(chunks,)](ids, offsets, pair, p, num_experts, CHUNK=LAYOUT_CHUNK, BLOCK_E=block_e)
        return pair, block_expert
    return block_layout_reference(expert_ids, num_experts, block_m)


def block_layout_reference(expert_ids: torch.Tensor, num_experts: int, block_m: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """block_layout in torch ops (a stable sort, counts, cumsums, a search): the CPU path and the kernels' oracle."""
    p = expert_ids.numel()
    dev = expert_ids.device
    num_blocks = -(-p // block_m) + num_experts
    _, order = torch.sort(expert_ids, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=dev)
    counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    raw_start = torch.cumsum(counts, 0) - counts
    rows = torch.arange(num_blocks * block_m, device=dev)
    block_expert = torch.searchsorted(pad_end, torch.arange(num_blocks, device=dev) * block_m, right=True)
    e = block_expert[rows // block_m]
    e_c = e.clamp(max=num_experts - 1)
    off = rows - pad_start[e_c]
    valid = (e < num_experts) & (off < counts[e_c])
    pair = torch.where(valid, order[(raw_start[e_c] + off).clamp(max=p - 1)], torch.full_like(rows, p))
    return pair, block_expert


def fused_experts(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    gate_up: torch.Tensor, gate_up_bias: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor,
    limit: float = 7.0, alpha: float = 1.702,
) -> torch.Tensor:
    """x [T, H], top_k_index/top_k_weights [T, k], gate_up [E, H, 2I], down [E, I, H] -> [T, H]."""
    if not HAVE_TRITON:
        raise RuntimeError("experts=triton needs the triton package: pip install triton (CUDA torch brings it)")
    t, hidden = x.shape
    top_k = top_k_index.shape[1]
    num_experts, _, two_inter = gate_up.shape
    check_dense(gate_up=gate_up, gate_up_bias=gate_up_bias, down=down, down_bias=down_bias)
    inter = two_inter // 2
    p = t * top_k
    ids = top_k_index.reshape(-1).contiguous()
    dense = p <= DENSE_MAX_PAIRS
    if dense:  # decode: no sorting; program m is expert m and picks its pairs from all p
        block_m = max(16, triton.next_power_of_2(p))
        pair = block_expert = ids  # unused
        num_blocks = num_experts
    else:
        block_m = 16 if p <= 256 else 64
        pair, block_expert = block_layout(ids, num_experts, block_m)
        num_blocks = block_expert.numel()
    # a batch of one reads 4 experts: split the down projection's K so that enough programs stream
    split_k = DOWN_SPLIT_K if p <= top_k else 1
    h = torch.empty((p, inter), dtype=x.dtype, device=x.device)
    out = torch.zeros((split_k, p, hidden), dtype=torch.float32, device=x.device)
    ieee = x.dtype == torch.float32
    x = x.contiguous()
    bucket = autotune_bucket(p, DENSE_MAX_PAIRS)
    _gate_up_kernel[lambda meta: (num_blocks, triton.cdiv(inter, meta["BLOCK_N"]))](
        x, gate_up, gate_up_bias, h, pair, block_expert, ids, p, num_experts, hidden, inter, bucket, float(limit),
        float(alpha), TOP_K=top_k, BLOCK_M=block_m, IEEE=ieee, DENSE=dense,
    )
    weights = top_k_weights.reshape(-1).float().contiguous()
    _down_kernel[lambda meta: (num_blocks, triton.cdiv(hidden, meta["BLOCK_N"]), split_k)](
        h, down, down_bias, weights, out, pair, block_expert, ids, p, num_experts, hidden, inter, bucket,
        BLOCK_M=block_m, IEEE=ieee, DENSE=dense, SPLIT_K=split_k,
    )
    return out.view(split_k, t, top_k, hidden).sum((0, 2)).to(x.dtype)


def reference_experts(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    gate_up: torch.Tensor, gate_up_bias: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor,
    limit: float = 7.0, alpha: float = 1.702,
) -> torch.Tensor:
    """The same function in plain torch, one expert at a time (the CPU fallback and the test oracle)."""
    return reference_by_expert(x, top_k_index, top_k_weights, gate_up.shape[0], lambda e: (gate_up[e], down[e]),
                               gate_up_bias, down_bias, limit, alpha)


def reference_by_expert(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int,
    expert_weights: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    gate_up_bias: torch.Tensor, down_bias: torch.Tensor, limit: float, alpha: float,
) -> torch.Tensor:
    """The experts in torch, matmuls in fp32; `expert_weights(e)` gives expert e's (gate_up [H, 2I],
    down [I, H]), asked only for the experts some token is routed to. Syncs with the host."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(num_experts):
        tok, slot = torch.where(top_k_index == e)
        if tok.numel() == 0:
            continue
        w_gu, w_d = expert_weights(e)
        gu = x[tok].float() @ w_gu.float() + gate_up_bias[e].float()
        gate, up = gu[:, ::2].clamp(max=limit), gu[:, 1::2].clamp(-limit, limit)
        hid = (up + 1) * gate * torch.sigmoid(gate * alpha)
        y = hid.to(x.dtype).float() @ w_d.float() + down_bias[e].float()
        out.index_add_(0, tok, y * top_k_weights[tok, slot, None].float())
    return out.to(x.dtype)


def experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts-implementation signature, for GptOssExperts modules."""
    fn = fused_experts if triton_usable(hidden_states.device) else reference_experts
    return fn(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.gate_up_proj_bias,
              self.down_proj, self.down_proj_bias, limit=self.limit, alpha=self.alpha)
