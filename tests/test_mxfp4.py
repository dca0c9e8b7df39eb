"""experts=mxfp4 on the CPU: the torch reference against dequantize-then-matmul, the Triton kernel in
Triton's interpreter against the reference, loading (uint8 blocks/scales on the module, per-rank slices,
no bf16 expert weights), clear errors, and the tiny MXFP4 model's greedy tokens against its dequantized
twin, in one process and under torchrun."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from runtime import checkpoint, roofline
from runtime import model as modeling
from runtime.distributed import Groups, LayoutError, make_layout
from runtime.kernels import moe, moe_mxfp4
from tests.conftest import ROOT, compile_for_hopper, generate, read_jsonl, torchrun, traced_targets

MX = ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")


def random_experts(e: int, h: int, i: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> tuple:
    """Random MXFP4 experts in the checkpoint layout, scales near a trained model's (weights ~0.02-0.1)."""
    return (torch.randint(0, 256, (e, 2 * i, h // 32, 16), dtype=torch.uint8, generator=gen),
            torch.randint(118, 126, (e, 2 * i, h // 32), dtype=torch.uint8, generator=gen),
            (torch.randn(e, 2 * i, generator=gen) * 0.1).to(dtype),
            torch.randint(0, 256, (e, h, i // 32, 16), dtype=torch.uint8, generator=gen),
            torch.randint(118, 126, (e, h, i // 32), dtype=torch.uint8, generator=gen),
            (torch.randn(e, h, generator=gen) * 0.1).to(dtype))


def test_reference_equals_dequantize_then_matmul() -> None:
    """reference_mxfp4_experts = the bf16 experts reference on checkpoint.dequantize_mxfp4's weights."""
    gen = torch.Generator().manual_seed(0)
    t, e, k, h, i = 9, 5, 2, 64, 96
    gub, gus, gb, dnb, dns, db = random_experts(e, h, i, gen)
    x = torch.randn(t, h, generator=gen)
    idx = torch.stack([torch.randperm(e + 1, generator=gen)[:k] for _ in range(t)])  # e: another rank's
    w = torch.softmax(torch.randn(t, k, generator=gen), -1) * (idx < e)
    gu = checkpoint.dequantize_mxfp4(gub, gus, torch.float32).transpose(1, 2)  # [E, H, 2I], transformers' layout
    dn = checkpoint.dequantize_mxfp4(dnb, dns, torch.float32).transpose(1, 2)  # [E, I, H]
    ref = moe.reference_experts(x, idx, w, gu, gb, dn, db)
    ours = moe_mxfp4.reference_mxfp4_experts(x, idx, w, gub, gus, gb, dnb, dns, db)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_launch_plan_depends_on_pair_count_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert moe_mxfp4.plan(4) == moe_mxfp4.plan(64) == 1  # decode: one GEMV program per pair
    assert moe_mxfp4.plan(65) == moe_mxfp4.plan(256) == 16 and moe_mxfp4.plan(4096) == 64
    assert moe_mxfp4.plan(4, torch.float32) == 16  # fp32 models: IEEE tl.dot blocks, never the fp16 GEMV
    # the pairs GEMV: up to 4 pairs per expert on average, on layers of 128 experts (the 120b) only
    assert moe_mxfp4.plan(64, num_experts=128) == 1 and moe_mxfp4.plan(256, num_experts=128) == 2
    assert moe_mxfp4.plan(512, num_experts=128) == 4 and moe_mxfp4.plan(1024, num_experts=128) == 64
    assert moe_mxfp4.plan(256, torch.float32, 128) == 16 and moe_mxfp4.plan(128, num_experts=32) == 16
    monkeypatch.setattr(moe_mxfp4, "GEMV_PAIRS_PER_EXPERT", 0)  # off
    assert moe_mxfp4.plan(256, num_experts=128) == 16
    # a forced tile cannot contradict the inputs' order, which reg_a chose before the launch
    x, idx, w = torch.zeros(20, 64), torch.zeros(20, 2, dtype=torch.long), torch.ones(20, 2)
    experts = random_experts(2, 64, 64, torch.Generator().manual_seed(0))
    for config, reg_a, match in (({"BLOCK_N": 16, "BLOCK_K": 64, "PERM": True}, None, "chosen by reg_a"),
                                 ({"BLOCK_N": 16, "BLOCK_K": 32}, True, "multiple of 64: change it, or reg_a=False")):
        with pytest.raises(ValueError, match=match):
            moe_mxfp4.fused_mxfp4_experts(x, idx, w, *experts, config=config, reg_a=reg_a)


def test_old_gpus_get_a_clear_error() -> None:
    with pytest.raises(moe_mxfp4.MXFP4KernelError, match="experts=grouped_mm"):
        moe_mxfp4.check_device(torch.device("cuda"), capability=(7, 5))
    moe_mxfp4.check_device(torch.device("cuda"), capability=(9, 0))
    moe_mxfp4.check_device(torch.device("cpu"))


def test_roofline_counts_mxfp4_experts_at_4_25_bits() -> None:
    assert roofline.expert_bytes_per_param("mxfp4", 2) == 4.25 / 8
    assert roofline.expert_bytes_per_param("triton", 2) == roofline.expert_bytes_per_param("grouped_mm", 2) == 2


KERNEL_CHECK = textwrap.dedent("""
    import torch
    import triton
    import triton.language as tl
    from runtime import checkpoint
    from runtime.kernels import moe_mxfp4 as mx
    from tests.test_mxfp4 import random_experts

    @triton.jit
    def decode_bytes(b_ptr, s_ptr, lo_ptr, hi_ptr):
        i = tl.arange(0, 256)
        lo, hi = mx._e2m1(tl.load(b_ptr + i))
        scale = mx._scale(tl.load(s_ptr + i))
        tl.store(lo_ptr + i, lo * scale)
        tl.store(hi_ptr + i, hi * scale)

    # every byte value, with scales from 2^-27 to 2^113: the in-register decoding is exact
    b = torch.arange(256, dtype=torch.uint8)
    s = torch.linspace(100, 240, 256).to(torch.uint8)
    lo, hi = torch.empty(256), torch.empty(256)
    decode_bytes[(1,)](b, s, lo, hi)
    ref = checkpoint.dequantize_mxfp4(b.view(256, 1, 1).expand(256, 1, 16).contiguous(), s.view(256, 1),
                                      torch.float32)
    assert torch.equal(lo, ref[:, 0]) and torch.equal(hi, ref[:, 1]), (lo, hi, ref[:, :2])
    assert torch.equal(torch.signbit(lo), torch.signbit(ref[:, 0]))  # -0.0 keeps its sign

    torch.use_deterministic_algorithms(True)  # torch.empty then fills NaN: a row left unwritten shows
    g = torch.Generator().manual_seed(0)

    def launch_error(t, E, k, H, I, dtype, **launch):
        # relative error of one launch (tokens t, E experts, top-k, sizes H, I) against the reference; no NaN
        x = torch.randn(t, H, generator=g).to(dtype)
        idx = torch.stack([torch.randperm(E + 1, generator=g)[:k] for _ in range(t)])  # E: another rank's
        w = (torch.softmax(torch.randn(t, k, generator=g), -1) * (idx < E)).to(dtype)
        experts = random_experts(E, H, I, g, dtype)
        ref = mx.reference_mxfp4_experts(x, idx, w, *experts).float()
        out = mx.fused_mxfp4_experts(x, idx, w, *experts, **launch).float()
        assert not out.isnan().any(), launch
        return ((out - ref).norm() / ref.norm()).item()

    worst = 0.0
    # (tokens, experts, top_k, H, I, block_m, config): decode GEMV (block_m 1) and tl.dot blocks, H or I
    # not a multiple of BLOCK_K (masked groups), automatic and forced launch choices
    cases = ((1, 4, 2, 64, 64, None, None), (5, 6, 3, 64, 96, None, None),
             (3, 4, 2, 96, 64, 1, {"BLOCK_N": 8, "BLOCK_K": 64}), (40, 4, 2, 64, 96, None, None),
             (9, 4, 2, 64, 64, 16, {"BLOCK_N": 16, "BLOCK_K": 32}), (150, 4, 2, 32, 64, None, None),
             # the pairs GEMV: 2 or 4 pairs of an expert a program (padding slots, a masked last K tile)
             (40, 4, 2, 64, 96, 2, {"BLOCK_N": 16, "BLOCK_K": 64}), (9, 4, 3, 96, 64, 4, {"BLOCK_N": 8, "BLOCK_K": 64}),
             (12, 4, 2, 64, 64, 4, None),
             # the GEMVs with the next tile prefetched (PREFETCH): one tile, a masked last one, the pairs GEMV
             (3, 4, 2, 64, 64, 1, {"BLOCK_N": 8, "BLOCK_K": 64, "PREFETCH": True}),
             (3, 4, 2, 96, 160, 1, {"BLOCK_N": 8, "BLOCK_K": 64, "PREFETCH": True}),
             (40, 4, 2, 64, 96, 2, {"BLOCK_N": 16, "BLOCK_K": 64, "PREFETCH": True}),
             (9, 4, 3, 96, 64, 4, {"BLOCK_N": 8, "BLOCK_K": 64, "PREFETCH": True}))
    for dtype in (torch.float32, torch.float16):
        for t, E, k, H, I, block_m, config in cases:
            if block_m in (2, 4) and dtype == torch.float32:
                continue  # (the pairs GEMV packs any input to fp16, as the decode GEMV does: one dtype is enough)
            worst = max(worst, launch_error(t, E, k, H, I, dtype, block_m=block_m, config=config))
    # the blocks with the weights as the register operand (REG_A_BLOCKS: x and h in quad order), a masked last K
    # tile (H = 192 in tiles of 128), autotuned and forced, and unpipelined with the next tile loaded by hand
    # (ONE_STAGE: one tile, two, and two with the second masked)
    x = torch.arange(128.).view(1, 128)
    assert mx.quad_order(x)[0, 16 * 2 + 8 * 1 + 2 * 3 + 1].item() == 16 * 3 + 4 * 2 + 2 * 1 + 1
    reg_a_cases = ((torch.float32, (40, 4, 2, 192, 64, 16, {"BLOCK_N": 32, "BLOCK_K": 128})),
                   (torch.float16, (20, 3, 2, 64, 128, 64, None)),
                   (torch.float32, (40, 4, 2, 192, 64, 16, {"BLOCK_N": 32, "BLOCK_K": 128, "ONE_STAGE": True})),
                   (torch.float16, (20, 3, 2, 128, 128, 16, {"BLOCK_N": 16, "BLOCK_K": 64, "ONE_STAGE": True})),
                   (torch.float32, (9, 4, 2, 64, 64, 16, {"BLOCK_N": 16, "BLOCK_K": 64, "ONE_STAGE": True})))
    for dtype, (t, E, k, H, I, block_m, config) in reg_a_cases:
        worst = max(worst, launch_error(t, E, k, H, I, dtype, block_m=block_m, config=config, reg_a=True))
    print("worst", worst)
""")


def _interpret(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_triton_kernel_in_the_interpreter() -> None:
    proc = _interpret(KERNEL_CHECK)
    assert float(proc.stdout.split()[-1]) < 1e-3, proc.stdout


DECODE_CHECK = textwrap.dedent("""
    import torch
    from runtime.kernels import moe_mxfp4 as mx
    from tests.test_mxfp4 import random_experts

    # the input packing: pair order, scaled by a power of two into the top fp16 octave, the inverse factor
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 96, generator=g) * torch.tensor([[1e-4], [1.0], [3e2], [1e5]])
    x16, factor = torch.empty(4, 96, dtype=torch.float16), torch.empty(4)
    mx._pack_x_kernel[(4,)](x, x16, factor, 96, mx.FP16_TOP_EXP, BLOCK_K=128)
    assert torch.equal(factor.log2(), factor.log2().round())
    top = x16.float().abs().amax(-1)
    assert ((top > 2 ** 14) & (top <= 2 ** 15)).all(), top
    assert torch.allclose(x16.float() * factor[:, None], mx.pair_order(x), rtol=1e-3, atol=0), "pair order"
    assert mx.pair_order(torch.arange(8.0)).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]

    # the decode GEMV (forced) on rows of very different magnitudes, fp16 and fp32 inputs
    for dtype in (torch.float16, torch.float32):
        x = (torch.randn(4, 64, generator=g) * torch.tensor([[1e-3], [1.0], [30.0], [1e3]])).to(dtype)
        idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(4)])
        w = torch.softmax(torch.randn(4, 2, generator=g), -1).to(dtype)
        experts = random_experts(4, 64, 96, g, dtype)
        ref = mx.reference_mxfp4_experts(x, idx, w, *experts).float()
        out = mx.fused_mxfp4_experts(x, idx, w, *experts, block_m=1).float()
        err = ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
        assert err < 5e-3, (dtype, err)
    print("ok")
""")


def test_decode_gemv_packs_and_scales_inputs_in_the_interpreter() -> None:
    """The decode GEMV's inputs: fp16 in pair order, each row scaled into the top fp16 octave and back; the
    GEMV (its fp32 twin of the PTX: same nibble-input pairing) matches the reference at any row scale."""
    assert _interpret(DECODE_CHECK).stdout.split()[-1] == "ok"


def _build(ckpt: Path, tp: int = 1, ep: int = 1, rank: int = 0, experts: str = "mxfp4",
           above: int | None = None) -> modeling.LoadedModel:
    hf = checkpoint.read_config(ckpt)
    return modeling.build(ckpt, hf, make_layout(tp, ep, 1, world=(tp * ep, rank, rank)), Groups(),
                          torch.device("cpu"), torch.float32, "eager", experts, above)


def test_dequantized_copy_serves_the_big_steps(tiny_checkpoint: Path) -> None:
    """experts.dequantized_above_tokens: the modules also hold the experts as experts=triton would (a rank's
    share under tp x ep), and steps of more tokens than the threshold run from that copy, the rest from the 4-bit
    weights (blanking the blocks changes only the small steps' output)."""
    for tp, ep, rank in [(1, 1, 0), (2, 2, 3)]:
        lm = _build(tiny_checkpoint, tp, ep, rank, above=3)
        twin = dict(_build(tiny_checkpoint, tp, ep, rank, experts="triton").model.named_parameters())
        for name, p in lm.model.named_parameters():
            if name.endswith((".gate_up_proj", ".down_proj")):
                assert torch.equal(p, twin[name]), name
        assert sum(n.endswith(".down_proj") for n, _ in lm.model.named_parameters()) == len(lm.model.model.layers)
    ex = lm.model.model.layers[0].mlp.experts
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, ex.hidden_size, generator=gen)
    idx = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]]) % ex.gate_up_proj_blocks.shape[0]  # local experts
    w = torch.full(idx.shape, 0.5)
    big, small = ex(x, idx, w), ex(x[:3], idx[:3], w[:3])
    torch.testing.assert_close(small, big[:3], rtol=1e-5, atol=1e-6)  # the same function either way
    ex.gate_up_proj_blocks.zero_()
    assert torch.equal(ex(x, idx, w), big) and not torch.allclose(ex(x[:3], idx[:3], w[:3]), small)
    # it counts as expert memory; errors name the fix
    assert modeling.param_bytes(lm.model)["experts"] > modeling.param_bytes(
        _build(tiny_checkpoint, 2, 2, 3).model)["experts"] * 4
    with pytest.raises(modeling.KernelError, match="needs experts=mxfp4"):
        modeling.check_kernels("eager", False, "triton", 128)
    with pytest.raises(modeling.KernelError, match=">= 0, or null"):
        modeling.check_kernels("eager", False, "mxfp4", -1)
    with pytest.raises(moe_mxfp4.MXFP4KernelError, match=r"needs 229.0 GB plus 2.1 GB to spare, and 80.0 GB.*=null"):
        moe_mxfp4.check_copy_fits(229 * 10**9, 80 * 10**9, torch.bfloat16, torch.device("cuda", 0))
    moe_mxfp4.check_copy_fits(38 * 10**9, 100 * 10**9, torch.bfloat16, torch.device("cuda", 0))


def test_experts_stay_in_mxfp4(tiny_checkpoint: Path) -> None:
    """The modules hold the checkpoint's uint8 tensors as stored; no bf16/fp32 expert weight exists."""
    lm = _build(tiny_checkpoint)
    reader = checkpoint.CheckpointReader(tiny_checkpoint)
    for i, layer in enumerate(lm.model.model.layers):
        ex = layer.mlp.experts
        assert not hasattr(ex, "gate_up_proj") and not hasattr(ex, "down_proj")
        for name in MX:
            held = getattr(ex, name)
            assert held.dtype == torch.uint8 and torch.equal(held, reader.read(f"model.layers.{i}.mlp.experts.{name}"))
        assert ex.gate_up_proj_bias.dtype == torch.float32
    assert all(p.dtype == torch.uint8 for n, p in lm.model.named_parameters() if n.endswith(MX))
    # param_bytes counts them as experts: 4.25 bits per weight plus the biases
    hf = lm.hf_config
    n, h, i = hf.num_local_experts * hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size
    weights = n * 3 * h * i * 17 // 32
    assert modeling.param_bytes(lm.model)["experts"] == weights + n * (2 * i + h) * 4
    bf = _build(tiny_checkpoint, experts="grouped_mm")
    assert modeling.param_bytes(lm.model)["experts"] < modeling.param_bytes(bf.model)["experts"] / 5


@pytest.mark.parametrize(("tp", "ep"), [(2, 1), (1, 2), (2, 2)])
def test_each_rank_holds_its_blocks(tiny_checkpoint: Path, tp: int, ep: int) -> None:
    """EP splits the experts, TP the hidden units: gate_up rows (gate/up interleaved, so a contiguous
    range) and down's input groups; the ranks' 4-bit tensors tile the checkpoint's."""
    full = {n: p for n, p in _build(tiny_checkpoint).model.named_parameters()}
    ranks = [dict(_build(tiny_checkpoint, tp, ep, r).model.named_parameters()) for r in range(tp * ep)]
    for name in [n for n in full if n.endswith(MX)]:
        gate_up = ".gate_up_proj_" in name
        for shard in ranks:
            assert shard[name].dtype == torch.uint8
        rebuilt = torch.cat([torch.cat([ranks[e * tp + t][name] for t in range(tp)], dim=1 if gate_up else 2)
                             for e in range(ep)], dim=0)
        assert torch.equal(rebuilt, full[name]), name
    bytes_full = sum(p.numel() for n, p in full.items() if n.endswith(MX))
    for shard in ranks:
        # what the rank holds in memory: dense tensors of its share, not views into a larger read
        assert all(p.is_contiguous() for p in shard.values())
        held = sum(p.untyped_storage().nbytes() for n, p in shard.items() if n.endswith(MX))
        assert held == bytes_full // (tp * ep)


def test_clear_errors(tiny_checkpoint: Path) -> None:
    with pytest.raises(LayoutError, match=r"tp_size=4 .* 16 hidden units.*ep_size"):
        _build(tiny_checkpoint, tp=4, ep=1)  # tiny: intermediate_size 64 = 2 groups of 32
    hf = checkpoint.read_config(tiny_checkpoint)
    del hf.quantization_config  # the bf16 twin's config
    with pytest.raises(modeling.KernelError, match="stores its experts in bf16.*experts=triton"):
        modeling.build(tiny_checkpoint, hf, make_layout(1, 1, 1, world=(1, 0, 0)), Groups(), torch.device("cpu"),
                       torch.float32, "eager", "mxfp4")


COMMON = ["output.token_ids=true", "generation.max_new_tokens=12", "generation.batch_size=2"]


@pytest.fixture(scope="module")
def dequantized_twin(tmp_path_factory: pytest.TempPathFactory) -> list[list[int]]:
    """Greedy tokens of the tiny MXFP4 model with its experts dequantized at load (grouped_mm)."""
    out = tmp_path_factory.mktemp("twin") / "out.jsonl"
    generate([f"output.path={out}", "experts=grouped_mm", *COMMON])
    return [r["completion_ids"] for r in read_jsonl(out)]


@pytest.mark.parametrize("above", [None, 4])
def test_greedy_tokens_equal_the_dequantized_twin(tmp_path: Path, dequantized_twin: list[list[int]],
                                                  above: int | None) -> None:
    """Also with the prefills (more than 4 tokens) on the dequantized copy and the decode steps on the 4 bits."""
    out = tmp_path / "out.jsonl"
    generate([f"output.path={out}", "experts=mxfp4", *COMMON] +
             ([f"experts.dequantized_above_tokens={above}"] if above is not None else []))
    assert [r["completion_ids"] for r in read_jsonl(out)] == dequantized_twin


END_TO_END = textwrap.dedent("""
    from runtime import Engine, Request, compose
    reqs = [Request(id="0", prompt="Hello"), Request(id="1", prompt="Name a colour. " * 6)]
    runs = {}
    for experts in ("mxfp4", "grouped_mm"):
        eng = Engine(compose("generate", ["model.device=cpu", f"experts={experts}", "generation.max_new_tokens=4",
                                          "output.token_ids=true"]))
        runs[experts] = [r["completion_ids"] for r in eng.generate(reqs)]
    assert runs["mxfp4"] == runs["grouped_mm"], runs
    print("ok")
""")


def test_triton_kernel_generates_the_twin_tokens_in_the_interpreter() -> None:
    """The whole model with the Triton kernel (prefill: tl.dot blocks; decode: GEMV) in the interpreter."""
    assert _interpret(END_TO_END).stdout.split()[-1] == "ok"


@pytest.mark.parametrize(("tp", "ep"), [(2, 1), (1, 2), (2, 2)])
def test_parallel_mxfp4_matches_one_process(tmp_path: Path, dequantized_twin: list[list[int]], tp: int,
                                            ep: int) -> None:
    out = tmp_path / "out.jsonl"
    torchrun(tp * ep, "runtime.generate", [f"parallel.tp_size={tp}", f"parallel.ep_size={ep}", "experts=mxfp4",
                                     f"output.path={out}", *COMMON])
    assert [r["completion_ids"] for r in read_jsonl(out)] == dequantized_twin


def test_120b_in_mxfp4_fits_one_80gb_gpu() -> None:
    """experts=mxfp4 holds exactly the checkpoint's tensors: gpt-oss-120b is about 61 GiB (issue: <= 66 GiB,
    leaving room for a KV cache of 64 sequences x 2k tokens, 9 GiB), where bf16 experts need ~217 GiB."""
    import math

    cfg = checkpoint.synthetic_config({"num_hidden_layers": 36, "num_local_experts": 128}, "mxfp4")
    held = sum(math.prod(s) * torch.empty((), dtype=d).element_size()
               for _, s, d, _ in checkpoint.tensor_specs(cfg, "mxfp4"))
    assert 60 < held / 2**30 < 62
    kv = 64 * 2048 * cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 2
    assert held + kv < 72 * 2**30


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    """PTX lop3.b32: bit i of the result is bit (a_i b_i c_i, read as a 3-bit number) of lut."""
    return sum(((lut >> (((a >> i) & 1) << 2 | ((b >> i) & 1) << 1 | ((c >> i) & 1))) & 1) << i for i in range(32))


def test_bf16_dequantization_ptx() -> None:
    """_e2m1_bf16_asm's PTX, run op by op on the CPU: 4 bytes (every code in both nibbles over the cases) times their
    E8M0 scales give the reference's bf16 weights; the per-byte variant (the register-operand blocks) with 4
    different scales, the shared one where Triton packs 4 bytes of one group (one scale)."""
    g = torch.Generator().manual_seed(0)
    for each in (False, True):
        asm = moe_mxfp4._e2m1_bf16_asm(scale_each=each)
        for case in range(64):  # bytes 0-255 over the cases: every low and high code
            wb = [case * 4 + i for i in range(4)]
            exps = [int(e) for e in torch.randint(100, 150, (4,), generator=g)] if each else [120 + case % 16] * 4
            words = [(e << 7) | (e << 23) for e in exps]  # _scale_bf16x2: the bf16 2^(e - 127) in both halves
            packed = wb[0] | wb[1] << 8 | wb[2] << 16 | wb[3] << 24
            ran = _run_ptx(asm, {f"${4 + i}": v for i, v in enumerate([packed, *words])})
            out = [ran[f"${i}"] for i in range(4)]
            got = torch.tensor([[o & 0xFFFF, o >> 16] for o in out], dtype=torch.int32).to(torch.int16)
            lo, hi = got.view(torch.bfloat16).float().reshape(2, 4)  # $0 $1: low nibbles of bytes 0-3; $2 $3: high
            want = checkpoint.dequantize_mxfp4(torch.tensor(wb, dtype=torch.uint8).reshape(4, 1, 1),
                                               torch.tensor(exps, dtype=torch.uint8).reshape(4, 1), torch.float32)
            torch.testing.assert_close(torch.stack([lo, hi], 1), want, rtol=0, atol=0)


def _run_ptx(asm: str, regs: dict[str, int | float]) -> dict[str, int | float]:
    """Run our inline PTX (_e2m1_bf16_asm's, _group_dot_asm's) op by op on the CPU: 32-bit integer ops, prmt, lop3,
    bf16x2 multiplies, fp16x2 FMAs and adds (one rounding each, as the GPU), fp16 -> fp32 and fp32 ops. regs: the $
    operands in (b32 as int, f32 as float); returns every register."""
    def halves(word: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16).view(dtype)

    def word(h: torch.Tensor) -> int:
        bits = h.to(torch.float16).view(torch.int16).int() & 0xFFFF
        return int(bits[0]) | int(bits[1]) << 16

    def f32(v: torch.Tensor) -> float:
        return v.to(torch.float32).item()

    regs = dict(regs)
    for ins in asm.strip("{} ").split(";"):
        ins = ins.strip().strip("{} ").strip()
        if not ins or ins.startswith(".reg"):
            continue
        op, rest = ins.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):  # mov.b32 {h0, h1}, c: the two halves
            lo, hi = rest[1:rest.index("}")].replace(",", " ").split()
            src = regs[rest.split(",")[-1].strip()]
            regs[lo], regs[hi] = src & 0xFFFF, src >> 16
            continue
        dst, *args = [a.strip() for a in rest.split(",")]
        val = [regs[a] if a in regs else (0.0 if a == "0f00000000" else int(a, 0)) for a in args]
        if op in ("mov.b32", "mov.f32"):
            out = val[0]
        elif op == "shl.b32":
            out = (val[0] << val[1]) & 0xFFFFFFFF
        elif op == "shr.u32":
            out = val[0] >> val[1]
        elif op == "prmt.b32":  # byte i of the result: byte (selector nibble i) of {b, a}
            both = val[0] | val[1] << 32
            out = sum(((both >> 8 * ((val[2] >> 4 * i) & 7)) & 0xFF) << 8 * i for i in range(4))
        elif op == "mul.rn.bf16x2":
            prod = (halves(val[0], torch.bfloat16).float() * halves(val[1], torch.bfloat16).float()).bfloat16()
            bits = prod.view(torch.int16).int() & 0xFFFF
            out = int(bits[0]) | int(bits[1]) << 16
        elif op in ("and.b32", "or.b32"):
            out = val[0] & val[1] if op == "and.b32" else val[0] | val[1]
        elif op == "lop3.b32":
            out = _lop3(*val)
        elif op == "fma.rn.f16x2":
            out = word(halves(val[0]).double() * halves(val[1]).double() + halves(val[2]).double())
        elif op == "add.rn.f16x2":
            out = word(halves(val[0]).double() + halves(val[1]).double())
        elif op == "cvt.f32.f16":
            out = torch.tensor([val[0]], dtype=torch.int32).to(torch.int16).view(torch.float16).item()
        elif op == "add.f32":
            out = f32(torch.tensor(val[0], dtype=torch.float32) + torch.tensor(val[1], dtype=torch.float32))
        else:
            assert op == "mul.f32", op
            out = f32(torch.tensor(val[0], dtype=torch.float32) * torch.tensor(val[1], dtype=torch.float32))
        regs[dst] = out
    return regs


def _group_dot_model(values: torch.Tensor, x: torch.Tensor, scale: float) -> float:
    """What _group_dot_asm computes for one input, from the decoded weights: values[8j + q] (nibble q of word j) as
    fp16 value * 2^-14 meets input 8j + q; nibble pairs (p, p + 4) in fp16x2 lanes, FMAs (one rounding each) into
    accumulator p % 2 in order, the two added in fp16, the lanes in fp32, times the scale in fp32."""
    c = torch.zeros(2, 2, dtype=torch.float16)  # [accumulator, lane]
    for j in range(4):
        for p in range(4):
            lanes = [8 * j + p, 8 * j + p + 4]
            a = (values[lanes] * 2.0 ** -14).half()
            c[p % 2] = (a.double() * x[lanes].double() + c[p % 2].double()).half()
    lanes = (c[0].double() + c[1].double()).half().float()
    return ((lanes[0] + lanes[1]) * torch.tensor(scale, dtype=torch.float32)).item()


@pytest.mark.parametrize("pairs", [1, 2, 4])
def test_gemv_ptx_gives_the_models_bits(pairs: int) -> None:
    """_group_dot_asm's PTX, run op by op: bit for bit what its arithmetic gives on the decoded weights
    (_group_dot_model), over every code in every nibble position, random words, inputs and scales, so each nibble's
    sign and magnitude land where fp16 has them and meet their own input; and the group's dot to fp16 accuracy."""
    g = torch.Generator().manual_seed(pairs)
    n = 16 * pairs
    for case in range(24):
        words = [int(w) & 0xFFFFFFFF for w in torch.randint(0, 2**32, (4,), generator=g, dtype=torch.int64)]
        if case < 16:  # nibble code `case` in every position, then random words
            words = [int.from_bytes(bytes([case | case << 4] * 4), "little")] * 4
        xs = (torch.randn(pairs, 32, generator=g) * 2000).to(torch.float16)  # inputs as the GEMV scales them
        scale = float(2.0 ** int(torch.randint(-4, 5, (1,), generator=g)))
        regs: dict[str, int | float] = {f"${n + j}": words[j] for j in range(4)}
        for i in range(pairs):  # input pair register 4j + p holds inputs 8j + p (low half) and 8j + p + 4 (high)
            for j in range(4):
                for p in range(4):
                    lo, hi = xs[i, 8 * j + p], xs[i, 8 * j + p + 4]
                    regs[f"${n + 4 + 16 * i + 4 * j + p}"] = int(torch.stack([lo, hi]).view(torch.int16)[0]) & 0xFFFF \
                        | (int(torch.stack([lo, hi]).view(torch.int16)[1]) & 0xFFFF) << 16
        regs[f"${2 * n + 4}"] = scale
        ran = _run_ptx(moe_mxfp4._group_dot_asm(pairs), regs)
        codes = torch.tensor([(w >> (4 * q)) & 0xF for w in words for q in range(8)], dtype=torch.uint8)
        values = checkpoint.dequantize_mxfp4(  # input 8j + q meets nibble q of word j
            (codes[0::2] | codes[1::2] << 4).view(1, 1, 16), torch.tensor([[127]], dtype=torch.uint8),
            torch.float32).reshape(32)
        for i in range(pairs):
            got = ran[f"${16 * i}"]
            assert got == _group_dot_model(values, xs[i], scale), (case, i, got)
            want = float((values * xs[i].float()).sum()) * 2.0 ** -14 * scale
            assert abs(got - want) <= 2e-3 * (values.abs() * xs[i].float().abs()).sum() * 2.0 ** -14 * scale


def _bf16_asm_packs(ttgir: str) -> list[tuple[bool, bool]]:
    """For each call of _e2m1_bf16_asm's PTX in a kernel's TTGIR: (it scales each byte by its own scale, the 4 bytes
    Triton packs into one call are 4 aligned bytes of one row, so of one group of 16). The shared-scale PTX reads
    only the first byte's scale: on the GPU, a layout whose packed registers span rows (as the register-operand
    blocks' do: their first register step is 8 rows) gave wrong weights there, which the interpreter cannot show."""
    layouts = dict(re.findall(r"^(#\w+) = (.*)$", ttgir, re.M))
    packs = []
    for line in ttgir.splitlines():
        if "elementwise_inline_asm" not in line or "0x7E807E80" not in line:
            continue
        shape, name = re.search(r"tensor<([0-9x]+)xi8, (#\w+)>", line).groups()
        rank, layout = len(shape.split("x")), layouts[name]
        last = [0] * (rank - 1)
        if layout.startswith("#ttg.linear"):
            bases = json.loads(re.search(r"register = (\[[^=]*\]),\s*lane", layout).group(1))
            one_group = bases[:2] == [last + [1], last + [2]]
        else:  # blocked: a thread's first 4 registers run along its order's first dim
            per_thread = json.loads(re.search(r"sizePerThread = (\[[^\]]*\])", layout).group(1))
            order = json.loads(re.search(r"order = (\[[^\]]*\])", layout).group(1))
            one_group = order[0] == rank - 1 and per_thread[-1] % 4 == 0
        packs.append(("prmt.b32 s01" in line, one_group))
    return packs


def test_kernels_compile_for_hopper() -> None:
    """Every launch shape of both kernels (GEMVs of 1, 2 and 4 pairs; tl.dot blocks) compiles to sm_90 code (Triton's
    own ptxas; no GPU needed), so a kernel that only the interpreter accepts is caught here; the weights load 16
    bytes at a time (in the GEMVs as runs of a row: >= 8 lanes along a row) and their nibbles are placed with lop3
    bit-selects; in the register-operand blocks (REG_A_BLOCKS) they reach the tensor cores from registers, for
    blocks of 16 pairs too, and unpipelined (ONE_STAGE)."""
    import triton

    types = {"x_ptr": "*bf16", "h_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16", "wb_ptr": "*u8",
             "ws_ptr": "*u8", "rw_ptr": "*fp32", "pair_ptr": "*i32", "expert_ptr": "*i32", "limit": "fp32",
             "alpha": "fp32", "h_factor": "fp32", "xf_ptr": "*fp32"}
    for fn in (moe_mxfp4._gate_up_kernel, moe_mxfp4._down_kernel):
        x_first = [c for c in moe_mxfp4._dot_configs() if c.kwargs["BLOCK_N"] == 64 and c.kwargs["BLOCK_K"] == 128][0]
        bf16 = triton.Config({**x_first.kwargs, "BF16": True}, num_warps=4, num_stages=3)  # _e2m1_bf16's PTX
        gemv = moe_mxfp4._decode_configs()[9]  # (with PREFETCH: the plain form's code is a subset of it)
        assert gemv.kwargs.get("PREFETCH")
        reg_a = triton.Config({**x_first.kwargs, "BF16": True, "PERM": True}, num_warps=4, num_stages=3)
        one_stage = triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BF16": True, "PERM": True, "ONE_STAGE": True},
                                  num_warps=4, num_stages=4)
        for block_m, config in ((1, gemv), (2, gemv), (4, gemv), (16, x_first), (128, x_first), (16, bf16),
                                (16, reg_a), (64, reg_a), (64, one_stage)):
            consts = {"TOP_K": 4, "BLOCK_M": block_m, "IEEE": False, "ASM": True, "BF16": False, "PERM": False,
                      **config.kwargs}
            # decode: inputs are fp16 pairs (int32), gate_up writes fp16 h that down reads as pairs
            pairs = {"x_ptr": "*i32", "h_ptr": "*fp16" if fn is moe_mxfp4._gate_up_kernel else "*i32"}
            kernel = compile_for_hopper(fn, consts, {**types, **pairs} if block_m < 16 else types,
                                        divisible=("hidden", "inter"), num_warps=config.num_warps,
                                        num_stages=config.num_stages)
            ptx = kernel.asm["ptx"]
            assert kernel.asm["cubin"] and re.search(r"ld\.global\.v4|cp\.async\.cg\.shared\.global.*, 0x10,", ptx)
            if block_m < 16:  # the GEMVs: each dequantized weight pair meets every pair's inputs in an fp16x2 FMA,
                # each word's nibbles split by two lop3 bit-selects
                fma = ptx.count("fma.rn.f16x2")
                assert fma >= 16 * block_m and ptx.count("lop3.b32") >= fma // (2 * block_m), (fn.__name__, block_m)
            if config.kwargs.get("BF16"):  # the bytes become bf16 weights by bit operations and bf16x2 multiplies
                assert "mul.rn.bf16x2" in ptx and "prmt.b32" in ptx and "lop3.b32" in ptx
                packs = _bf16_asm_packs(kernel.asm["ttgir"])
                assert packs, (fn.__name__, block_m)
                # the register-operand blocks give each byte its scale; elsewhere 4 packed bytes share one
                assert all(each == bool(config.kwargs.get("PERM")) for each, _ in packs), (fn.__name__, packs)
                assert all(each or one_group for each, one_group in packs), (fn.__name__, block_m, packs)
            if block_m < 16:  # the GEMVs' weights load: a warp's lanes along runs of a row's groups
                ttgir = kernel.asm["ttgir"]
                lay = re.search(r"tt\.load [^\n]*tensor<\d+x\d+x!tt\.ptr<i8>, (#\w+)>", ttgir).group(1)
                lanes = re.search(lay + r" = #ttg\.blocked<\{sizePerThread = \[1, 16\], threadsPerWarp = \[\d+, (\d+)\]",
                                  ttgir)  # 16 bytes a thread (one vector load), >= 8 lanes along the row
                assert lanes and int(lanes.group(1)) >= 8, (fn.__name__, block_m, lay)
            if config.kwargs.get("PERM"):  # weights enter wgmma as registers (A)
                assert re.search(r"wgmma\.mma_async\S*\.bf16\.bf16\s+\{[^}]*\},\s*\{", ptx), (fn.__name__, block_m)


@pytest.mark.parametrize("tokens", [2, 40])  # the decode GEMV launch, the tl.dot blocks
def test_torch_compile_traces_the_launches(tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile sees the MXFP4 launches as user-defined Triton kernels (as in the compiled decode step on a
    GPU; here the check that a GPU is present is patched) and traces two layers into one graph. torch 2.11's
    tracer failed on the blocks' autotuner when it had a pruning hook ("ListVariable ... already tracked for
    mutation"): the configs are plain lists now."""
    import torch.utils._triton as torch_triton

    monkeypatch.setattr(torch_triton, "has_triton", lambda: True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 64, generator=g).bfloat16()
    idx = torch.randint(0, 4, (tokens, 4), generator=g)
    w = torch.rand(tokens, 4, generator=g).bfloat16()
    experts = random_experts(4, 64, 64, g, torch.bfloat16)
    def two_layers(x: torch.Tensor) -> torch.Tensor:
        y = moe_mxfp4.fused_mxfp4_experts(x, idx, w, *experts)
        return moe_mxfp4.fused_mxfp4_experts(y, idx, w, *experts)

    graph = traced_targets(two_layers, x)  # (no GPU to run it on)
    assert sum("triton_kernel_wrapper" in t for t in graph) == (6 if tokens == 2 else 4)
