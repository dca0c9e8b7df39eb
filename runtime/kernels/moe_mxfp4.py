"""Fused MoE experts straight from MXFP4 weights, in Triton: the 4-bit values are dequantized in
registers inside the matmul, so no bf16 copy of an expert ever exists.

Registered with transformers as the experts implementation `mxfp4` (conf/experts/mxfp4.yaml). The
GptOssExperts modules then hold, instead of bf16 `gate_up_proj`/`down_proj`, the checkpoint's tensors
as loaded (runtime/model.py), sliced per rank (runtime/parallelize.py):

    gate_up_proj_blocks [E, 2I, H/32, 16] uint8   gate_up_proj_scales [E, 2I, H/32] uint8
    down_proj_blocks    [E, H, I/32, 16]  uint8   down_proj_scales    [E, H, I/32]  uint8
    gate_up_proj_bias   [E, 2I]                   down_proj_bias      [E, H]

A weight row (one output unit) is K/2 contiguous bytes: byte b of group g holds input 32g+2b in its
low nibble and 32g+2b+1 in its high nibble, as E2M1 codes; the group's value is code * 2^(scale-127).
gate_up rows alternate gate/up per hidden unit (row 2j = gate j, row 2j+1 = up j), as in
transformers' parameter layout.

Same function as runtime/kernels/moe.py (and transformers' eager experts): per (token, expert) pair,
gate_up = x @ W_gu[e]^T + b_gu[e], out = ((clamp(up) + 1) * g * sigmoid(1.702 g)) @ W_d[e]^T + b_d[e]
with g = min(gate, limit), times the routing weight, summed over the token's experts.

Dequantizing in registers: a byte's two E2M1 codes are moved into the fp16 bit layout with a few
integer ops (an fp16 read of a code is its value * 2^-14, exactly), widened to fp32, and scaled by
2^(scale - 113) built from the E8M0 byte. The blocks launch feeds the activations in split order (even
inputs, then odd ones) so that the inputs a byte's low and high nibbles multiply are contiguous runs.

Two launch shapes, chosen from the number of (token, expert) pairs P = tokens * top_k alone (never
from the routing, so shapes are fixed and the whole thing is capturable in a CUDA graph):
- decode (P <= DECODE_MAX_PAIRS): one program per pair and tile of output rows, a GEMV with FMAs (no
  tensor cores, no shared-memory round trip for the dequantized tile, no sorting or copy kernels: the
  two kernels and the final sum are all it launches). Pairs of the same expert run side by side, so a
  repeated expert's weights come from L2.
- batch/prefill: moe.block_layout sorts the pairs by expert into blocks of BLOCK_M rows; a block
  dequantizes each weight tile once for all its rows and multiplies with tl.dot.
Expert id `num_experts` marks a pair routed to another rank (expert parallel): it is skipped.

Where Triton cannot run (no GPU, and not TRITON_INTERPRET=1) `reference_mxfp4_experts` runs instead:
each hit expert dequantized in turn (runtime.checkpoint.dequantize_mxfp4), then matmul.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from runtime import checkpoint
from runtime.errors import UserError
from runtime.kernels.moe import (HAVE_TRITON, block_layout, check_dense, reference_by_expert, tile_configs,
                                 triton_usable)

NAME = "mxfp4"
DECODE_MAX_PAIRS = 64
"""Up to this many (token, expert) pairs (16 tokens at top-4) the GEMV launch is used."""
MIN_CAPABILITY = (8, 0)
MXFP4_PARAMS = ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")

if HAVE_TRITON:
    import triton
    import triton.language as tl


class MXFP4KernelError(UserError):
    """The MXFP4 experts kernel cannot run on this device; the message names the fix."""


def check_device(device: torch.device, capability: tuple[int, int] | None = None) -> None:
    """Refuse GPUs the kernel was not written for (bf16 tensor cores: compute capability >= 8.0)."""
    if device.type != "cuda":
        return
    cap = capability or torch.cuda.get_device_capability(device)
    if tuple(cap) < MIN_CAPABILITY:
        raise MXFP4KernelError(
            f"experts=mxfp4 needs a GPU of compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
            f"(bf16 tensor cores); {torch.cuda.get_device_name(device) if capability is None else 'this GPU'} has "
            f"{cap[0]}.{cap[1]}: use experts=grouped_mm, which dequantizes the MXFP4 experts at load"
        )


# ------------------------------------------------------------------------------------------ kernels


def _decode_configs() -> list:
    """GEMV tiles (BLOCK_N output rows or hidden units x BLOCK_K inputs)."""
    return tile_configs([(8, 256, 2, 3), (16, 256, 4, 3), (32, 256, 4, 3), (16, 512, 4, 2), (32, 128, 4, 4),
                         (64, 128, 4, 3), (32, 512, 8, 2), (64, 256, 8, 3)], interpreted=(16, 64))


def _dot_configs() -> list:
    """tl.dot tiles for blocks of BLOCK_M pairs."""
    return tile_configs([(32, 128, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
                         (64, 256, 8, 3)], interpreted=(32, 64))


if HAVE_TRITON:

    @triton.jit
    def _e2m1(wb):
        """uint8 bytes [...] -> (low, high) nibbles as floats [...], each E2M1 value * 2^-14.

        Both nibbles are moved into the fp16 bit layout of one 32-bit word at once: magnitude bits
        (exponent 2 bits, mantissa 1 bit) to fp16 bits 9-11 of each half, sign to bit 15. An E2M1
        code read as fp16 is its value * 2^-14, subnormals (0.5) included; fp16 -> fp32 is exact.
        """
        v = wb.to(tl.uint32)
        packed = ((v * 0x200200) & 0x0E000E00) | ((v * 0x1001000) & 0x80008000)
        lo = packed.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (packed >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, hi

    @triton.jit
    def _scale(s):
        """E8M0 exponents (uint8) -> 2^(s - 127 + 14) as fp32 (the 2^14 undoes _e2m1's 2^-14)."""
        return (tl.minimum(s.to(tl.uint32) + 14, 255) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _gemv(x_ptr, wb_ptr, ws_ptr, rows, rows_ok, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """sum_k x[k] * W[rows, k] for one input row x [K] and MXFP4 rows of W -> [BLOCK_R] fp32."""
        groups = K // 32
        gi = tl.arange(0, BLOCK_K // 32)
        bi = tl.arange(0, 16)
        row_off = rows.to(tl.int64) * groups
        acc = tl.zeros((BLOCK_R, BLOCK_K // 32), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            g = k0 // 32 + gi  # [NG] groups of this tile
            g_ok = g < groups
            w_mask = rows_ok[:, None, None] & g_ok[None, :, None]
            wb = tl.load(wb_ptr + (row_off[:, None, None] + g[None, :, None]) * 16 + bi[None, None, :],
                         mask=w_mask, other=0)  # [R, NG, 16] bytes
            s = tl.load(ws_ptr + row_off[:, None] + g[None, :], mask=rows_ok[:, None] & g_ok[None, :], other=0)
            k = g[:, None] * 32 + 2 * bi[None, :]  # [NG, 16] byte j = 16g + b holds inputs 2j and 2j+1
            xe = tl.load(x_ptr + k, mask=g_ok[:, None], other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + k + 1, mask=g_ok[:, None], other=0.0).to(tl.float32)
            lo, hi = _e2m1(wb)
            part = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)  # [R, NG], unscaled
            acc += part * _scale(s)
        return tl.sum(acc, axis=1)

    @triton.jit
    def _dot(x_ptr, x_row, x_ok, wb_ptr, ws_ptr, rows, rows_ok, K,
             BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        """x[x_row] [M, K] @ W[rows]^T with MXFP4 rows of W -> [BLOCK_M, BLOCK_R] fp32.

        x rows in split order [x0, x2, x4, ... | x1, x3, ...] (K/2 even inputs, then K/2 odd): the inputs
        that the tile's low and high nibbles multiply are then contiguous runs (vector loads).
        """
        groups = K // 32
        gi = tl.arange(0, BLOCK_K // 32)
        bi = tl.arange(0, 16)
        j = tl.arange(0, BLOCK_K // 2)  # byte j of the tile = inputs 2j (low nibble), 2j+1 (high)
        row_off = rows.to(tl.int64) * groups
        x_base = x_ptr + x_row.to(tl.int64)[:, None] * K
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            g = k0 // 32 + gi
            g_ok = g < groups
            wb = tl.load(wb_ptr + (row_off[:, None, None] + g[None, :, None]) * 16 + bi[None, None, :],
                         mask=rows_ok[:, None, None] & g_ok[None, :, None], other=0)  # [R, NG, 16]
            s = _scale(tl.load(ws_ptr + row_off[:, None] + g[None, :], mask=rows_ok[:, None] & g_ok[None, :],
                               other=0))[:, :, None]
            lo, hi = _e2m1(wb)
            lo = tl.reshape(lo * s, (BLOCK_R, BLOCK_K // 2)).to(x_ptr.dtype.element_ty)
            hi = tl.reshape(hi * s, (BLOCK_R, BLOCK_K // 2)).to(x_ptr.dtype.element_ty)
            jj = k0 // 2 + j
            x_mask = x_ok[:, None] & (jj < K // 2)[None, :]
            xe = tl.load(x_base + jj[None, :], mask=x_mask, other=0.0)  # [M, BLOCK_K/2] even inputs
            xo = tl.load(x_base + K // 2 + jj[None, :], mask=x_mask, other=0.0)  # odd inputs
            if IEEE:
                acc += tl.dot(xe, tl.trans(lo), input_precision="ieee")
                acc += tl.dot(xo, tl.trans(hi), input_precision="ieee")
            else:
                acc += tl.dot(xe, tl.trans(lo))
                acc += tl.dot(xo, tl.trans(hi))
        return acc

    @triton.jit
    def _gate_up_kernel(
        x_ptr, wb_ptr, ws_ptr, b_ptr, h_ptr, pair_ptr, expert_ptr,
        num_pairs, num_experts, hidden, inter, pairs_bucket, limit, alpha,
        TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """h[pair, units] = SwiGLU(x[token] @ W_gu[e]^T + b_gu[e]) for BLOCK_N hidden units (2*BLOCK_N rows).

        Blocks (BLOCK_M > 1): x rows and h rows in split order (see _dot); decode: in natural order.
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(expert_ptr + pid_m)  # decode: the pair's expert; blocks: the block's expert
        if e >= num_experts:
            return
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # hidden units
        r = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)  # their gate/up rows, interleaved
        r_ok = r < 2 * inter
        groups = hidden // 32
        wb = wb_ptr + e.to(tl.int64) * (2 * inter) * groups * 16
        ws = ws_ptr + e.to(tl.int64) * (2 * inter) * groups
        if BLOCK_M == 1:
            pair = pid_m + tl.zeros((1,), dtype=tl.int32)
            acc = _gemv(x_ptr + (pid_m // TOP_K).to(tl.int64) * hidden, wb, ws, r, r_ok, hidden,
                        2 * BLOCK_N, BLOCK_K)[None, :]
        else:
            pair = tl.load(pair_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
            acc = _dot(x_ptr, pair // TOP_K, pair < num_pairs, wb, ws, r, r_ok, hidden,
                       BLOCK_M, 2 * BLOCK_N, BLOCK_K, IEEE)
        valid = pair < num_pairs
        acc += tl.load(b_ptr + e.to(tl.int64) * (2 * inter) + r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        h = (up + 1.0) * gate * tl.sigmoid(gate * alpha)
        if BLOCK_M == 1:
            col = n
        else:
            col = (n % 2) * (inter // 2) + n // 2  # unit n's place in split order
        tl.store(h_ptr + pair[:, None].to(tl.int64) * inter + col[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=valid[:, None] & (n < inter)[None, :])

    @triton.jit
    def _down_kernel(
        h_ptr, wb_ptr, ws_ptr, b_ptr, rw_ptr, out_ptr, pair_ptr, expert_ptr,
        num_pairs, num_experts, hidden, inter, pairs_bucket,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    ):
        """out[pair, n] = (h[pair] @ W_d[e]^T + b_d[e]) * routing weight, for BLOCK_N output features."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(expert_ptr + pid_m)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < hidden
        if e >= num_experts:
            if BLOCK_M == 1:  # a pair routed to another rank: its row is 0 here (out is not zeroed first)
                tl.store(out_ptr + pid_m.to(tl.int64) * hidden + n, tl.zeros((BLOCK_N,), out_ptr.dtype.element_ty),
                         mask=n_ok)
            return
        groups = inter // 32
        wb = wb_ptr + e.to(tl.int64) * hidden * groups * 16
        ws = ws_ptr + e.to(tl.int64) * hidden * groups
        if BLOCK_M == 1:
            pair = pid_m + tl.zeros((1,), dtype=tl.int32)
            acc = _gemv(h_ptr + pid_m.to(tl.int64) * inter, wb, ws, n, n_ok, inter, BLOCK_N, BLOCK_K)[None, :]
        else:
            pair = tl.load(pair_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
            acc = _dot(h_ptr, pair, pair < num_pairs, wb, ws, n, n_ok, inter, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
        valid = pair < num_pairs
        acc += tl.load(b_ptr + e.to(tl.int64) * hidden + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        weight = tl.load(rw_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        acc = acc * weight[:, None]
        tl.store(out_ptr + pair[:, None].to(tl.int64) * hidden + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & n_ok[None, :])

    _KEY = ["pairs_bucket", "hidden", "inter"]
    _gate_up_decode = triton.autotune(configs=_decode_configs(), key=_KEY)(_gate_up_kernel)
    _gate_up_blocks = triton.autotune(configs=_dot_configs(), key=_KEY)(_gate_up_kernel)
    _down_decode = triton.autotune(configs=_decode_configs(), key=_KEY)(_down_kernel)
    _down_blocks = triton.autotune(configs=_dot_configs(), key=_KEY)(_down_kernel)


# ------------------------------------------------------------------------------------------ launch


def plan(num_pairs: int) -> int:
    """Rows per block for P pairs: 1 = the decode GEMV launch (no sorting), else the tl.dot blocks."""
    if num_pairs <= DECODE_MAX_PAIRS:
        return 1
    return 16 if num_pairs <= 256 else 64


def _bucket(num_pairs: int) -> int:
    """Autotuning key: exact at decode sizes, powers of two beyond (prefill lengths vary per batch, and
    each new key costs an autotuning run)."""
    return num_pairs if num_pairs <= DECODE_MAX_PAIRS else 1 << (num_pairs - 1).bit_length()


def fused_mxfp4_experts(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor, gate_up_bias: torch.Tensor,
    down_blocks: torch.Tensor, down_scales: torch.Tensor, down_bias: torch.Tensor,
    limit: float = 7.0, alpha: float = 1.702, block_m: int | None = None, config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """x [T, H], top_k_index/top_k_weights [T, k] (index E = another rank's expert) -> [T, H].

    gate_up_blocks [E, 2I, H/32, 16], gate_up_scales [E, 2I, H/32], gate_up_bias [E, 2I],
    down_blocks [E, H, I/32, 16], down_scales [E, H, I/32], down_bias [E, H].
    block_m / config (BLOCK_N, BLOCK_K, num_warps) override the automatic choice (tests, tuning).
    """
    if not HAVE_TRITON:
        raise RuntimeError("experts=mxfp4 needs the triton package: pip install triton (CUDA torch brings it)")
    t, hidden = x.shape
    top_k = top_k_index.shape[1]
    num_experts, two_inter = gate_up_blocks.shape[:2]
    check_dense(gate_up_blocks=gate_up_blocks, gate_up_scales=gate_up_scales, gate_up_bias=gate_up_bias,
                down_blocks=down_blocks, down_scales=down_scales, down_bias=down_bias)
    inter = two_inter // 2
    p = t * top_k
    block_m = block_m or plan(p)
    ids = top_k_index.reshape(-1)  # [P]
    if block_m == 1:
        # Decode: one program per pair reads its expert id directly; x and h in natural order, and the
        # down kernel writes the rows of pairs routed elsewhere: no extra kernel besides the final sum.
        pair, expert = ids, ids
        xs = x.contiguous()
        out = torch.empty((p, hidden), dtype=x.dtype, device=x.device)
    else:
        pair, expert = block_layout(ids.long(), num_experts, block_m)
        # Non-empty blocks come first and there are at most P of them (each holds a pair): drop the rest.
        keep = min(expert.numel(), p)
        pair, expert = pair[: keep * block_m], expert[:keep]
        # Inputs in split order [x0, x2, ... | x1, x3, ...]: the even/odd inputs that a byte's two nibbles
        # multiply are then contiguous runs (vector loads); gate_up writes h in the same order.
        xs = x.reshape(t, hidden // 2, 2).transpose(1, 2).reshape(t, hidden)  # [T, H], one small copy
        out = torch.zeros((p, hidden), dtype=x.dtype, device=x.device)  # pairs routed elsewhere stay 0
    num_rows = expert.numel()
    h = torch.empty((p, inter), dtype=x.dtype, device=x.device)
    weights = top_k_weights.reshape(-1)
    ieee = x.dtype == torch.float32
    common = {"BLOCK_M": block_m, "IEEE": ieee}
    if config is None:
        gate_up, down = (_gate_up_decode, _down_decode) if block_m == 1 else (_gate_up_blocks, _down_blocks)
    else:
        gate_up, down = _gate_up_kernel, _down_kernel
        common.update(config)
    bucket = _bucket(p)
    gate_up[lambda meta: (num_rows, triton.cdiv(inter, meta["BLOCK_N"]))](
        xs, gate_up_blocks, gate_up_scales, gate_up_bias, h, pair, expert, p, num_experts, hidden, inter, bucket,
        float(limit), float(alpha), TOP_K=top_k, **common,
    )
    down[lambda meta: (num_rows, triton.cdiv(hidden, meta["BLOCK_N"]))](
        h, down_blocks, down_scales, down_bias, weights, out, pair, expert, p, num_experts, hidden, inter, bucket,
        **common,
    )
    return out.view(t, top_k, hidden).sum(1)  # accumulated in fp32 by torch, [T, H] in x's dtype


def reference_mxfp4_experts(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor, gate_up_bias: torch.Tensor,
    down_blocks: torch.Tensor, down_scales: torch.Tensor, down_bias: torch.Tensor,
    limit: float = 7.0, alpha: float = 1.702,
) -> torch.Tensor:
    """The same function in torch: each hit expert dequantized to x's dtype, then matmul in fp32
    (the test oracle, and the fallback where Triton cannot run). Syncs with the host."""
    def dequantized(e: int) -> tuple[torch.Tensor, torch.Tensor]:  # rows are output units: transpose
        return (checkpoint.dequantize_mxfp4(gate_up_blocks[e], gate_up_scales[e], x.dtype).T,  # [H, 2I]
                checkpoint.dequantize_mxfp4(down_blocks[e], down_scales[e], x.dtype).T)  # [I, H]

    return reference_by_expert(x, top_k_index, top_k_weights, gate_up_blocks.shape[0], dequantized,
                               gate_up_bias, down_bias, limit, alpha)


def experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts-implementation signature, for GptOssExperts modules holding MXFP4 tensors."""
    if not hasattr(self, "gate_up_proj_blocks"):
        raise MXFP4KernelError(
            "experts=mxfp4 needs the experts loaded in MXFP4 (runtime.model.build with experts=mxfp4); this module "
            "holds bf16 weights: use experts=triton for those"
        )
    fn = fused_mxfp4_experts if triton_usable(hidden_states.device) else reference_mxfp4_experts
    return fn(hidden_states, top_k_index, top_k_weights,
              self.gate_up_proj_blocks, self.gate_up_proj_scales, self.gate_up_proj_bias,
              self.down_proj_blocks, self.down_proj_scales, self.down_proj_bias, limit=self.limit, alpha=self.alpha)


def use_mxfp4_params(experts: torch.nn.Module) -> None:
    """Swap a (meta) GptOssExperts' bf16 weight parameters for MXFP4 ones in the checkpoint layout.

    The module stays transformers' own; only `gate_up_proj`/`down_proj` are replaced by uint8
    `*_blocks`/`*_scales` of the same names as in the checkpoint (the biases stay). Shapes are the
    module's (all experts); runtime.parallelize shrinks them per rank.
    """
    e, h, i = experts.num_experts, experts.hidden_size, experts.intermediate_size
    dev = experts.gate_up_proj.device
    shapes = {
        "gate_up_proj_blocks": (e, 2 * i, h // 32, 16), "gate_up_proj_scales": (e, 2 * i, h // 32),
        "down_proj_blocks": (e, h, i // 32, 16), "down_proj_scales": (e, h, i // 32),
    }
    del experts.gate_up_proj, experts.down_proj
    for name, shape in shapes.items():
        experts.register_parameter(
            name, torch.nn.Parameter(torch.empty(shape, dtype=torch.uint8, device=dev), requires_grad=False))

