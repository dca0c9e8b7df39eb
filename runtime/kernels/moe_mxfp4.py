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

Dequantizing in registers: E2M1 codes are moved into the fp16 bit layout with a few integer ops (an
fp16 read of a code is its value * 2^-14, exactly) and scaled by 2^(scale - 113) built from the E8M0
byte. The blocks launch widens them to fp32, scales, and feeds tl.dot with the activations in split order
(even inputs, then odd ones) so that the inputs a byte's low and high nibbles multiply are contiguous
runs. The decode GEMV never leaves fp16x2 until a group's sum: nibbles p and p+4 of a 32-bit word become
one fp16x2 value (11 integer operations for a word's 4 pairs) that meets its two inputs in one fma.rn.f16x2
(inline PTX, _group_dot_asm); the inputs are packed to fp16 in pair_order for that, scaled per row into the top fp16
octave (FP16_TOP_EXP), and gate_up writes h the same way.

Three launch shapes, chosen from the number of (token, expert) pairs P = tokens * top_k, the experts and the dtype
alone (never from the routing, so shapes are fixed and the whole thing is capturable in a CUDA graph):
- decode (P <= DECODE_MAX_PAIRS, inputs not fp32): one program per pair and tile of output rows, a GEMV
  with fp16x2 FMAs (no tensor cores, no sorting or copy kernels: the input packing, the two kernels and
  the final sum are all it launches). Pairs of the same expert run side by side, so a
  repeated expert's weights come from L2.
- the pairs GEMV (a few pairs per expert on average, GEMV_PAIRS_PER_EXPERT, on layers of 128 experts): the
  pairs sorted by expert as for the blocks, 2 or 4 to a program, each dequantized weight word meeting all of
  their inputs (_group_dot_asm(pairs)); the decode GEMV's packed fp16 inputs and h.
- batch/prefill: moe.block_layout sorts the pairs by expert into blocks of BLOCK_M rows; a block
  dequantizes each weight tile once for all its rows and multiplies with tl.dot (x first).
  Blocks of 16 pairs of a bf16 model turn the bytes into bf16 weights by bit operations alone (_e2m1_bf16_asm).
  A third form (REG_A_BLOCKS, the default since the tenth session's H200 run) keeps the weights in registers from
  their load to the tensor cores: the inputs in quad order make a thread's 8 contiguous bytes of a row its share of wgmma's
  register operand (_dot_reg).
Expert id `num_experts` marks a pair routed to another rank (expert parallel): it is skipped.

With experts.dequantized_above_tokens, steps of more tokens run from a copy of the experts dequantized at load
(keep_dequantized_copies) through runtime/kernels/moe.py's bf16 kernel, faster there than these blocks.

Where Triton cannot run (no GPU, and not TRITON_INTERPRET=1) `reference_mxfp4_experts` runs instead:
each hit expert dequantized in turn (runtime.checkpoint.dequantize_mxfp4), then matmul.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from runtime import checkpoint
from runtime.errors import UserError
from runtime.kernels import moe
from runtime.kernels.moe import (HAVE_TRITON, autotune_bucket, block_layout, check_dense, reference_by_expert,
                                 tile_configs, triton_usable)

NAME = "mxfp4"
DECODE_MAX_PAIRS = 64
"""Up to this many (token, expert) pairs (16 tokens at top-4) the GEMV launch is used."""
GEMV_PAIRS_PER_EXPERT = 4
"""Beyond DECODE_MAX_PAIRS, while the pairs per expert average at most this (and the layer has at least
GEMV_PAIRS_MIN_EXPERTS experts), the pairs GEMV runs instead of the tl.dot blocks: each program takes 2 or 4 pairs
of one expert (blocks of the sorted layout) and multiplies every weight it dequantizes with all of them
(_group_dot_asm(pairs)). On the H200, one layer of the 120b's experts (128): 0.689 vs 0.758 ms at 32 tokens,
1.071 vs 1.070 at 64, 1.803 vs 2.067 at 128 (docs/benchmarks.md, seventh session). 0 turns it off."""
GEMV_PAIRS_MIN_EXPERTS = 128
"""The pairs GEMV only for layers of at least this many experts: on the 20b's 32 experts it was slower than the
blocks (0.508 ms at 32 tokens, where the blocks take 0.399 at 64)."""
REG_A_BLOCKS = True
"""The blocks with the weights as the tensor cores' register operand, fed straight from their loads (_dot_reg): the
inputs (and h) in quad order (quad_order), so that each thread's share of a wgmma weight fragment is 8 contiguous
bytes of a row, dequantized where it lands; no weight tile goes through shared memory twice and no layout
conversion is left (checked on the sm_90 code Triton 3.6 makes). Needs hidden and intermediate sizes (per rank) that
are multiples of 64 (elsewhere the plain blocks run). On the H200 (microbench --reg-a, docs/benchmarks.md, tenth
session), one layer of the 20b: 0.337 / 0.497 / 0.704 ms at 64 / 256 / 512 tokens where the plain blocks took 0.399 /
0.661 / 0.975; of the 120b at 256 / 512 tokens: 1.515 / 1.583 ms (plain 2.173 at 256). The 20b's batch 64 decodes at
7,621 tok/s (5,712 before) and its 1,024-token prefill takes 37.4 ms (47.0)."""
ONE_STAGE_BLOCKS = False
"""Let the register-operand blocks' autotuner also try the ONE_STAGE_TILES unpipelined (_dot_reg's ONE_STAGE, whose
wgmmas ptxas leaves asynchronous). Off until a GPU has run their test and timed them: asynchronous wgmmas with a
register operand met a ptxas bug in CUDA 12.9 (its registers reused before the wgmma had read them: wrong results;
fixed in 13.3, triton-lang/triton pull 11781), and Triton 3.6 assembles Hopper code with CUDA 12.8's ptxas. The
serialized pipelined tiles cannot meet it. microbench --one-stage turns it on."""
BF16_DEQUANT_MAX_M = 16
"""Blocks of at most this many pairs turn a bf16 model's MXFP4 bytes into bf16 weights with integer and bf16x2
operations only (_e2m1_bf16_asm) instead of through fp16 and fp32 conversions: on the H200 9-12% faster at 64
tokens (blocks of 16), 5-13% slower at 256-4,096 tokens (blocks of 64 and 128), so only there
(docs/benchmarks.md; 0 turns it off). The register-operand blocks (REG_A_BLOCKS) always do."""
MIN_CAPABILITY = (8, 0)
MXFP4_PARAMS = ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")

if HAVE_TRITON:
    import triton
    import triton.language as tl


FP16_TOP_EXP = 15
"""The decode GEMV multiplies in fp16 with its inputs scaled by a power of two so that max|x| lies in
(2^14, 2^15] (the top octave below 65,504; undone in fp32 after the sum). The E2M1 codes enter as
value * 2^-14, so a product is value * x * 2^-14: normal fp16 (11 significant bits) for any input
above 2^-13 of the row's largest, and a group's 16 products per fp16 lane stay below 16 * 6 * 2 = 192."""


def _group_dot_asm(pairs: int = 1) -> str:
    """PTX for one (row, 32-input group): 16 MXFP4 bytes (4 words) x 16 fp16 input pairs -> fp32 dot * scale,
    for `pairs` inputs at once (the pairs GEMV: each weight is dequantized once for all of them).

    Word j's nibbles p (bits 4p..4p+3) and p+4 (bits 16+4p..) form the fp16x2 pair p: magnitude bits
    to fp16 bits 9-11, sign to bit 15 (value * 2^-14, exact; see FP16_TOP_EXP), fused multiply-add with
    input pair register 4j+p, which the caller fills with the inputs of those two nibbles (pair_order).
    To place them, a word is first split in two: each byte's low nibbles with their sign moved from bit 3 to bit 6
    (e: one shift, one lop3 bit-select) and its high nibbles' magnitudes moved down to bits 1-3 beside their sign
    at bit 7 (o: the same), so that sign and magnitude sit 6 bits apart as fp16 has them and each pair takes one
    shift and one mask (pair 3 only the mask): 11 integer operations a word, where placing sign and magnitude of
    each pair separately took 20 (on the H200 one layer of the 120b's experts at 1 / 8 / 64 tokens took 0.036 /
    0.131 / 0.825 ms against 0.040 / 0.145 / 0.875; docs/benchmarks.md, eleventh session).
    Two fp16x2 accumulators per input (8 products per lane each), summed, widened to fp32, times the scale.
    Operands, P = pairs: 16 outputs per input ($16i holds input i's dot; one input: the other 15 are zeroed, as
    first measured), then the bytes ($16P..$16P+3), 16 input pair registers per input, the scale ($32P+4)."""
    n = 16 * pairs
    acc = [(f"c{2 * i}", f"c{2 * i + 1}") for i in range(pairs)]
    lines = ["{", ".reg .b32 t, a, e, o, " + ", ".join(c for pair in acc for c in pair) + ";", ".reg .b16 h0, h1;",
             ".reg .f32 f0, f1;"] + [f"mov.b32 {c}, 0;" for pair in acc for c in pair]
    scale = f"${2 * n + 4}"
    if pairs > 1:  # read the scale before the first output is written (inputs are read before outputs in asm)
        lines += [".reg .f32 sc;", f"mov.f32 sc, {scale};"]
        scale = "sc"
    for j in range(4):
        w = f"${n + j}"
        # e: bits 0-2 of each byte from w (the low nibble's magnitude), the rest from w << 3 (bit 6: its sign);
        # o: bits 1-3 from w >> 3 (the high nibble's magnitude), the rest from w (bit 7: its sign).
        # lop3 0xE4 = (a & c) | (b & ~c). Only bits 0-2 and 6 (e), 1-3 and 7 (o) of each byte are read below.
        lines += [f"shl.b32 t, {w}, 3;", f"lop3.b32 e, {w}, t, 0x07070707, 0xE4;",
                  f"shr.u32 t, {w}, 3;", f"lop3.b32 o, t, {w}, 0x0E0E0E0E, 0xE4;"]
        for p in range(4):  # pair p: nibbles p and p + 4, i.e. byte p // 2 and byte p // 2 + 2, low (p even) or high
            src, k = ("e", 9 - 4 * p) if p % 2 == 0 else ("o", 12 - 4 * p)
            lines.append(f"shl.b32 a, {src}, {k};" if k else f"mov.b32 a, {src};")
            lines.append("and.b32 a, a, 0x8E008E00;")
            for i in range(pairs):
                c = acc[i][p % 2]
                lines.append(f"fma.rn.f16x2 {c}, a, ${n + 4 + 16 * i + 4 * j + p}, {c};")
    for i, (c0, c1) in enumerate(acc):
        lines += [f"add.rn.f16x2 {c0}, {c0}, {c1};", f"mov.b32 {{h0, h1}}, {c0};", "cvt.f32.f16 f0, h0;",
                  "cvt.f32.f16 f1, h1;", "add.f32 f0, f0, f1;", f"mul.f32 ${16 * i}, f0, {scale};"]
    if pairs == 1:
        lines += [f"mov.f32 ${i}, 0f00000000;" for i in range(1, 16)]
    lines.append("}")
    return " ".join(lines)  # one line: torch.compile re-emits user kernels, and this constant, as source


def _group_dot_constraints(pairs: int = 1) -> str:
    return ",".join(["=f"] * 16 * pairs + ["r"] * (4 + 16 * pairs) + ["f"] * 16)


def _e2m1_bf16_asm(scale_each: bool = False) -> str:
    """PTX for 4 MXFP4 bytes ($4) with their scales as bf16x2 ($5-$8, one per byte) -> the 4 low nibbles ($0: bytes
    0, 1; $1: bytes 2, 3) and the 4 high nibbles ($2, $3) as bf16 values times their scale.

    A byte pair is spread into the two 16-bit lanes of a word (prmt); each nibble's magnitude bits (exponent 2,
    mantissa 1) go to bf16 bits 6-8 and its sign to bit 15: read as bf16 that is value * 2^-126 (E2M1 0.5 a bf16
    subnormal, exactly), so one bf16x2 multiply by 2^126 and one by the scale give two weights. No conversion
    instruction (the fp32 path's cvt and f2f ran at a quarter of the integer rate). To place them, x << 6 is taken
    once; a bit-select of x and it keeps the low nibble's magnitude (bits 0-2) with its sign landing at bit 9,
    another the high nibble's (bits 4-6) with its sign at bit 13, both 9 bits above their magnitude as in bf16, so
    each then takes one shift and one mask (7 integer operations per two bytes, where placing sign and magnitude
    separately took 10).

    Triton packs 4 of a thread's elements into one call, in its register order. Where the layout makes those 4
    bytes of one row and one group of 32 inputs (the tl.dot blocks), $5's scale serves them all. scale_each: each
    lane gets its own byte's scale (two more prmt per call), as the register-operand blocks need, whose registers
    alternate between rows g and g + 8 of a wgmma fragment (their layout's first register step is 8 rows)."""
    lines = ["{", ".reg .b32 x, t, u, v, bias;", "mov.b32 bias, 0x7E807E80;"]  # 2^126, twice
    if scale_each:  # lane 0 from byte 0's (2's) scale word, lane 1 from byte 1's (3's)
        lines += [".reg .b32 s01, s23;", "prmt.b32 s01, $5, $6, 0x7610;", "prmt.b32 s23, $7, $8, 0x7610;"]
    for k, (sel, scale) in enumerate((("0x4140", "s01"), ("0x4342", "s23"))):  # bytes (0, 1), (2, 3): lanes 0, 1
        scale = scale if scale_each else "$5"
        # u = x << 6; lop3 0xE4 = (a & c) | (b & ~c): magnitude bits from x, the rest from u
        lines += [f"prmt.b32 x, $4, 0, {sel};", "shl.b32 u, x, 6;"]
        for out, shift, keep in ((f"${k}", 6, "0x00070007"), (f"${2 + k}", 2, "0x00700070")):
            # low nibble: magnitude 0-2, sign (x bit 3) at 9; high: magnitude 4-6, sign (x bit 7) at 13
            lines += [f"lop3.b32 t, x, u, {keep}, 0xE4;", f"shl.b32 v, t, {shift};", "and.b32 v, v, 0x81C081C0;",
                      "mul.rn.bf16x2 v, v, bias;", f"mul.rn.bf16x2 {out}, v, {scale};"]
    lines.append("}")
    return " ".join(lines)


def pair_order(x: torch.Tensor) -> torch.Tensor:
    """[..., K] inputs -> the decode GEMV's order: each run of 8 inputs x0..x7 becomes x0 x4 x1 x5 x2 x6 x3 x7,
    so that fp16 pair p of a weight word holds the inputs of its nibbles p and p+4 (the torch reference of
    what _pack_x_kernel and the gate_up epilogue write)."""
    return x.reshape(*x.shape[:-1], -1, 2, 4).transpose(-1, -2).reshape(x.shape)


def quad_order(x: torch.Tensor) -> torch.Tensor:
    """[..., K] (K a multiple of 64) -> the inputs in quad order, as _dot_reg multiplies them: in each run of 64,
    position 16q + 8s + 2c + b holds input 16c + 4q + 2s + b (b: the nibble of a weight byte)."""
    *lead, k = x.shape
    return x.reshape(*lead, k // 64, 4, 4, 2, 2).transpose(-4, -3).transpose(-3, -2).reshape(*lead, k)


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
    """GEMV tiles (BLOCK_N output rows or hidden units x BLOCK_K inputs), each also with the next tile prefetched
    (PREFETCH, see _gemv): the autotuner keeps the fastest."""
    return _also_with(tile_configs([(8, 256, 2, 3), (16, 256, 4, 3), (32, 256, 4, 3), (16, 512, 4, 2), (32, 128, 4, 4),
                                    (64, 128, 4, 3), (32, 512, 8, 2), (64, 256, 8, 3)], interpreted=(16, 64)),
                      "PREFETCH")


def _also_with(tiles: list, flag: str, only: tuple[tuple[int, int], ...] | None = None) -> list:
    """`tiles`, then again (those whose (BLOCK_N, BLOCK_K) is in `only`, default all) with the constexpr `flag` on,
    for the autotuner to try both forms; under Triton's interpreter only `tiles` (its tests force `flag` by
    config)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return tiles
    return tiles + [triton.Config({**c.kwargs, flag: True}, num_warps=c.num_warps, num_stages=c.num_stages)
                    for c in tiles if only is None or (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) in only]


ONE_STAGE_TILES = ((32, 128), (64, 64), (128, 64))
"""(BLOCK_N, BLOCK_K) tiles whose register-operand blocks are also tried with ONE_STAGE (see _dot_reg) when
ONE_STAGE_BLOCKS: ones whose one-stage form spills no register in either kernel on Triton 3.6's sm_90 code (169-218
registers in gate_up)."""


def _dot_configs(one_stage: bool = False) -> list:
    """tl.dot tiles for blocks of BLOCK_M pairs; with `one_stage` (the register-operand blocks) also the
    ONE_STAGE_TILES unpipelined. The autotuner gets exactly these (no pruning hook: torch.compile's tracing of an
    autotuned user kernel fails on one)."""
    tiles = tile_configs([(32, 128, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
                          (64, 256, 8, 3)], interpreted=(32, 64))
    return _also_with(tiles, "ONE_STAGE", ONE_STAGE_TILES) if one_stage else tiles


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

    _BF16_ASM: tl.constexpr = tl.constexpr(_e2m1_bf16_asm())
    _BF16_EACH_ASM: tl.constexpr = tl.constexpr(_e2m1_bf16_asm(scale_each=True))

    @triton.jit
    def _e2m1_bf16(wb, sc, SCALE_EACH: tl.constexpr = False):
        """uint8 bytes [...] and their groups' bf16x2 scales sc (uint32, _scale_bf16x2) -> (low, high) nibbles as
        bf16 values times their scale, [...] each, without a float conversion (_e2m1_bf16_asm; GPUs only).
        SCALE_EACH: for layouts whose 4 packed registers are not 4 bytes of one group (_dot_reg's)."""
        return tl.inline_asm_elementwise(_BF16_EACH_ASM if SCALE_EACH else _BF16_ASM, "=r,=r,=r,=r,r,r,r,r,r",
                                         [wb, sc], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)

    @triton.jit
    def _scale_bf16x2(s):
        """E8M0 exponents (uint8) -> 2^(s - 127) as bf16, twice in a 32-bit word (s = 0: 0 instead of 2^-127)."""
        b = s.to(tl.uint32) << 7
        return b | (b << 16)

    _GROUP_DOT_ASM: tl.constexpr = tl.constexpr(_group_dot_asm())
    _GROUP_DOT_CONSTRAINTS: tl.constexpr = tl.constexpr(_group_dot_constraints())
    _GROUP_DOT2_ASM: tl.constexpr = tl.constexpr(_group_dot_asm(2))
    _GROUP_DOT2_CONSTRAINTS: tl.constexpr = tl.constexpr(_group_dot_constraints(2))
    _GROUP_DOT4_ASM: tl.constexpr = tl.constexpr(_group_dot_asm(4))
    _GROUP_DOT4_CONSTRAINTS: tl.constexpr = tl.constexpr(_group_dot_constraints(4))

    @triton.jit
    def _first(a, b):
        return a

    @triton.jit
    def _group_dot(wb, xp, s, ASM: tl.constexpr):
        """MXFP4 bytes wb [R, NG, 16] . fp16 input pairs xp [1, NG, 16] (int32, pair_order) * s [R, NG] -> [R, NG]
        (codes read as value * 2^-14, as _e2m1 does: s carries the 2^14).

        ASM: the PTX of _group_dot_asm (fp16x2 FMAs, 16 products per fp16 lane). Otherwise (Triton's CPU
        interpreter, which cannot run PTX) the same pairing of nibbles and inputs in fp32 tensor ops.
        """
        if ASM:
            out = tl.inline_asm_elementwise(_GROUP_DOT_ASM, _GROUP_DOT_CONSTRAINTS, [wb, xp, s[:, :, None]],
                                            dtype=tl.float32, is_pure=True, pack=16)
            return tl.reduce(out, 2, _first)  # element 0 of each group's 16 holds its dot
        # Nibble q of word j (byte 4j + q // 2) multiplies half q // 4 of pair register 4j + q % 4.
        halves = tl.join((xp & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True),
                         (xp >> 16).to(tl.uint16).to(tl.float16, bitcast=True))  # [1, NG, 16, 2]
        ng: tl.constexpr = xp.shape[1]
        t = tl.permute(tl.reshape(halves, (ng, 4, 2, 2, 2)), (0, 1, 4, 2, 3))  # [NG, word, half, byte%2, nibble]
        xe, xo = tl.split(tl.reshape(t, (1, ng, 16, 2)))
        lo, hi = _e2m1(wb)
        part = tl.sum(lo * xe.to(tl.float32) + hi * xo.to(tl.float32), axis=2)
        return part * s

    @triton.jit
    def _group_dots(wb, x0, x1, x2, x3, s, PAIRS: tl.constexpr, ASM: tl.constexpr):
        """_group_dot for 2 or 4 inputs (x0..x3; x2, x3 unused at 2) against the same weights, dequantized once:
        a tuple of PAIRS [R, NG] sums."""
        if ASM:
            if PAIRS == 2:
                d = tl.inline_asm_elementwise(_GROUP_DOT2_ASM, _GROUP_DOT2_CONSTRAINTS, [wb, x0, x1, s[:, :, None]],
                                              dtype=(tl.float32, tl.float32), is_pure=True, pack=16)
                r0, r1 = tl.reduce(d[0], 2, _first), tl.reduce(d[1], 2, _first)
                return r0, r1, r0, r1
            d = tl.inline_asm_elementwise(_GROUP_DOT4_ASM, _GROUP_DOT4_CONSTRAINTS, [wb, x0, x1, x2, x3, s[:, :, None]],
                                          dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True,
                                          pack=16)
            return (tl.reduce(d[0], 2, _first), tl.reduce(d[1], 2, _first), tl.reduce(d[2], 2, _first),
                    tl.reduce(d[3], 2, _first))
        if PAIRS == 2:
            r0, r1 = _group_dot(wb, x0, s, False), _group_dot(wb, x1, s, False)
            return r0, r1, r0, r1
        return (_group_dot(wb, x0, s, False), _group_dot(wb, x1, s, False), _group_dot(wb, x2, s, False),
                _group_dot(wb, x3, s, False))

    @triton.jit
    def _gemv_tile(wb_ptr, ws_ptr, row_off, rows_ok, k0, groups, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """The MXFP4 tile of the rows at inputs [k0, k0 + BLOCK_K): its bytes [R, BLOCK_K/2] (zero past K) and
        scales [R, BLOCK_K/32] (uint8), as loaded."""
        cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # the tile's bytes of a row, contiguous
        wb = tl.load(wb_ptr + row_off[:, None] * 16 + cols[None, :],
                     mask=rows_ok[:, None] & (cols // 16 < groups)[None, :], other=0)  # (by group: 16-byte loads)
        g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        s8 = tl.load(ws_ptr + row_off[:, None] + g[None, :], mask=rows_ok[:, None] & (g < groups)[None, :], other=0)
        return wb, s8

    @triton.jit
    def _gemv(x0_ptr, x1_ptr, x2_ptr, x3_ptr, wb_ptr, ws_ptr, rows, rows_ok, K, BLOCK_R: tl.constexpr,
              BLOCK_K: tl.constexpr, PAIRS: tl.constexpr, ASM: tl.constexpr, PREFETCH: tl.constexpr = False):
        """sum_k x[k] * W[rows, k] for 1, 2 or 4 input rows (fp16 pairs in pair_order, as int32 [K/2]; the pointers
        past PAIRS unused) and MXFP4 rows of W, each weight tile loaded and dequantized once -> [PAIRS, BLOCK_R]
        fp32.

        A tile's bytes are loaded as [rows, BLOCK_K / 2 contiguous bytes] and reshaped to [rows, groups, 16], not
        addressed as [rows, groups, 16] directly. Triton lays a load's lanes along the dimension it knows to be
        contiguous, so a warp reads runs of consecutive groups of a row; addressed in 3-D, the bytes are contiguous
        only within a group as far as Triton knows, and which dimension gets the lanes is left to its heuristics
        (Triton 3.6, on the GPU machines: 32 lanes on 32 rows, each load 16 bytes from each of 32 rows 1,440 bytes
        apart at gpt-oss's sizes, and the inputs' trip through shared memory took 12 loads a loop instead of 5). On
        the H200 one layer of the 120b's experts at 1 / 8 / 64 tokens took 0.040 / 0.145 / 0.875 ms this way against
        0.043 / 0.166 / 1.108 (docs/benchmarks.md, eleventh session).

        PREFETCH: the next tile's bytes and scales are loaded a tile ahead, into registers (Triton does not pipeline
        loads that feed no tl.dot), so each warp has two tiles' loads in flight instead of one. At one token a
        layer's GEMVs run ~5 programs an SM, whose one tile each is too few bytes in flight to cover the memory's
        latency: the down GEMV read at 47% of the copy rate on the H200 in the twelfth session, and at 8 tokens (8x
        the programs) the layer read at 73%."""
        groups = K // 32
        gi = tl.arange(0, BLOCK_K // 32)
        bi = tl.arange(0, 16)
        row_off = rows.to(tl.int64) * groups
        acc0 = tl.zeros((BLOCK_R, BLOCK_K // 32), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_R, BLOCK_K // 32), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_R, BLOCK_K // 32), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_R, BLOCK_K // 32), dtype=tl.float32)
        if PREFETCH:
            wb_next, s_next = _gemv_tile(wb_ptr, ws_ptr, row_off, rows_ok, 0, groups, BLOCK_R, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            g = k0 // 32 + gi
            g_ok = g < groups
            if PREFETCH:
                wb, s8 = wb_next, s_next
                wb_next, s_next = _gemv_tile(wb_ptr, ws_ptr, row_off, rows_ok, k0 + BLOCK_K, groups, BLOCK_R, BLOCK_K)
            else:
                wb, s8 = _gemv_tile(wb_ptr, ws_ptr, row_off, rows_ok, k0, groups, BLOCK_R, BLOCK_K)
            wb = tl.reshape(wb, (BLOCK_R, BLOCK_K // 32, 16))  # [R, NG, 16] bytes
            s = _scale(s8)
            at = g[:, None] * 16 + bi[None, :]
            x0 = tl.load(x0_ptr + at, mask=g_ok[:, None], other=0)[None, :, :]  # [1, NG, 16] pairs
            if PAIRS == 1:
                acc0 += _group_dot(wb, x0, s, ASM)
            elif PAIRS == 2:
                x1 = tl.load(x1_ptr + at, mask=g_ok[:, None], other=0)[None, :, :]
                d0, d1, _, _ = _group_dots(wb, x0, x1, x0, x1, s, 2, ASM)
                acc0 += d0
                acc1 += d1
            else:
                x1 = tl.load(x1_ptr + at, mask=g_ok[:, None], other=0)[None, :, :]
                x2 = tl.load(x2_ptr + at, mask=g_ok[:, None], other=0)[None, :, :]
                x3 = tl.load(x3_ptr + at, mask=g_ok[:, None], other=0)[None, :, :]
                d0, d1, d2, d3 = _group_dots(wb, x0, x1, x2, x3, s, 4, ASM)
                acc0 += d0
                acc1 += d1
                acc2 += d2
                acc3 += d3
        if PAIRS == 1:
            out = tl.sum(acc0, axis=1)[None, :]
        else:
            out = tl.join(tl.sum(acc0, axis=1), tl.sum(acc1, axis=1))  # [R, 2]
            if PAIRS == 4:
                out = tl.reshape(tl.join(out, tl.join(tl.sum(acc2, axis=1), tl.sum(acc3, axis=1))), (BLOCK_R, 4))
                out = tl.reshape(tl.permute(tl.reshape(out, (BLOCK_R, 2, 2)), (0, 2, 1)), (BLOCK_R, 4))
            out = tl.trans(out)
        return out

    @triton.jit
    def _row(base_ptr, pair_ptr, i: tl.constexpr, num_pairs, per_row: tl.constexpr, row_len):
        """The row of pair_ptr[i] (pair // per_row: its token, or the pair itself) in base_ptr; a padding slot
        (pair >= num_pairs) reads row 0, its result never stored."""
        p = tl.load(pair_ptr + i)
        return base_ptr + tl.where(p < num_pairs, p // per_row, 0).to(tl.int64) * row_len

    @triton.jit
    def _gemv_block(x_ptr, pair_ptr, num_pairs, per_row: tl.constexpr, row_len, wb_ptr, ws_ptr, rows, rows_ok, K,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PAIRS: tl.constexpr, ASM: tl.constexpr,
                    PREFETCH: tl.constexpr):
        """The pairs GEMV of a block: its PAIRS (2 or 4) pairs pair_ptr[0..PAIRS), each reading its row of x_ptr
        (see _row) -> [PAIRS, BLOCK_R]."""
        return _gemv(_row(x_ptr, pair_ptr, 0, num_pairs, per_row, row_len),
                     _row(x_ptr, pair_ptr, 1, num_pairs, per_row, row_len),
                     _row(x_ptr, pair_ptr, 2 % PAIRS, num_pairs, per_row, row_len),
                     _row(x_ptr, pair_ptr, 3 % PAIRS, num_pairs, per_row, row_len),
                     wb_ptr, ws_ptr, rows, rows_ok, K, BLOCK_R, BLOCK_K, PAIRS, ASM, PREFETCH)

    @triton.jit
    def _pack_x_kernel(x_ptr, out_ptr, factor_ptr, K, top_exp, BLOCK_K: tl.constexpr):
        """One input row -> fp16 in pair_order, times 2^shift so that max|x| lies in (2^(top_exp-1), 2^top_exp];
        factor_ptr gets 2^-shift, to multiply the GEMV's sums by (see FP16_TOP_EXP)."""
        row = tl.program_id(0).to(tl.int64)
        q = tl.arange(0, BLOCK_K)
        src = (q // 8) * 8 + (q % 2) * 4 + (q % 8) // 2  # position q of pair_order holds input src
        x = tl.load(x_ptr + row * K + src, mask=q < K, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        shift = top_exp - tl.ceil(tl.log2(tl.maximum(amax, 1e-30))).to(tl.int32)
        shift = tl.minimum(tl.maximum(shift, -100), 100)  # 2^shift and 2^-shift stay normal fp32
        up = ((shift + 127).to(tl.uint32) << 23).to(tl.float32, bitcast=True)  # 2^shift, exactly
        down = ((127 - shift).to(tl.uint32) << 23).to(tl.float32, bitcast=True)
        tl.store(out_ptr + row * K + q, (x * up).to(tl.float16), mask=q < K)
        tl.store(factor_ptr + row, down)

    @triton.jit
    def _dot(x_ptr, x_row, x_ok, wb_ptr, ws_ptr, rows, rows_ok, K,
             BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
             BF16: tl.constexpr):
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
            s8 = tl.load(ws_ptr + row_off[:, None] + g[None, :], mask=rows_ok[:, None] & g_ok[None, :], other=0)
            if BF16:  # bf16 inputs: bits straight to bf16 (_e2m1_bf16)
                lo, hi = _e2m1_bf16(wb, _scale_bf16x2(s8)[:, :, None])
                lo = tl.reshape(lo, (BLOCK_R, BLOCK_K // 2))
                hi = tl.reshape(hi, (BLOCK_R, BLOCK_K // 2))
            else:
                s = _scale(s8)[:, :, None]
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
    def _reg_tile_dot(wb, s8, x, acc, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                      BF16: tl.constexpr):
        """acc [R, M] + a tile's weights (bytes wb [R, BLOCK_K/2], scales s8 [R, BLOCK_K/32]) dequantized in registers
        (quad order, see _dot_reg) @ x [M, BLOCK_K]^T."""
        KC: tl.constexpr = BLOCK_K // 64
        wb = tl.reshape(wb, (BLOCK_R, KC, 2, 2, 8))  # [row, run, c // 2 (its group of 32), c % 2, (q, s)]
        s8 = tl.reshape(s8, (BLOCK_R, KC, 2, 1, 1))
        if BF16:
            lo, hi = _e2m1_bf16(wb, _scale_bf16x2(s8), SCALE_EACH=True)
        else:
            s = _scale(s8)
            lo, hi = _e2m1(wb)
            lo = (lo * s).to(x.dtype)
            hi = (hi * s).to(x.dtype)
        w = tl.reshape(tl.join(lo, hi), (BLOCK_R, KC, 4, 4, 2, 2))  # [row, run, c, q, s, nibble]
        w = tl.reshape(tl.permute(w, (0, 1, 3, 4, 2, 5)), (BLOCK_R, BLOCK_K))  # quad order
        if IEEE:
            acc += tl.dot(w, tl.trans(x), input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(x), acc)
        return acc

    @triton.jit
    def _dot_reg(x_ptr, x_row, x_ok, wb_ptr, ws_ptr, rows, rows_ok, K,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                 BF16: tl.constexpr, ONE_STAGE: tl.constexpr = False):
        """The product of _dot with the weights as the first operand, held in registers from their load on: x rows in
        quad order (quad_order) -> [BLOCK_M, BLOCK_R] fp32.

        A run of 64 inputs is 32 bytes of a weight row: byte 8c + 2q + s holds inputs 16c + 4q + 2s (low nibble) and
        +1 (high). In quad order they sit at 16q + 8s + 2c (+1), where Hopper's wgmma wants a thread's register
        operand (rows g and g+8, input pairs 2c and 2c+8 of each 16): so a thread's share of a tile is 8 contiguous
        bytes of a row, and the reshapes below only rename registers.

        ONE_STAGE: the loop is not software-pipelined by Triton (tl.range num_stages=1); the next tile's weight bytes
        and inputs are loaded into registers a tile ahead by hand instead. Pipelined, the wgmmas of one tile are
        still in flight when the loop comes round, and ptxas (CUDA 12.8's, Triton 3.6's) then serializes every wgmma
        whose first operand is in registers (its info C7515: each waits for the one before it, so the tensor cores
        and the dequantization never overlap within a warpgroup). One stage keeps each tile's wgmmas in one
        pipeline stage of their own, which ptxas leaves asynchronous.
        """
        kk = tl.arange(0, BLOCK_K)
        x_base = x_ptr + x_row.to(tl.int64)[:, None] * K
        acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
        if ONE_STAGE:  # (the tiles' bytes and scales as the GEMVs load them: _gemv_tile)
            row_off = rows.to(tl.int64) * (K // 32)
            wb_next, s_next = _gemv_tile(wb_ptr, ws_ptr, row_off, rows_ok, 0, K // 32, BLOCK_R, BLOCK_K)
            x_next = tl.load(x_base + kk[None, :], mask=x_ok[:, None] & (kk < K)[None, :], other=0.0)
            for k0 in tl.range(0, K, BLOCK_K, num_stages=1):
                wb, x, s8 = wb_next, x_next, s_next
                wb_next, s_next = _gemv_tile(wb_ptr, ws_ptr, row_off, rows_ok, k0 + BLOCK_K, K // 32, BLOCK_R,
                                             BLOCK_K)
                k = k0 + BLOCK_K + kk
                x_next = tl.load(x_base + k[None, :], mask=x_ok[:, None] & (k < K)[None, :], other=0.0)
                acc = _reg_tile_dot(wb, s8, x, acc, BLOCK_R, BLOCK_K, IEEE, BF16)
        else:
            jb = tl.arange(0, BLOCK_K // 2)
            gi = tl.arange(0, BLOCK_K // 32)
            wb_row = wb_ptr + rows.to(tl.int64)[:, None] * (K // 2)
            s_row = ws_ptr + rows.to(tl.int64)[:, None] * (K // 32)
            s_next = tl.load(s_row + gi[None, :], mask=rows_ok[:, None] & (gi < K // 32)[None, :], other=0)
            for k0 in range(0, K, BLOCK_K):
                b = k0 // 2 + jb
                wb = tl.load(wb_row + b[None, :], mask=rows_ok[:, None] & (b < K // 2)[None, :], other=0)  # [R, K/2]
                s8 = s_next  # [R, BLOCK_K/32]; the next tile's loaded a tile ahead (too few bytes to be pipelined)
                g = (k0 + BLOCK_K) // 32 + gi
                s_next = tl.load(s_row + g[None, :], mask=rows_ok[:, None] & (g < K // 32)[None, :], other=0)
                x = tl.load(x_base + (k0 + kk)[None, :], mask=x_ok[:, None] & ((k0 + kk) < K)[None, :], other=0.0)
                acc = _reg_tile_dot(wb, s8, x, acc, BLOCK_R, BLOCK_K, IEEE, BF16)
        return tl.trans(acc)

    @triton.jit
    def _gate_up_kernel(
        x_ptr, xf_ptr, wb_ptr, ws_ptr, b_ptr, h_ptr, pair_ptr, expert_ptr,
        num_pairs, num_experts, hidden, inter, pairs_bucket, limit, alpha, h_factor,
        TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr, ASM: tl.constexpr, BF16: tl.constexpr, PERM: tl.constexpr, ONE_STAGE: tl.constexpr = False,
        PREFETCH: tl.constexpr = False,
    ):
        """h[pair, units] = SwiGLU(x[token] @ W_gu[e]^T + b_gu[e]) for BLOCK_N hidden units (2*BLOCK_N rows).

        Blocks (BLOCK_M >= 16): x rows and h rows in split order (see _dot), or in quad order with PERM (_dot_reg).
        The GEMVs (decode, one pair a program: BLOCK_M 1; the pairs GEMV, 2 or 4 pairs of an expert
        a program: BLOCK_M 2, 4): x rows are fp16 pairs (int32) from _pack_x_kernel with their factors xf; h is
        written as fp16 in pair_order, / h_factor.
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
            token = pid_m // TOP_K
            x_row = x_ptr + token.to(tl.int64) * (hidden // 2)
            acc = _gemv(x_row, x_row, x_row, x_row, wb, ws, r, r_ok, hidden, 2 * BLOCK_N, BLOCK_K, 1,
                        ASM, PREFETCH) * tl.load(xf_ptr + token)
        elif BLOCK_M < 16:  # the pairs GEMV: BLOCK_M (2 or 4) pairs of the block's expert, weights dequantized once
            first = pair_ptr + pid_m * BLOCK_M
            pair = tl.load(first + tl.arange(0, BLOCK_M))
            acc = _gemv_block(x_ptr, first, num_pairs, TOP_K, hidden // 2, wb, ws, r, r_ok, hidden, 2 * BLOCK_N,
                              BLOCK_K, BLOCK_M, ASM, PREFETCH)
            acc = acc * tl.load(xf_ptr + tl.where(pair < num_pairs, pair // TOP_K, 0))[:, None]
        else:
            pair = tl.load(pair_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
            if PERM:
                acc = _dot_reg(x_ptr, pair // TOP_K, pair < num_pairs, wb, ws, r, r_ok, hidden,
                               BLOCK_M, 2 * BLOCK_N, BLOCK_K, IEEE, BF16, ONE_STAGE)
            else:
                acc = _dot(x_ptr, pair // TOP_K, pair < num_pairs, wb, ws, r, r_ok, hidden,
                           BLOCK_M, 2 * BLOCK_N, BLOCK_K, IEEE, BF16)
        valid = pair < num_pairs
        acc += tl.load(b_ptr + e.to(tl.int64) * (2 * inter) + r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        h = (up + 1.0) * gate * tl.sigmoid(gate * alpha)
        if BLOCK_M < 16:  # the GEMVs
            col = (n // 8) * 8 + (n % 4) * 2 + (n % 8) // 4  # unit n's place in pair_order
            h = h / h_factor
        elif PERM:  # unit n's place in quad order
            rn = n % 64
            col = n - rn + 16 * ((rn // 4) % 4) + 8 * ((rn // 2) % 2) + 2 * (rn // 16) + rn % 2
        else:
            col = (n % 2) * (inter // 2) + n // 2  # unit n's place in split order
        tl.store(h_ptr + pair[:, None].to(tl.int64) * inter + col[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=valid[:, None] & (n < inter)[None, :])

    @triton.jit
    def _down_kernel(
        h_ptr, wb_ptr, ws_ptr, b_ptr, rw_ptr, out_ptr, pair_ptr, expert_ptr,
        num_pairs, num_experts, hidden, inter, pairs_bucket, h_factor,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
        ASM: tl.constexpr, BF16: tl.constexpr, PERM: tl.constexpr, ONE_STAGE: tl.constexpr = False,
        PREFETCH: tl.constexpr = False,
    ):
        """out[pair, n] = (h[pair] @ W_d[e]^T + b_d[e]) * routing weight, for BLOCK_N output features.

        The GEMVs (BLOCK_M < 16): h rows as the gate_up kernel wrote them (fp16 pairs as int32, / h_factor)."""
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
            h_row = h_ptr + pid_m.to(tl.int64) * (inter // 2)
            acc = _gemv(h_row, h_row, h_row, h_row, wb, ws, n, n_ok, inter, BLOCK_N, BLOCK_K, 1, ASM,
                        PREFETCH) * h_factor
        elif BLOCK_M < 16:  # the pairs GEMV
            first = pair_ptr + pid_m * BLOCK_M
            pair = tl.load(first + tl.arange(0, BLOCK_M))
            acc = _gemv_block(h_ptr, first, num_pairs, 1, inter // 2, wb, ws, n, n_ok, inter, BLOCK_N, BLOCK_K,
                              BLOCK_M, ASM, PREFETCH) * h_factor
        else:
            pair = tl.load(pair_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
            if PERM:
                acc = _dot_reg(h_ptr, pair, pair < num_pairs, wb, ws, n, n_ok, inter, BLOCK_M, BLOCK_N, BLOCK_K, IEEE,
                               BF16, ONE_STAGE)
            else:
                acc = _dot(h_ptr, pair, pair < num_pairs, wb, ws, n, n_ok, inter, BLOCK_M, BLOCK_N, BLOCK_K, IEEE,
                           BF16)
        valid = pair < num_pairs
        acc += tl.load(b_ptr + e.to(tl.int64) * hidden + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        weight = tl.load(rw_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        acc = acc * weight[:, None]
        tl.store(out_ptr + pair[:, None].to(tl.int64) * hidden + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & n_ok[None, :])

    _KEY = ["pairs_bucket", "hidden", "inter", "BLOCK_M", "PERM"]
    _gate_up_decode = triton.autotune(configs=_decode_configs(), key=_KEY)(_gate_up_kernel)
    _gate_up_blocks = triton.autotune(configs=_dot_configs(), key=_KEY)(_gate_up_kernel)
    _gate_up_reg_blocks = triton.autotune(configs=_dot_configs(one_stage=True), key=_KEY)(_gate_up_kernel)
    _down_decode = triton.autotune(configs=_decode_configs(), key=_KEY)(_down_kernel)
    _down_blocks = triton.autotune(configs=_dot_configs(), key=_KEY)(_down_kernel)
    _down_reg_blocks = triton.autotune(configs=_dot_configs(one_stage=True), key=_KEY)(_down_kernel)


# ------------------------------------------------------------------------------------------ launch


def plan(num_pairs: int, dtype: torch.dtype = torch.bfloat16, num_experts: int = 32) -> int:
    """Pairs per program for P pairs over E experts: 1 = the decode GEMV launch (no sorting); 2 or 4 = the pairs
    GEMV (sorted by expert like the blocks; up to GEMV_PAIRS_PER_EXPERT pairs per expert on average); 16 or more =
    the tl.dot blocks.

    fp32 inputs always take the blocks (IEEE fp32 dots): the GEMVs multiply in fp16, exact enough for
    bf16 models (relative error ~1e-3) but not for the fp32 runs that compare tokens with a reference."""
    if dtype != torch.float32:
        if num_pairs <= DECODE_MAX_PAIRS:
            return 1
        if num_experts >= GEMV_PAIRS_MIN_EXPERTS and num_pairs <= GEMV_PAIRS_PER_EXPERT * num_experts:
            return 2 if num_pairs <= 2 * num_experts else 4
    if num_pairs <= 256:
        return 16
    return 64 if num_pairs <= 4096 else 128  # 128: each weight tile dequantized half as often (12% at 16,384)


def fused_mxfp4_experts(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor, gate_up_bias: torch.Tensor,
    down_blocks: torch.Tensor, down_scales: torch.Tensor, down_bias: torch.Tensor,
    limit: float = 7.0, alpha: float = 1.702, block_m: int | None = None, config: dict[str, Any] | None = None,
    reg_a: bool | None = None,
) -> torch.Tensor:
    """x [T, H], top_k_index/top_k_weights [T, k] (index E = another rank's expert) -> [T, H].

    gate_up_blocks [E, 2I, H/32, 16], gate_up_scales [E, 2I, H/32], gate_up_bias [E, 2I],
    down_blocks [E, H, I/32, 16], down_scales [E, H, I/32], down_bias [E, H].
    block_m / config (BLOCK_N, BLOCK_K, num_warps) / reg_a (the register-operand blocks, default REG_A_BLOCKS)
    override the automatic choice (tests, tuning).
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
    block_m = block_m or plan(p, x.dtype, num_experts)
    if 1 < block_m < 16 and block_m not in (2, 4):
        raise ValueError(f"block_m={block_m}: 1 (decode GEMV), 2 or 4 (pairs GEMV), or 16 and more (tl.dot blocks)")
    gemv = block_m < 16
    ids = top_k_index.reshape(-1)  # [P]
    asm = os.environ.get("TRITON_INTERPRET") != "1"  # the interpreter cannot run PTX
    if gemv:  # x becomes fp16 pairs in pair_order (one small kernel), gate_up writes h the same way
        x16 = torch.empty((t, hidden), dtype=torch.float16, device=x.device)
        x_factor = torch.empty(t, dtype=torch.float32, device=x.device)
        _pack_x_kernel[(t,)](x.contiguous(), x16, x_factor, hidden, FP16_TOP_EXP,
                             BLOCK_K=triton.next_power_of_2(hidden))
        xs = x16.view(torch.int32)
        h = torch.empty((p, inter), dtype=torch.float16, device=x.device)
    if block_m == 1:
        # Decode: one program per pair reads its expert id directly, and the down kernel writes the rows of pairs
        # routed elsewhere: no other kernel besides the packing and the final sum.
        pair, expert = ids, ids
        out = torch.empty((p, hidden), dtype=x.dtype, device=x.device)
    else:
        pair, expert = block_layout(ids.long(), num_experts, block_m)
        # Non-empty blocks come first and there are at most P of them (each holds a pair): drop the rest.
        keep = min(expert.numel(), p)
        pair, expert = pair[: keep * block_m], expert[:keep]
        out = torch.zeros((p, hidden), dtype=x.dtype, device=x.device)  # pairs routed elsewhere stay 0
    perm = False
    if not gemv:
        perm = (REG_A_BLOCKS if reg_a is None else reg_a) and hidden % 64 == 0 and inter % 64 == 0
        if perm and config is not None and config.get("BLOCK_K", 64) % 64:
            if reg_a:
                raise ValueError(f"config={config}: the register-operand blocks need a BLOCK_K that is a multiple of "
                                 f"64: change it, or reg_a=False")
            perm = False  # a forced tile the register-operand blocks cannot take, not asked for by name: plain blocks
        # Inputs in split order [x0, x2, ... | x1, x3, ...]: the even/odd inputs that a byte's two nibbles
        # multiply are then contiguous runs (vector loads); gate_up writes h in the same order. The
        # register-operand blocks (REG_A_BLOCKS) take them in quad order.
        if perm:
            xs = quad_order(x)
        else:
            xs = x.reshape(t, hidden // 2, 2).transpose(1, 2).reshape(t, hidden)
        x_factor = xs  # unused by the blocks
        h = torch.empty((p, inter), dtype=x.dtype, device=x.device)
    num_rows = expert.numel()
    # |h| <= limit * (limit + 1) (gate <= limit, |up| <= limit): the decode GEMV's fp16 h is h / h_factor,
    # with max|h / h_factor| <= 2^FP16_TOP_EXP. A static bound, not each row's maximum (gate_up's programs
    # write a row in pieces): a row whose |h| all lie below ~2e-3 multiplies in subnormal fp16 (~1e-2 error)
    h_factor = float(2.0 ** (math.ceil(math.log2(limit * (limit + 1))) - FP16_TOP_EXP))
    weights = top_k_weights.reshape(-1)
    ieee = x.dtype == torch.float32
    common = {"BLOCK_M": block_m, "IEEE": ieee, "ASM": asm, "PERM": perm,
              "BF16": asm and x.dtype == torch.bfloat16 and (perm or 16 <= block_m <= BF16_DEQUANT_MAX_M)}
    if config is None:
        if gemv:
            gate_up, down = _gate_up_decode, _down_decode
        elif perm and ONE_STAGE_BLOCKS:
            gate_up, down = _gate_up_reg_blocks, _down_reg_blocks
        else:
            gate_up, down = _gate_up_blocks, _down_blocks
    else:
        if "PERM" in config:
            raise ValueError(f"config={config}: the register-operand blocks are chosen by reg_a (not PERM)")
        gate_up, down = _gate_up_kernel, _down_kernel
        common.update(config)
    bucket = autotune_bucket(p, DECODE_MAX_PAIRS)
    gate_up[lambda meta: (num_rows, triton.cdiv(inter, meta["BLOCK_N"]))](
        xs, x_factor, gate_up_blocks, gate_up_scales, gate_up_bias, h, pair, expert, p, num_experts, hidden, inter,
        bucket, float(limit), float(alpha), h_factor, TOP_K=top_k, **common,
    )
    down[lambda meta: (num_rows, triton.cdiv(hidden, meta["BLOCK_N"]))](
        h.view(torch.int32) if gemv else h, down_blocks, down_scales, down_bias, weights, out, pair, expert,
        p, num_experts, hidden, inter, bucket, h_factor, **common,
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
    above = getattr(self, "dequantized_above_tokens", None)
    if above is not None and hidden_states.shape[0] > above:  # a big step: the copy (keep_dequantized_copies)
        return moe.experts_forward(self, hidden_states, top_k_index, top_k_weights)
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



def keep_dequantized_copies(modules: list[torch.nn.Module], dtype: torch.dtype, above_tokens: int) -> None:
    """Give each MXFP4 experts module a copy of its experts dequantized to `dtype` in experts=triton's layout
    (`gate_up_proj` [E, H, 2I], `down_proj` [E, I, H], as parameters), used for steps of more than `above_tokens`
    tokens (experts.dequantized_above_tokens): one expert at a time, after checking that all copies fit."""
    need = sum(getattr(m, f"{n}_blocks").numel() * 2 * torch.empty((), dtype=dtype).element_size()
               for m in modules for n in ("gate_up_proj", "down_proj"))  # two weights per byte
    device = modules[0].gate_up_proj_blocks.device
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what the allocator holds unused counts as free here
        check_copy_fits(need, torch.cuda.mem_get_info(device)[0], dtype, device)
    for m in modules:
        for name in ("gate_up_proj", "down_proj"):
            blocks, scales = getattr(m, f"{name}_blocks"), getattr(m, f"{name}_scales")
            e, out, groups, _ = blocks.shape
            w = torch.empty((e, groups * 32, out), dtype=dtype, device=blocks.device)  # [E, in, out]
            for i in range(e):
                w[i] = checkpoint.dequantize_mxfp4(blocks[i], scales[i], dtype).T
            m.register_parameter(name, torch.nn.Parameter(w, requires_grad=False))
        m.dequantized_above_tokens = above_tokens


def check_copy_fits(need: int, free: int, dtype: torch.dtype, device: torch.device) -> None:
    """Stop before making a dequantized copy of `need` bytes with `free` bytes left on the device: ~2 GiB stay
    for the dequantization's temporaries, the graphs and a KV cache."""
    reserve = 2 << 30
    if need > free - reserve:
        raise MXFP4KernelError(
            f"experts.dequantized_above_tokens: the {dtype} copy of this rank's experts needs {need / 1e9:.1f} GB plus "
            f"{reserve / 1e9:.1f} GB to spare, and {free / 1e9:.1f} GB are free on {device}: set "
            f"experts.dequantized_above_tokens=null (4-bit experts only), or split the experts over more GPUs "
            f"(parallel.ep_size)")
