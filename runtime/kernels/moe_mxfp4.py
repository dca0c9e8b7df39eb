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


def _configs() -> list:
    """Tiles (BLOCK_N weight rows or hidden units, BLOCK_K inputs, warps, stages) for both launches."""
    return tile_configs([(64, 128, 4, 3), (64, 256, 4, 3), (128, 128, 4, 3), (128, 256, 8, 3), (32, 256, 4, 3),
                         (64, 512, 4, 2), (128, 64, 4, 4), (32, 512, 4, 2)], interpreted=(16, 64))


# A 16-bit unit of the kernel layout holds four E2M1 codes, those of two checkpoint bytes b0, b1 (inputs
# 4u .. 4u+3 of the row: byte i holds input 4u+2i in its low nibble, 4u+2i+1 in its high one), placed so
# that a few shifts and masks of the unit (u, zero-extended to 32 bits) put the codes of the even inputs,
# then of the odd ones, straight into bf16 pairs: magnitude (exponent 2 bits, mantissa 1) in bf16 bits 6-8
# and sign in bit 15 of each half. Read as bf16, such a code is its value * 2^-126 (0.5 a subnormal), and
# one bf16x2 multiply by 2^(scale - 1) gives value * 2^(scale - 127), exactly.
#   even pair (inputs 0, 2) = (u | u << 19) & 0x81C081C0
#   odd pair  (inputs 1, 3) = u << 6 & 0x81C0 | u << 12 & 0x00C00000 | u << 11 & 0x01000000 | u << 17 & 0x80000000
# so per input, the unit bits holding its code's magnitude bits m0 m1 m2, then its sign:
_PLACES = {0: (6, 7, 8, 15), 2: (3, 4, 5, 12), 1: (0, 1, 2, 9), 3: (10, 11, 13, 14)}
# Two bytes per unit because that is what a thread holds side by side in the tensor-core operand layout
# Triton gives the weights (pairs along K), so each PTX call below sees one whole unit.


def _dequant_asm(large: bool) -> str:
    """PTX for one unit: $2 = the unit (16 bits), $3 = the group factor as a bf16 pair; $0 = inputs (0, 2),
    $1 = inputs (1, 3) as bf16 pairs. The products are exact: a bf16x2 fused multiply-add with -0.0 (sm_80
    and later); `large`: times 2^126 first, then the factor 2^(scale - 127)."""
    def scaled(reg: str) -> list[str]:
        if large:
            return [f"fma.rn.bf16x2 {reg}, t0, big, nz;", f"fma.rn.bf16x2 {reg}, {reg}, $3, nz;"]
        return [f"fma.rn.bf16x2 {reg}, t0, $3, nz;"]
    return "\n".join([
        "{", ".reg .b32 w, t0, t1, nz, big;", "mov.b32 nz, 0x80008000;", "mov.b32 big, 0x7E807E80;",
        "cvt.u32.u16 w, $2;",
        "shl.b32 t0, w, 19;", "or.b32 t0, t0, w;", "and.b32 t0, t0, 0x81C081C0;", *scaled("$0"),
        "shl.b32 t0, w, 6;", "and.b32 t0, t0, 0x000081C0;",
        "shl.b32 t1, w, 12;", "and.b32 t1, t1, 0x00C00000;", "or.b32 t0, t0, t1;",
        "shl.b32 t1, w, 11;", "and.b32 t1, t1, 0x01000000;", "or.b32 t0, t0, t1;",
        "shl.b32 t1, w, 17;", "and.b32 t1, t1, 0x80000000;", "or.b32 t0, t0, t1;", *scaled("$1"),
        "}",
    ])


if HAVE_TRITON:
    _ASM_EXACT = tl.constexpr(_dequant_asm(False))
    _ASM_LARGE = tl.constexpr(_dequant_asm(True))


