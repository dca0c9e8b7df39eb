"""Our kernels against the references: the MoE torch reference equals transformers' eager experts; the
Triton MoE and flash attention kernels (Triton's interpreter on the CPU: fp32/fp16, small shapes) equal
the references (transformers' eager attention for the attention)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from runtime.kernels import moe
from tests.conftest import ROOT, compile_for_hopper, traced_targets


def test_reference_equals_transformers_eager_experts() -> None:
    cfg = GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=5, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    ex = GptOssExperts(cfg)
    gen = torch.Generator().manual_seed(0)
    for p in ex.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.3
    x = torch.randn(9, 32, generator=gen)
    idx = torch.stack([torch.randperm(5, generator=gen)[:2] for _ in range(9)])
    w = torch.softmax(torch.randn(9, 2, generator=gen), -1)
    with torch.no_grad():
        ref = ex(x, idx, w)
        ours = moe.reference_experts(x, idx, w, ex.gate_up_proj, ex.gate_up_proj_bias, ex.down_proj,
                                     ex.down_proj_bias, limit=ex.limit, alpha=ex.alpha)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


LAYOUT_CHECK = """
import torch
from runtime.kernels import moe
g = torch.Generator().manual_seed(0)
checked = 0
# (pairs, experts, block_m): one chunk and many, fewer experts than a power of two, another rank's pairs (id E),
# the decode pairs GEMV's 2 and 4 rows a block, the prefill's 64
for p, e, bm in ((6, 3, 2), (1, 4, 16), (64, 32, 4), (300, 128, 2), (1000, 32, 64), (4096, 128, 64), (130, 5, 16),
                 (5000, 128, 128)):
    ids = torch.randint(0, e + 1, (p,), generator=g)  # e: routed to another rank
    if p == 4096:
        ids = torch.randint(0, 8, (p,), generator=g) * 16  # a few crowded experts, most empty
    got = moe.block_layout(ids, e, bm)
    want = moe.block_layout_reference(ids, e, bm)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, want)), (p, e, bm, got, want)
    checked += 1
print("checked", checked)
"""


def test_block_layout_kernels_equal_the_torch_layout() -> None:
    """The block layout's three launches (count, the experts' runs, scatter) give the torch layout exactly: every
    row's pair (the stable sort's order within an expert, P in empty rows) and every block's expert."""
    assert interpret(LAYOUT_CHECK).split() == ["checked", "8"]


def test_block_layout_kernels_compile_for_hopper() -> None:
    """The three layout kernels compile to sm_90 code (Triton's own ptxas) for the 120b's 128 experts."""
    for fn, types in ((moe._layout_count_kernel, {"ids_ptr": "*i64", "hist_ptr": "*i32", "pair_ptr": "*i64"}),
                      (moe._layout_offsets_kernel, {"hist_ptr": "*i32", "off_ptr": "*i32", "block_expert_ptr": "*i64"}),
                      (moe._layout_scatter_kernel, {"ids_ptr": "*i64", "off_ptr": "*i32", "pair_ptr": "*i64"})):
        consts = {"CHUNK": moe.LAYOUT_CHUNK, "BLOCK_E": 128, "BLOCK_B": 64, "BLOCK_C": 32}
        assert compile_for_hopper(fn, consts, types).asm["cubin"], fn.__name__


def test_compiled_steps_keep_the_torch_block_layout(monkeypatch) -> None:  # noqa: ANN001
    """Inside a compiled step (the pairs GEMV's and the blocks' layout at decode) the block layout is torch's ops,
    which inductor fuses (the three launches are for eager steps), even where Triton runs; no graph break."""
    import torch.utils._triton as torch_triton

    monkeypatch.setattr(torch_triton, "has_triton", lambda: True)
    monkeypatch.setattr(moe, "triton_usable", lambda device: True)
    graph = traced_targets(lambda ids: moe.block_layout(ids, 128, 4), torch.randint(0, 128, (64,)))
    assert not any("triton_kernel_wrapper" in t for t in graph), graph
    assert any("sort" in t for t in graph), graph