def kernel_layout(blocks: torch.Tensor) -> torch.Tensor:
    """Checkpoint MXFP4 blocks [..., G, 16] uint8 -> the kernels' layout (same shape; see _PLACES): done
    once at load. The bits of each 2-byte unit are permuted; nothing else moves."""
    if blocks.shape[-1] != 16 or blocks.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks must be [..., G, 16] uint8, not {tuple(blocks.shape)} {blocks.dtype}")
    b = blocks.reshape(-1, 2).to(torch.int32)
    unit = torch.zeros(b.shape[0], dtype=torch.int32, device=blocks.device)
    for i, places in _PLACES.items():
        code = (b[:, i // 2] >> (4 * (i % 2))) & 0xF
        for bit, place in enumerate(places):
            unit |= ((code >> bit) & 1) << place
    out = torch.stack([unit & 0xFF, unit >> 8], 1).to(torch.uint8)
    return out.reshape(blocks.shape)


def checkpoint_layout(blocks: torch.Tensor) -> torch.Tensor:
    """The inverse of kernel_layout (tests, and to hand weights back in the checkpoint's layout)."""
    b = blocks.reshape(-1, 2).to(torch.int32)
    unit = b[:, 0] | b[:, 1] << 8
    out = torch.zeros(b.shape[0], 2, dtype=torch.int32, device=blocks.device)
    for i, places in _PLACES.items():
        code = sum(((unit >> place) & 1) << bit for bit, place in enumerate(places))
        out[:, i // 2] |= code << (4 * (i % 2))
    return out.to(torch.uint8).reshape(blocks.shape)


def large_scales(scales: torch.Tensor) -> bool:
    """Whether some group's scale exceeds 2 (E8M0 > 128): 2^(scale - 1) no longer fits bf16, and the
    kernels take the exact two-multiply path (decided once, at load)."""
    return bool(scales.numel()) and int(scales.max()) > 128


if HAVE_TRITON:

    @triton.jit
    def _scale_bf16(s, LARGE: tl.constexpr):
        """E8M0 exponents [..] uint8 -> the bf16 factor of each group: 2^(s - 1) (codes read as value *
        2^-126), or with LARGE 2^(s - 127) (the codes are first multiplied by 2^126)."""
        s = s.to(tl.uint32)
        if LARGE:
            bits = tl.where(s == 0, 0x40, s << 7)  # 2^-127 is a bf16 subnormal
        else:
            bits = (s + 126) << 7
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _code_value(x):
        """E2M1 codes placed as _dequant's bf16 halves (magnitude in bits 6-8, sign in 15 of the low 16 bits of
        uint32 words) -> their values in fp32, by the E2M1 rule (no subnormal arithmetic: the interpreter
        flushes those)."""
        m = ((x >> 6) & 1).to(tl.float32)
        e = ((x >> 7) & 3).to(tl.float32)
        mag = tl.where(e == 0, 0.5 * m, tl.exp2(e - 1.0) * (1.0 + 0.5 * m))
        return tl.where((x >> 15) & 1 == 1, -mag, mag)

    @triton.jit
    def _halves(r, R: tl.constexpr, C: tl.constexpr):
        """bf16-pair words [R, C/2] (one per unit) -> the values of their low and high halves [R, C] fp32."""
        return tl.reshape(tl.join(_code_value(r), _code_value(r >> 16)), (R, C))

    @triton.jit
    def _dequant(wb, sc, R: tl.constexpr, C: tl.constexpr, ASM: tl.constexpr, LARGE: tl.constexpr):
        """Kernel-layout bytes [R, C] uint8 and each byte's group factor [R, C] bf16 (_scale_bf16) ->
        the values of inputs 2j and of inputs 2j+1 for byte j, [R, C] bf16 each (exact).

        ASM: the PTX above, one unit (two bytes) per call; else the same bit operations in Triton (the
        interpreter)."""
        if ASM:
            if LARGE:
                even, odd = tl.inline_asm_elementwise(_ASM_LARGE, "=r,=r,h,r", [wb, sc],
                                                      dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
            else:
                even, odd = tl.inline_asm_elementwise(_ASM_EXACT, "=r,=r,h,r", [wb, sc],
                                                      dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
        else:
            b0, b1 = tl.split(tl.reshape(wb, (R, C // 2, 2)))
            u = b0.to(tl.uint32) | (b1.to(tl.uint32) << 8)
            even = _halves((u | (u << 19)) & 0x81C081C0, R, C)
            odd = _halves(((u << 6) & 0x000081C0) | ((u << 12) & 0x00C00000) | ((u << 11) & 0x01000000)
                          | ((u << 17) & 0x80000000), R, C)
            f = sc.to(tl.float32)  # 2^(s-1), or 2^(s-127) with LARGE, for codes read as value * 2^-126
            if not LARGE:
                f = f * 1.1754943508222875e-38  # 2^-126: the values above are the codes' own
            even = (even * f).to(tl.bfloat16)
            odd = (odd * f).to(tl.bfloat16)
        return even, odd

    @triton.jit
    def _mm(x_ptr, x_row, x_ok, X_SPLIT: tl.constexpr, wq_ptr, ws_ptr, rows, rows_ok, K,
            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
            ASM: tl.constexpr, LARGE: tl.constexpr, IEEE: tl.constexpr):
        """W[rows] @ x[x_row]^T -> [BLOCK_R, BLOCK_M] fp32, W in the kernel layout, on tensor cores with
        the weights as the left operand (a few tokens are the narrow side; padded rows masked).

        x rows [K]: in split order (X_SPLIT: K/2 even inputs, then K/2 odd ones, contiguous runs) or in
        natural order (stride-2 reads; decode, where x is a few KB)."""
        C: tl.constexpr = BLOCK_K // 2  # bytes of a row per tile
        j = tl.arange(0, C)
        gi = tl.arange(0, BLOCK_K // 32)
        bi = tl.arange(0, 16)
        row_b = rows.to(tl.int64) * (K // 32) * 16  # (a multiple of 16: vector loads)
        row_s = rows.to(tl.int64) * (K // 32)
        x_base = x_ptr + x_row.to(tl.int64)[None, :] * K  # [1, M]
        acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            jj = k0 // 2 + j
            j_ok = jj < K // 2
            g = k0 // 32 + gi
            g_ok = rows_ok[:, None] & (g < K // 32)[None, :]  # [R, NG]; constant along a group's 16 bytes
            wb = tl.load(wq_ptr + row_b[:, None, None] + (g * 16)[None, :, None] + bi[None, None, :],
                         mask=g_ok[:, :, None], other=0)
            wb = tl.reshape(wb, (BLOCK_R, C))
            s = tl.load(ws_ptr + row_s[:, None] + g[None, :], mask=g_ok, other=0)
            sc = tl.reshape(tl.broadcast_to(_scale_bf16(s, LARGE)[:, :, None], (BLOCK_R, BLOCK_K // 32, 16)),
                            (BLOCK_R, C))
            we, wo = _dequant(wb, sc, BLOCK_R, C, ASM, LARGE)
            x_mask = j_ok[:, None] & x_ok[None, :]
            if X_SPLIT:
                xe = tl.load(x_base + jj[:, None], mask=x_mask, other=0.0)  # [C, M]
                xo = tl.load(x_base + K // 2 + jj[:, None], mask=x_mask, other=0.0)
            else:
                xe = tl.load(x_base + 2 * jj[:, None], mask=x_mask, other=0.0)
                xo = tl.load(x_base + 2 * jj[:, None] + 1, mask=x_mask, other=0.0)
            if IEEE:
                acc = tl.dot(we.to(xe.dtype), xe, acc, input_precision="ieee")
                acc = tl.dot(wo.to(xo.dtype), xo, acc, input_precision="ieee")
            else:
                acc = tl.dot(we.to(xe.dtype), xe, acc)
                acc = tl.dot(wo.to(xo.dtype), xo, acc)
        return acc

    @triton.jit
    def _rows_of(pid_m, pair_ptr, expert_ptr, num_pairs, BLOCK_M: tl.constexpr, DECODE: tl.constexpr):
        """(expert, pair per column [BLOCK_M], column valid) of row block pid_m. DECODE: block m is pair m
        alone (its expert id read directly; no sorting); else moe.block_layout's blocks."""
        if DECODE:
            e = tl.load(expert_ptr + pid_m)
            pair = pid_m + tl.zeros((BLOCK_M,), dtype=tl.int32)
            valid = tl.arange(0, BLOCK_M) == 0
        else:
            e = tl.load(expert_ptr + pid_m)
            pair = tl.load(pair_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
            valid = pair < num_pairs
        return e, pair, valid

    @triton.jit
    def _gate_up_kernel(
        x_ptr, wb_ptr, ws_ptr, b_ptr, h_ptr, pair_ptr, expert_ptr,
        num_pairs, num_experts, hidden, inter, pairs_bucket, limit, alpha,
        TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DECODE: tl.constexpr, ASM: tl.constexpr, LARGE: tl.constexpr, IEEE: tl.constexpr,
    ):
        """h[pair, units] = SwiGLU(W_gu[e] @ x[token] + b_gu[e]) for BLOCK_N hidden units (2*BLOCK_N rows,
        gate/up interleaved); h is written in split order (the down kernel's x)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e, pair, valid = _rows_of(pid_m, pair_ptr, expert_ptr, num_pairs, BLOCK_M, DECODE)
        if e >= num_experts:
            return
        r = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)  # gate/up rows of these units, interleaved
        r_ok = r < 2 * inter
        groups = hidden // 32
        wb = wb_ptr + e.to(tl.int64) * (2 * inter) * groups * 16
        ws = ws_ptr + e.to(tl.int64) * (2 * inter) * groups
        acc = _mm(x_ptr, pair // TOP_K, valid, not DECODE, wb, ws, r, r_ok, hidden,
                  BLOCK_M, 2 * BLOCK_N, BLOCK_K, ASM, LARGE, IEEE)  # [2N, M]
        acc += tl.load(b_ptr + e.to(tl.int64) * (2 * inter) + r, mask=r_ok, other=0.0).to(tl.float32)[:, None]
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_N, 2, BLOCK_M)), (0, 2, 1)))  # [N, M] each
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        h = (up + 1.0) * gate * tl.sigmoid(gate * alpha)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # hidden units
        col = (n % 2) * (inter // 2) + n // 2  # unit n's place in split order
        tl.store(h_ptr + pair[None, :].to(tl.int64) * inter + col[:, None], h.to(h_ptr.dtype.element_ty),
                 mask=valid[None, :] & (n < inter)[:, None])

    @triton.jit
    def _down_kernel(
        h_ptr, wb_ptr, ws_ptr, b_ptr, rw_ptr, out_ptr, pair_ptr, expert_ptr,
        num_pairs, num_experts, hidden, inter, pairs_bucket,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DECODE: tl.constexpr, ASM: tl.constexpr, LARGE: tl.constexpr, IEEE: tl.constexpr,
    ):
        """out[pair, n] = (W_d[e] @ h[pair] + b_d[e]) * routing weight, for BLOCK_N output features."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e, pair, valid = _rows_of(pid_m, pair_ptr, expert_ptr, num_pairs, BLOCK_M, DECODE)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < hidden
        if e >= num_experts:
            if DECODE:  # a pair routed to another rank: its row is 0 here (out is not zeroed first)
                tl.store(out_ptr + pid_m.to(tl.int64) * hidden + n, tl.zeros((BLOCK_N,), out_ptr.dtype.element_ty),
                         mask=n_ok)
            return
        groups = inter // 32
        wb = wb_ptr + e.to(tl.int64) * hidden * groups * 16
        ws = ws_ptr + e.to(tl.int64) * hidden * groups
        acc = _mm(h_ptr, pair, valid, True, wb, ws, n, n_ok, inter, BLOCK_M, BLOCK_N, BLOCK_K, ASM, LARGE, IEEE)
        acc += tl.load(b_ptr + e.to(tl.int64) * hidden + n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        weight = tl.load(rw_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        acc = acc * weight[None, :]
        tl.store(out_ptr + pair[None, :].to(tl.int64) * hidden + n[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=valid[None, :] & n_ok[:, None])

    _KEY = ["pairs_bucket", "hidden", "inter"]
    _gate_up_tuned = triton.autotune(configs=_configs(), key=_KEY)(_gate_up_kernel)
    _down_tuned = triton.autotune(configs=_configs(), key=_KEY)(_down_kernel)


# ------------------------------------------------------------------------------------------ launch


def plan(num_pairs: int) -> int:
    """Columns per block for P pairs: 16, one pair per block at decode sizes (no sorting: block m is pair
    m), else 16 or 64 pairs of one expert per block (moe.block_layout)."""
    return 16 if num_pairs <= 256 else 64


def _bucket(num_pairs: int) -> int:
    """Autotuning key: exact at decode sizes, powers of two beyond (prefill lengths vary per batch, and
    each new key costs an autotuning run)."""
    return num_pairs if num_pairs <= DECODE_MAX_PAIRS else 1 << (num_pairs - 1).bit_length()


def use_asm(device: torch.device) -> bool:
    """The PTX dequantization runs on GPUs; Triton's CPU interpreter runs the same bit operations in Triton."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"


def fused_mxfp4_experts(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor, gate_up_bias: torch.Tensor,
    down_blocks: torch.Tensor, down_scales: torch.Tensor, down_bias: torch.Tensor,
    limit: float = 7.0, alpha: float = 1.702, large: bool = False, config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """x [T, H], top_k_index/top_k_weights [T, k] (index E = another rank's expert) -> [T, H].

    gate_up_blocks [E, 2I, H/32, 16] and down_blocks [E, H, I/32, 16] in the kernel layout (kernel_layout()
    of the checkpoint's), gate_up_scales [E, 2I, H/32], gate_up_bias [E, 2I], down_scales [E, H, I/32],
    down_bias [E, H]. large: some scale exceeds 2 (large_scales()). config (BLOCK_N, BLOCK_K, num_warps)
    overrides the autotuned tile (tests).
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
    block_m = plan(p)
    decode = p <= DECODE_MAX_PAIRS
    ids = top_k_index.reshape(-1)  # [P]
    if decode:
        # One block per pair reading its expert id directly, x in natural order; the down kernel writes the
        # rows of pairs routed elsewhere: nothing launches besides the two kernels and the final sum.
        pair, expert = ids, ids
        xs = x.contiguous()
        out = torch.empty((p, hidden), dtype=x.dtype, device=x.device)
    else:
        pair, expert = block_layout(ids.long(), num_experts, block_m)
        # Non-empty blocks come first and there are at most P of them (each holds a pair): drop the rest.
        keep = min(expert.numel(), p)
        pair, expert = pair[: keep * block_m], expert[:keep]
        # Inputs in split order [x0, x2, ... | x1, x3, ...]: the even/odd inputs that a byte's two nibbles
        # multiply are then contiguous runs (vector loads).
        xs = x.reshape(t, hidden // 2, 2).transpose(1, 2).reshape(t, hidden)  # [T, H], one small copy
        out = torch.zeros((p, hidden), dtype=x.dtype, device=x.device)  # pairs routed elsewhere stay 0
    num_rows = expert.numel()
    h = torch.empty((p, inter), dtype=x.dtype, device=x.device)  # in split order
    weights = top_k_weights.reshape(-1)
    common = {"BLOCK_M": block_m, "DECODE": decode, "ASM": use_asm(x.device), "LARGE": bool(large),
              "IEEE": x.dtype == torch.float32}
    if config is None:
        gate_up, down = _gate_up_tuned, _down_tuned
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
    weights = (self.gate_up_proj_blocks, self.gate_up_proj_scales, self.gate_up_proj_bias,
               self.down_proj_blocks, self.down_proj_scales, self.down_proj_bias)
    kernel = getattr(self, "mxfp4_kernel_layout", None)
    if triton_usable(hidden_states.device):
        if kernel is None:
            raise MXFP4KernelError("the MXFP4 experts are still in the checkpoint's layout: call "
                                   "runtime.kernels.moe_mxfp4.prepare(module) once after loading (runtime.model.build does)")
        return fused_mxfp4_experts(hidden_states, top_k_index, top_k_weights, *weights, limit=self.limit,
                                   alpha=self.alpha, large=kernel["large"])
    if kernel is not None:  # moved off the GPU after prepare(): back to the checkpoint's layout for the reference
        weights = (checkpoint_layout(weights[0]), *weights[1:3], checkpoint_layout(weights[3]), *weights[4:])
    return reference_mxfp4_experts(hidden_states, top_k_index, top_k_weights, *weights, limit=self.limit,
                                   alpha=self.alpha)


def prepare(experts: torch.nn.Module) -> None:
    """Once after loading, where the fused kernels will run: the blocks into the kernels' layout (in place,
    same shapes and bytes) and the scale check; the module is marked so it is done once."""
    if getattr(experts, "mxfp4_kernel_layout", None) is not None or not triton_usable(experts.gate_up_proj_blocks.device):
        return
    for name in ("gate_up_proj_blocks", "down_proj_blocks"):
        blocks = getattr(experts, name).data
        for e in range(blocks.shape[0]):  # an expert at a time: the temporaries stay small
            blocks[e] = kernel_layout(blocks[e])
    experts.mxfp4_kernel_layout = {
        "large": large_scales(experts.gate_up_proj_scales) or large_scales(experts.down_proj_scales)}


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