def test_block_layout_groups_pairs_by_expert() -> None:
    ids = torch.tensor([2, 0, 2, 3, 2, 0])  # expert 3 = not on this rank (num_experts=3)
    pair, block_expert = moe.block_layout(ids, num_experts=3, block_m=2)
    assert block_expert.numel() == 3 + 3 and pair.numel() == 12
    rows = pair.view(-1, 2).tolist()
    experts = block_expert.tolist()
    seen = {}
    for e, r in zip(experts, rows):
        for p in r:
            if p < 6:
                assert e < 3 and ids[p] == e  # a block holds pairs of its expert only
                seen[p] = e
    assert sorted(seen) == [0, 1, 2, 4, 5]  # every local pair once; pair 3 (foreign) nowhere


KERNEL_CHECK = textwrap.dedent("""
    import torch
    from runtime.kernels import moe
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for dtype in (torch.float32, torch.float16):
        for t, E, k, H, I in ((1, 4, 2, 32, 32), (1, 4, 2, 32, 512), (5, 6, 3, 64, 48), (40, 5, 2, 32, 32),
                              (150, 4, 2, 32, 32)):
            x = torch.randn(t, H, generator=g).to(dtype)
            idx = torch.stack([torch.randperm(E + 1, generator=g)[:k] for _ in range(t)])  # E: another rank's
            w = (torch.softmax(torch.randn(t, k, generator=g), -1) * (idx < E)).to(dtype)
            gu, gb = (torch.randn(E, H, 2 * I, generator=g) * 0.2).to(dtype), (torch.randn(E, 2 * I, generator=g) * 0.1).to(dtype)
            dn, db = (torch.randn(E, I, H, generator=g) * 0.2).to(dtype), (torch.randn(E, H, generator=g) * 0.1).to(dtype)
            ref = moe.reference_experts(x, idx, w, gu, gb, dn, db).float()
            out = moe.fused_experts(x, idx, w, gu, gb, dn, db).float()
            assert not out.isnan().any()
            worst = max(worst, ((out - ref).norm() / ref.norm()).item())
    print("worst", worst)
""")


def interpret(script: str) -> str:
    """Run `script` in a fresh Python with Triton's CPU interpreter; its stdout."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_triton_kernel_in_the_interpreter() -> None:
    out = interpret(KERNEL_CHECK)
    assert float(out.split()[-1]) < 1e-3, out


FLASH_CHECK = """
import torch
from types import SimpleNamespace
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward
from runtime.kernels import flash
g = torch.Generator().manual_seed(0)
worst = 0.0
# (B, Hq, Hkv, T, S, D, window, pads, written): the T queries sit at slots [written, written+T)
for b, hq, hkv, t, s, d, window, pads, written in (
    (2, 8, 2, 1, 600, 16, None, 3, 500),   # decode, full layer, split over keys
    (2, 8, 2, 1, 600, 16, 32, 3, 500),     # decode, sliding layer
    (3, 4, 4, 9, 40, 32, None, 4, 0),      # prefill with left pads
    (2, 8, 2, 37, 64, 16, 8, 5, 0),        # prefill, sliding window
    (1, 8, 1, 3, 300, 16, None, 0, 200),   # a few queries after a long cache
):
    for dtype in (torch.float32, torch.float16):
        q = torch.randn(b, t, hq, d, generator=g).to(dtype).transpose(1, 2)  # transformers' layout
        k, v = (torch.randn(b, hkv, s, d, generator=g).to(dtype) for _ in range(2))
        sinks = torch.randn(hq, generator=g)
        slot_pos = torch.full((b, s), -1)
        end = written + t
        for i in range(b):
            p = pads if i == 0 else 0
            slot_pos[i, p:end] = torch.arange(end - p)
        q_slot = torch.arange(written, end).expand(b, t).contiguous()
        m = flash.SlotMask(slot_pos, q_slot)
        add = m.additive(window, torch.float32)
        mod = SimpleNamespace(sinks=sinks, num_key_value_groups=hq // hkv, training=False)
        ref, _ = eager_attention_forward(mod, q.float(), k.float(), v.float(), add, scaling=d**-0.5)
        out = flash.flash_attention(q, k, v, sinks, m, d**-0.5, window).float()
        assert out.shape == ref.shape, (out.shape, ref.shape)
        assert not out.isnan().any()
        err = ((out - ref).norm() / ref.norm()).item()
        print(b, hq, hkv, t, s, d, window, dtype, err)
        worst = max(worst, err)
print("worst", worst)
"""


def test_flash_attention_kernel_in_the_interpreter() -> None:
    """Decode with split-K, sliding windows, left pads, GQA groups of 1-8, fp32 and fp16."""
    out = interpret(FLASH_CHECK)
    assert float(out.split()[-1]) < 1e-3, out


PAGED_CHECK = """
import torch
from types import SimpleNamespace
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward
from runtime.kernels import flash
g = torch.Generator().manual_seed(0)
worst = 0.0
BS = 16
# (B, Hq, Hkv, T, D, window, lengths): row i's T queries are its last T positions (length - T ... length - 1);
# a length of 0: a free row (position -1, sees nothing)
for b, hq, hkv, t, d, window, lengths in (
    (3, 8, 2, 1, 16, None, (300, 17, 0)),     # decode, full layer, split over keys, a free row
    (3, 8, 2, 1, 16, 32, (300, 40, 1)),       # decode, sliding layer
    (2, 4, 4, 9, 32, None, (41, 16)),         # a prompt's rest after its cached blocks
    (2, 8, 2, 20, 16, 8, (53, 20)),           # the same on a sliding layer
):
    m = max(-(-n // BS) for n in lengths) + 1
    blocks = b * m + 1
    for dtype in (torch.float32, torch.float16):
        k_pool, v_pool = (torch.randn(blocks, hkv, BS, d, generator=g).to(dtype) for _ in range(2))
        table = torch.randperm(blocks - 1, generator=g)[: b * m].view(b, m).int() + 1  # scattered blocks
        q = torch.randn(b, t, hq, d, generator=g).to(dtype).transpose(1, 2)
        q_pos = torch.stack([torch.arange(n - t, n) if n else torch.full((t,), -1) for n in lengths])
        q_pos = q_pos.clamp(min=-1).where(q_pos >= 0, torch.tensor(-1))
        sinks = torch.randn(hq, generator=g)
        mask = flash.PagedMask(table, q_pos)
        k, v, add = mask.dense(k_pool, v_pool, window, torch.float32)
        mod = SimpleNamespace(sinks=sinks, num_key_value_groups=hq // hkv, training=False)
        ref, _ = eager_attention_forward(mod, q.float(), k.float(), v.float(), add, scaling=d**-0.5)
        out = flash.flash_attention(q, k_pool, v_pool, sinks, mask, d**-0.5, window).float()
        assert out.shape == ref.shape, (out.shape, ref.shape)
        assert not out.isnan().any()
        live = (q_pos >= 0)[:, :, None, None].expand_as(ref)  # pad queries: any finite output is fine
        err = ((out - ref)[live].norm() / ref[live].norm()).item()
        print(b, hq, hkv, t, d, window, lengths, dtype, err)
        worst = max(worst, err)
print("worst", worst)
"""


FLASH_MERGE_CHECK = """
import torch
from runtime.kernels import arrivals, flash
g = torch.Generator().manual_seed(0)
merged = 0
for b, hq, hkv, s, window, keys in ((1, 8, 2, 900, None, 128), (1, 8, 2, 900, 300, 128), (2, 8, 2, 600, None, 128),
                                    (1, 4, 1, 900, None, 100)):  # the last: 9 splits
    flash.SPLIT_KEYS = keys
    assert flash.decode_splits(torch.device("cpu"), b, hkv, 1, s, window) > 1  # (the interpreter counts 8 SMs)
    q = torch.randn(b, hq, 1, 16, generator=g)
    k, v = (torch.randn(b, hkv, s, 16, generator=g) for _ in range(2))
    sinks = torch.randn(hq, generator=g)
    slot_pos = torch.arange(s).expand(b, s).contiguous()
    slot_pos[0, :5] = -1  # a row with pads
    m = flash.SlotMask(slot_pos, torch.full((b, 1), s - 1))
    flash.MERGE_IN_KERNEL = False
    ref = flash.flash_attention(q, k, v, sinks, m, 0.25, window)
    flash.MERGE_IN_KERNEL = True
    for _ in range(2):  # the counters are back at zero after each call
        out = flash.flash_attention(q, k, v, sinks, m, 0.25, window)
        assert out.shape == ref.shape and not out.isnan().any()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert int(arrivals.table(q.device, "flash").abs().sum()) == 0
        merged += 1
print("merged", merged)
"""


def test_flash_split_merge_in_the_kernel() -> None:
    """Decode's split-K parts merged by the kernel's last split of each tile (flash.MERGE_IN_KERNEL; 8, 3, 4 and 9
    splits) == the torch merge, call after call (every tile's counter reset by its merging split), with pads and a
    window."""
    assert interpret(FLASH_MERGE_CHECK).split() == ["merged", "8"]


def test_paged_flash_attention_kernel_in_the_interpreter() -> None:
    """The kernel reading the paged cache's pools through scattered block tables (decode with split-K and a free
    row, a prompt's rest after cached blocks, sliding windows), against eager attention on the gathered keys."""
    out = interpret(PAGED_CHECK)
    assert float(out.split()[-1]) < 1e-3, out


ROUTER_CHECK = """
import torch
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
from runtime.kernels import arrivals, router
router.GEMV_MAX_TOKENS = 8
torch.use_deterministic_algorithms(True)  # torch.empty then fills NaN: logits read before they are written show
g = torch.Generator().manual_seed(0)
checked = 0
# (tokens, experts, top-k, hidden): up to router.GEMV_MAX_TOKENS (8) tokens the GEMV and the top-k in one launch (several
# programs a token, the last one to arrive takes the top-k), beyond it cuBLAS's GEMM and the top-k kernel (a
# prefill's 300 tokens too)
for t, e, k, h in ((1, 32, 4, 96), (5, 8, 4, 64), (3, 128, 4, 40), (8, 6, 2, 1100), (12, 32, 4, 96), (300, 32, 4, 8)):
    r = GptOssTopKRouter(GptOssConfig(num_local_experts=e, num_experts_per_tok=k, hidden_size=h))
    r.weight.data, r.bias.data = torch.randn(e, h, generator=g), torch.randn(e, generator=g)
    for _ in range(2):  # the counters are back at zero after each call
        x = torch.randn(t, h, generator=g)
        with torch.no_grad():
            ref = r(x)
            out = router.route(x, r.weight, r.bias, k)
        torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-4)  # (fp32 sums in another order)
        torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-6)
        assert torch.equal(out[2], ref[2]), (out[2], ref[2])
        assert int(arrivals.table(x.device, "router").abs().sum()) == 0
        checked += 1
# the arrival rule itself (the interpreter runs programs one after another, so the results cannot show a top-k
# taken early): from P - 1, the first arrival is the last, resets, and the other P - 1 count up to P - 1 again
counters = arrivals.table(x.device, "router")
parts = -(-6 // router.EXPERTS_PER_PROGRAM)
counters[0] = parts - 1
router.route_gemv(torch.randn(1, 64), torch.randn(6, 64), torch.randn(6), 2, counters)
assert int(counters[0]) == parts - 1, (int(counters[0]), parts)
counters.zero_()
print("checked", checked)
"""


def test_router_kernel_in_the_interpreter() -> None:
    """The router (GEMV + top-k in one launch at decode sizes; else, prefills too, cuBLAS's GEMM then the top-k) ==
    transformers' GptOssTopKRouter: logits, softmax scores, expert ids in order, call after call."""
    assert interpret(ROUTER_CHECK).split() == ["checked", "12"]


NORM_ROPE_CHECK = """
import torch
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm, GptOssRotaryEmbedding, apply_rotary_pos_emb
from runtime.fused import FusedRMSNorm
from runtime.kernels import norm, rope
g = torch.Generator().manual_seed(0)
checked = 0
for shape, dtype in (((7, 2880), torch.float32), ((3, 5, 96), torch.bfloat16), ((0, 64), torch.float32)):
    m = GptOssRMSNorm(shape[-1], eps=1e-5).to(dtype)
    m.weight.data = torch.randn(shape[-1], generator=g).to(dtype)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    ref = m(x)
    m.__class__ = FusedRMSNorm  # as runtime.fused swaps it: the same module, its forward in one launch
    out = m(x)
    assert out.dtype == dtype and out.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:  # (transformers rounds w * x from fp32 once too: equal but for the fp32 sum's order)
        torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    checked += 1
# q/k as the fused q/k/v matmul leaves them (strided views), cos/sin as transformers makes them (transposed views)
cfg = GptOssConfig(head_dim=64, num_attention_heads=8, num_key_value_heads=2, hidden_size=128)
emb = GptOssRotaryEmbedding(cfg)
for b, t, dtype, pos_rows in ((2, 5, torch.float32, 2), (3, 4, torch.bfloat16, 3), (3, 6, torch.float32, 1)):
    qkv = torch.randn(b, t, (8 + 2 * 2) * 64, generator=g).to(dtype)
    q, k, _ = (z.view(b, t, -1, 64).transpose(1, 2) for z in qkv.split((8 * 64, 2 * 64, 2 * 64), dim=-1))
    pos = torch.stack([torch.randperm(50, generator=g)[:t] for _ in range(pos_rows)])
    cos, sin = emb(qkv, pos)
    assert cos.stride(-1) != 1  # (what the kernel must read)
    rq, rk = apply_rotary_pos_emb(q, k, cos, sin)
    oq, ok = rope.apply(q, k, cos, sin)
    for o, r in ((oq, rq), (ok, rk)):
        assert o.shape == r.shape and o.is_contiguous()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(o.float(), r.float(), rtol=tol, atol=tol)
    checked += 1
print("checked", checked)
"""


def test_norm_and_rope_kernels_in_the_interpreter() -> None:
    """The eager steps' RMSNorm and RoPE in one launch each == transformers' GptOssRMSNorm and apply_rotary_pos_emb:
    fp32 and bf16, no rows, q/k as strided views of the fused q/k/v matmul, cos/sin as transformers' transposed
    views, per-row positions and one row of positions for the batch."""
    assert interpret(NORM_ROPE_CHECK).split() == ["checked", "6"]


def test_norm_and_rope_kernels_compile_for_hopper() -> None:
    """Both compile to sm_90 code (Triton's own ptxas) at gpt-oss's shapes: the norm's row of 2,880 in one pass
    (8 warps, 16-byte loads), RoPE's 64 query heads of 64."""
    from runtime.kernels import norm, rope

    kernel = compile_for_hopper(norm._rms_norm_kernel, {"BLOCK_H": 4096}, {"x_ptr": "*bf16", "w_ptr": "*bf16",
                                "out_ptr": "*bf16", "eps": "fp32"}, divisible=("H",), num_warps=8)
    assert kernel.asm["cubin"] and "ld.global.v4" in kernel.asm["ptx"]
    kernel = compile_for_hopper(rope._rope_kernel, {"HALF": 32, "BLOCK_H": 64}, {"x_ptr": "*bf16", "out_ptr": "*bf16",
                                "cos_ptr": "*bf16", "sin_ptr": "*bf16"}, num_warps=4)
    assert kernel.asm["cubin"]


def test_router_kernel_compiles_for_hopper() -> None:
    """The router's one-launch GEMV + top-k compiles to sm_90 code (Triton's own ptxas) at the 120b's shapes: the
    arrival counter's atomics acq_rel at GPU scope, the last program's logits read past L1 (ld.global.cg), the
    weights read 16 bytes a load (gpt-oss's hidden size, 2,880, is a multiple of 16, as Triton then knows)."""
    from runtime.kernels import router

    ptrs = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "logits_ptr": "*bf16", "scores_ptr": "*bf16",
            "idx_ptr": "*i64", "cnt_ptr": "*i32"}
    consts = {"TOP_K": 4, "ROWS": router.EXPERTS_PER_PROGRAM, "BLOCK_H": 4096, "BLOCK_E": 128, "BLOCK_K": 4}
    kernel = compile_for_hopper(router._route_gemv_kernel, consts, ptrs, divisible=("H",), num_warps=8)  # as launched
    ptx = kernel.asm["ptx"]
    assert kernel.asm["cubin"] and "atom.global.gpu.acq_rel.add" in ptx and "atom.global.gpu.acq_rel.exch" in ptx
    assert "ld.global.cg" in ptx and "ld.global.v4" in ptx, ptx[-2000:]  # (the weights 16 bytes a load)


def test_torch_compile_traces_the_router_in_one_launch(monkeypatch) -> None:  # noqa: ANN001
    """torch.compile sees the decode router (counters made before, at load) as one user-defined Triton kernel: no
    linear, no top-k of torch's."""
    import torch.utils._triton as torch_triton

    from runtime.kernels import arrivals, router

    monkeypatch.setattr(torch_triton, "has_triton", lambda: True)
    monkeypatch.setattr(router, "GEMV_MAX_TOKENS", 8)
    arrivals.prepare(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    graph = traced_targets(lambda x: router.route(x, w, b, 4), torch.randn(2, 64))
    assert sum("triton_kernel_wrapper" in t for t in graph) == 1, graph
    assert not any("linear" in t or "topk" in t for t in graph), graph


def test_flash_kernel_compiles_for_hopper_with_the_merge() -> None:
    """The decode kernel with the in-kernel merge (acquire-release counter, last split merges) compiles to sm_90 code
    with Triton's own ptxas, the counter's atomics as acq_rel at GPU scope; and without it."""
    from runtime.kernels import flash

    ptrs = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "sink_ptr": "*bf16", "slot_pos_ptr": "*i64",
            "q_slot_ptr": "*i64", "table_ptr": "*i32", "o_ptr": "*fp32", "lse_ptr": "*fp32", "fin_ptr": "*bf16",
            "cnt_ptr": "*i32", "scale_log2": "fp32"}
    for merge in (True, False):
        consts = {"G": 8, "D": 64, "BLOCK_M": 16, "BLOCK_N": 64, "SPLITS": 9, "IEEE": False, "PAGED": True, "BS": 16,
                  "MERGE": merge}
        kernel = compile_for_hopper(flash._flash_kernel, consts, ptrs)
        ptx = kernel.asm["ptx"]
        assert kernel.asm["cubin"]
        # one thread's atomic between CTA barriers: the arrival (acquire-release, GPU scope) and the reset
        assert ("atom.global.gpu.acq_rel.add" in ptx and "atom.global.gpu.acq_rel.exch" in ptx) == merge, merge


def test_torch_compile_traces_the_merging_flash_kernel(monkeypatch) -> None:  # noqa: ANN001
    """torch.compile sees the decode kernel with the in-kernel merge as one user-defined Triton kernel (the counters
    made before, at load, as arrivals.prepare does), with no torch merge after it."""
    import torch.utils._triton as torch_triton

    from runtime.kernels import arrivals, flash

    monkeypatch.setattr(torch_triton, "has_triton", lambda: True)
    monkeypatch.setattr(flash, "triton_usable", lambda device: True)
    monkeypatch.setattr(flash, "MERGE_IN_KERNEL", True)
    arrivals.prepare(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 1, 16, generator=g)
    k, v = (torch.randn(1, 2, 900, 16, generator=g) for _ in range(2))
    sinks = torch.randn(8, generator=g)
    m = flash.SlotMask(torch.arange(900).expand(1, 900).contiguous(), torch.full((1, 1), 899))
    graph = traced_targets(lambda q: flash.flash_attention(q, k, v, sinks, m, 0.25, None), q)
    assert sum("triton_kernel_wrapper" in t for t in graph) == 1
    assert not any("softmax" in t for t in graph), graph
