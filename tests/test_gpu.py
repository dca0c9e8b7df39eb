"""On a CUDA GPU (`pytest -m gpu`): the tiny model gives the CPU's greedy tokens, in fp32 and bf16."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from runtime import Engine, Request, compose

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [Request(id=str(i), prompt=p) for i, p in enumerate(["Hello", "What is 2+2?", "Name a colour." * 20])]


def tokens(device: str, dtype: str, experts: str = "grouped_mm", attention: str = "gqa_sinks") -> list[list[int]]:
    eng = Engine(compose("generate", [f"model.device={device}", f"model.dtype={dtype}", f"experts={experts}",
                                      f"attention={attention}", "generation.max_new_tokens=16",
                                      "output.token_ids=true"]))
    return [r["completion_ids"] for r in eng.generate(PROMPTS)]


def test_fp32_gpu_equals_cpu() -> None:
    cpu = tokens("cpu", "float32")
    for experts in ("grouped_mm", "batched_mm", "eager", "triton"):
        assert tokens("cuda", "float32", experts) == cpu, experts


def test_bf16_logits_close_to_fp32() -> None:
    logits = {}
    for dtype in ("float32", "bfloat16"):
        eng = Engine(compose("generate", ["model.device=cuda", f"model.dtype={dtype}"]))
        ids = torch.randint(0, 200_000, (2, 40), generator=torch.Generator().manual_seed(0)).cuda()
        with torch.no_grad():
            logits[dtype] = eng.model(ids).logits.float()
    ref, out = logits["float32"], logits["bfloat16"]
    assert torch.isfinite(out).all()
    # Per token: bf16 rounding can flip a router's top-4 choice, which changes that token a lot, so the
    # check is on the typical token (median) and on the next-token choice, not on a global norm.
    per_token = (out - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert per_token.median() < 3e-2
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kernels", [("gqa_sinks", "grouped_mm"), ("triton", "triton"), ("triton", "mxfp4")])
def test_cuda_graph_decode_equals_eager_decode(dtype: str, kernels: tuple[str, str]) -> None:
    """The captured decode step (and the prefill, graphed when its shape repeats) replays exactly what
    the same code computes eagerly."""
    runs = {}
    for graph in ("true", "false"):
        eng = Engine(compose("generate", ["model.device=cuda", f"model.dtype={dtype}", f"attention={kernels[0]}",
                                          f"experts={kernels[1]}", f"generation.cuda_graph={graph}",
                                          "generation.max_new_tokens=40",
                                          "output.token_ids=true"]))
        for again in ("", "-again", "-thrice"):  # decode graph reused; prefill graph captured, then replayed
            runs[graph + again] = [r["completion_ids"] for r in eng.generate(PROMPTS)]
    assert len({str(v) for v in runs.values()}) == 1, runs


def test_static_cache_equals_dynamic_cache_fp32() -> None:
    runs = {}
    for cache in ("static", "dynamic"):
        eng = Engine(compose("generate", ["model.device=cuda", "model.dtype=float32", f"generation.kv_cache={cache}",
                                          "generation.max_new_tokens=40", "output.token_ids=true"]))
        runs[cache] = [r["completion_ids"] for r in eng.generate(PROMPTS)]
    assert runs["static"] == runs["dynamic"]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("tokens", [1, 8, 64, 1024])
def test_triton_moe_real_shapes(tokens: int) -> None:
    """gpt-oss-20b experts (32 x 2880 x 2880, top-4), bf16, decode and prefill token counts."""
    from runtime.kernels import moe

    g = torch.Generator(device="cuda").manual_seed(tokens)
    e, h, i, k = 32, 2880, 2880, 4
    x = torch.randn(tokens, h, device="cuda", generator=g).bfloat16()
    idx = torch.stack([torch.randperm(e, device="cuda", generator=g)[:k] for _ in range(tokens)])
    w = torch.softmax(torch.randn(tokens, k, device="cuda", generator=g), -1).bfloat16()
    gu = (torch.randn(e, h, 2 * i, device="cuda", generator=g) * 0.02).bfloat16()
    gb = (torch.randn(e, 2 * i, device="cuda", generator=g) * 0.02).bfloat16()
    dn = (torch.randn(e, i, h, device="cuda", generator=g) * 0.02).bfloat16()
    db = (torch.randn(e, h, device="cuda", generator=g) * 0.02).bfloat16()
    out = moe.fused_experts(x, idx, w, gu, gb, dn, db)
    ref = moe.reference_experts(x, idx, w, gu, gb, dn, db)
    assert not out.isnan().any() and _rel(out, ref) <= 1e-2


@pytest.mark.parametrize(("b", "t", "s"), [(1, 1, 1100), (8, 1, 300), (64, 1, 1280), (2, 512, 512)])
def test_gqa_sinks_attention_bf16(b: int, t: int, s: int) -> None:
    from types import SimpleNamespace

    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    from runtime.kernels import attention

    g = torch.Generator(device="cuda").manual_seed(b * t)
    q = torch.randn(b, 64, t, 64, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(b, 8, s, 64, device="cuda", generator=g).bfloat16() for _ in range(2))
    mask = torch.where(torch.rand(b, 1, t, s, device="cuda", generator=g) < 0.2, torch.finfo(torch.bfloat16).min,
                       0.0).bfloat16()
    module = SimpleNamespace(sinks=torch.randn(64, device="cuda", generator=g).bfloat16(), num_key_value_groups=8,
                             training=False)
    out, _ = attention.gqa_sinks_attention(module, q, k, v, mask, scaling=0.125)
    ref, _ = eager_attention_forward(module, q.float(), k.float(), v.float(), mask.float(), scaling=0.125)
    assert not out.isnan().any() and _rel(out, ref) <= 1e-2


@pytest.mark.parametrize(("b", "hkv", "t", "written", "window", "pads"), [
    (1, 8, 1, 1100, None, 0), (1, 8, 1, 1100, 128, 0), (8, 8, 1, 300, None, 17), (64, 8, 1, 1200, None, 5),
    (64, 8, 1, 1200, 128, 5), (2, 8, 512, 0, None, 100), (1, 8, 1024, 0, 128, 0), (3, 4, 7, 250, None, 3),
])
def test_triton_flash_attention_bf16(b: int, hkv: int, t: int, written: int, window: int | None, pads: int) -> None:
    """Our flash kernel (decode with split-K, prefill, sliding window, left pads) against transformers'
    eager attention with the same visibility as an additive mask; gpt-oss heads (64 x 64, 8 KV heads;
    4 KV heads as under tp=2)."""
    from types import SimpleNamespace

    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    from runtime.kernels import flash

    hq, d = hkv * 8, 64
    s = (written + t + 255) // 256 * 256
    g = torch.Generator(device="cuda").manual_seed(b * t + written)
    q = torch.randn(b, t, hq, d, device="cuda", generator=g).bfloat16().transpose(1, 2)
    k, v = (torch.randn(b, hkv, s, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    sinks = torch.randn(hq, device="cuda", generator=g).bfloat16()
    slot_pos = torch.full((b, s), -1, device="cuda")
    slot_pos[:, pads : written + t] = torch.arange(written + t - pads, device="cuda")
    mask = flash.SlotMask(slot_pos, torch.arange(written, written + t, device="cuda").expand(b, t).contiguous())
    out = flash.flash_attention(q, k, v, sinks, mask, 0.125, window)
    module = SimpleNamespace(sinks=sinks.float(), num_key_value_groups=8, training=False)
    ref, _ = eager_attention_forward(module, q.float(), k.float(), v.float(), mask.additive(window, torch.float32),
                                     scaling=0.125)
    live = slot_pos[:, written : written + t] >= 0  # pad queries: any finite output is fine
    assert not out.isnan().any() and _rel(out[live], ref[live]) <= 1e-2


@pytest.mark.parametrize("b,t,lengths,window", [
    (64, 1, 2000, None), (64, 1, 2000, 128), (1, 1, 8000, None), (4, 100, 4100, None), (4, 100, 4100, 128)])
def test_paged_flash_attention_bf16(b: int, t: int, lengths: int, window: int | None) -> None:
    """The kernel over the paged cache at gpt-oss shapes (64 query heads, 8 KV heads, head size 64): decode at
    batch 64 and 1, and a prompt's last 100 tokens after 4,000 cached (the prefix cache's case), each row's
    blocks scattered over the pool, against eager attention on the gathered keys."""
    from types import SimpleNamespace

    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    from runtime.kernels import flash
    from runtime.kvcache import BLOCK_SIZE

    hq, hkv, d = 64, 8, 64
    g = torch.Generator(device="cuda").manual_seed(b + t)
    m = -(-lengths // BLOCK_SIZE)
    blocks = b * m + 1
    k_pool, v_pool = (torch.randn(blocks, hkv, BLOCK_SIZE, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    table = (torch.randperm(blocks - 1, device="cuda", generator=g)[: b * m].view(b, m) + 1).int()
    n = torch.randint(t, lengths + 1, (b,), device="cuda", generator=g)  # each row's length
    q_pos = n[:, None] - t + torch.arange(t, device="cuda")
    q = torch.randn(b, t, hq, d, device="cuda", generator=g).bfloat16().transpose(1, 2)
    sinks = torch.randn(hq, device="cuda", generator=g).bfloat16()
    mask = flash.PagedMask(table, q_pos)
    out = flash.flash_attention(q, k_pool, v_pool, sinks, mask, 0.125, window)
    k, v, add = mask.dense(k_pool, v_pool, window, torch.float32)
    module = SimpleNamespace(sinks=sinks.float(), num_key_value_groups=8, training=False)
    ref, _ = eager_attention_forward(module, q.float(), k.float(), v.float(), add, scaling=0.125)
    assert not out.isnan().any() and _rel(out, ref) <= 1e-2


@pytest.mark.parametrize(("b", "lengths"), [(1, 1100), (1, 8000), (8, 2000), (16, 2000)])
def test_flash_merge_in_kernel_equals_torch_merge(b: int, lengths: int) -> None:
    """Decode at gpt-oss shapes over the paged cache (every case split, at most 132 rows x KV heads): the split-K
    parts merged by the kernel's last split (flash.MERGE_IN_KERNEL, an acquire-release counter per tile) give the
    torch merge's output, replayed from a CUDA graph 100 times on new queries each time (a merging split that read
    a part before its split's stores reached it would read another query's numbers), the counters back at zero."""
    from runtime.kernels import arrivals, flash
    from runtime.kvcache import BLOCK_SIZE

    hq, hkv, d = 64, 8, 64
    assert flash.decode_splits(torch.device("cuda"), b, hkv, 1, lengths, None) > 1
    g = torch.Generator(device="cuda").manual_seed(b)
    m = -(-lengths // BLOCK_SIZE)
    blocks = b * m + 1
    k_pool, v_pool = (torch.randn(blocks, hkv, BLOCK_SIZE, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    table = (torch.randperm(blocks - 1, device="cuda", generator=g)[: b * m].view(b, m) + 1).int()
    q_pos = torch.randint(1, lengths + 1, (b, 1), device="cuda", generator=g) - 1
    q = torch.randn(b, 1, hq, d, device="cuda", generator=g).bfloat16().transpose(1, 2).contiguous()
    sinks = torch.randn(hq, device="cuda", generator=g).bfloat16()
    mask = flash.PagedMask(table, q_pos)
    arrivals.prepare(q.device)
    saved = flash.MERGE_IN_KERNEL

    def attend(merge: bool) -> torch.Tensor:
        flash.MERGE_IN_KERNEL = merge
        return flash.flash_attention(q, k_pool, v_pool, sinks, mask, 0.125, None)

    try:
        attend(True)  # compiled, outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = attend(True)
        for _ in range(100):
            q.copy_(torch.randn(q.shape, device="cuda", generator=g).bfloat16())
            graph.replay()
            ref = attend(False).float()  # the torch merge, eagerly, on the same queries
            assert not out.isnan().any() and _rel(out.float(), ref) <= 5e-3  # (both round to bf16 at the end)
    finally:
        flash.MERGE_IN_KERNEL = saved
    assert int(arrivals.table(q.device, "flash").abs().sum()) == 0


@pytest.mark.parametrize(("experts", "t"), [(128, 1), (128, 8), (32, 1), (32, 4)])
def test_router_in_one_launch(experts: int, t: int) -> None:
    """The decode router's GEMV + top-k in one launch (router.route_gemv, an arrival counter per token) at gpt-oss
    shapes in bf16, replayed from a CUDA graph 100 times on new inputs: its logits within bf16 rounding of
    F.linear's, its expert ids the top-k of its own logits in order and its scores their softmax (a last program
    that read logits before their stores reached it would disagree), the counters back at zero."""
    import torch.nn.functional as F

    from runtime.kernels import arrivals, router

    g = torch.Generator(device="cuda").manual_seed(experts + t)
    w = (torch.randn(experts, 2880, device="cuda", generator=g) / 50).bfloat16()
    b = torch.randn(experts, device="cuda", generator=g).bfloat16()
    x = torch.randn(t, 2880, device="cuda", generator=g).bfloat16()
    arrivals.prepare(x.device)
    counters = arrivals.table(x.device, "router")
    router.route_gemv(x, w, b, 4, counters)  # compiled, outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits, scores, idx = router.route_gemv(x, w, b, 4, counters)
    for _ in range(100):
        x.copy_(torch.randn(x.shape, device="cuda", generator=g).bfloat16())
        graph.replay()
        ref = F.linear(x, w, b).float()
        assert (logits.float() - ref).abs().max() <= 2 ** -7 * ref.abs().max()  # (one bf16 rounding apart)
        top = logits.float().topk(4, dim=-1)
        assert torch.equal(logits.float().gather(1, idx), top.values), (idx, top.indices)
        torch.testing.assert_close(scores.float(), torch.softmax(top.values, -1), rtol=1e-2, atol=1e-3)
    assert int(counters.abs().sum()) == 0


@pytest.mark.parametrize(("pairs", "experts", "block_m"), [(64, 128, 2), (256, 128, 4), (4096, 128, 64),
                                                          (32768, 32, 128)])
def test_block_layout_kernels_at_real_sizes(pairs: int, experts: int, block_m: int) -> None:
    """The block layout's launches (moe.block_layout) at the decode pairs GEMV's and the prefills' sizes == the
    torch layout, row for row, with skewed routing and another rank's pairs."""
    from runtime.kernels import moe

    g = torch.Generator(device="cuda").manual_seed(pairs)
    ids = torch.randint(0, experts + 1, (pairs,), device="cuda", generator=g)
    ids = torch.where(torch.rand(pairs, device="cuda", generator=g) < 0.5, ids % 4, ids)  # 4 crowded experts
    got, want = moe.block_layout(ids, experts, block_m), moe.block_layout_reference(ids, experts, block_m)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("tokens", [1, 1024, 8192])
def test_norm_and_rope_kernels_at_real_shapes(tokens: int) -> None:
    """The eager steps' RMSNorm and RoPE launches (runtime/kernels/norm.py, rope.py) at gpt-oss's shapes in bf16,
    against transformers' ops: within a bf16 rounding, no NaN."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding, apply_rotary_pos_emb

    from runtime.kernels import norm, rope

    g = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, 2880, device="cuda", generator=g).bfloat16() * 4
    w = torch.randn(2880, device="cuda", generator=g).bfloat16()
    xf = x.float()
    ref = (w.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5))).bfloat16()
    out = norm.rms_norm(x, w, 1e-5)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    cfg = GptOssConfig()  # gpt-oss's rope (YaRN), 64 query heads and 8 KV heads of 64
    qkv = torch.randn(1, tokens, (64 + 16) * 64, device="cuda", generator=g).bfloat16()
    q, k, _ = (z.view(1, tokens, -1, 64).transpose(1, 2) for z in qkv.split((64 * 64, 8 * 64, 8 * 64), dim=-1))
    cos, sin = GptOssRotaryEmbedding(cfg).cuda()(qkv, torch.arange(tokens, device="cuda")[None] + 100)
    for o, r in zip(rope.apply(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert o.is_contiguous() and not o.isnan().any()
        torch.testing.assert_close(o.float(), r.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("attention", ["gqa_sinks", "triton"])
def test_fast_path_tokens_equal_reference_path(attention: str) -> None:
    """Tiny model, fp32 on the GPU: static cache + CUDA graph + our attention + triton experts = dynamic +
    eager + grouped_mm."""
    fast = tokens("cuda", "float32", "triton", attention)
    eng = Engine(compose("generate", ["model.device=cuda", "model.dtype=float32", "generation.kv_cache=dynamic",
                                      "attention=eager", "experts=grouped_mm", "generation.max_new_tokens=16",
                                      "output.token_ids=true"]))
    assert fast == [r["completion_ids"] for r in eng.generate(PROMPTS)]


@pytest.mark.parametrize("experts", ["triton", "mxfp4"])
@pytest.mark.parametrize("attention", ["gqa_sinks", "triton"])
def test_compiled_decode_step_equals_plain(attention: str, experts: str) -> None:
    """(CUDA-graph replay against eager decode: test_cuda_graph_decode_equals_eager_decode.)"""
    runs = {}
    for comp in ("true", "false"):
        eng = Engine(compose("generate", ["model.device=cuda", "model.dtype=float32", f"attention={attention}",
                                          f"experts={experts}", f"generation.compile={comp}",
                                          "generation.max_new_tokens=24", "output.token_ids=true"]))
        runs[comp] = [r["completion_ids"] for r in eng.generate(PROMPTS)]
    assert runs["true"] == runs["false"]


def test_mxfp4_dequantized_copy_gives_the_4bit_tokens() -> None:
    """experts.dequantized_above_tokens=2: the prefills and the decode steps of more than 2 rows run from the copy
    dequantized at load (experts=triton's kernel), compiled and captured, and give the 4-bit path's tokens
    (float32: both multiply the same values in IEEE fp32)."""
    runs = []
    for extra in ([], ["experts.dequantized_above_tokens=2", "generation.compile=true"]):
        eng = Engine(compose("generate", ["model.device=cuda", "model.dtype=float32", "attention=triton",
                                          "experts=mxfp4", "generation.max_new_tokens=24", "output.token_ids=true",
                                          *extra]))
        runs.append([r["completion_ids"] for r in eng.generate(PROMPTS)])
    assert len(PROMPTS) > 2 and runs[0] == runs[1]


@pytest.mark.skipif(not os.environ.get("GPTOSS_SYNTH_20B"),
                    reason="set GPTOSS_SYNTH_20B to a `runtime.synth model=gpt-oss-20b` checkpoint directory")
def test_fast_kernels_match_reference_logits_on_20b() -> None:
    """Synthetic gpt-oss-20b, bf16: gqa_sinks + triton vs transformers' eager + grouped_mm, one decoder
    layer at a time (a sliding and a full one). Through all 24 random layers bf16 differences are
    amplified chaotically: transformers' own eager and grouped_mm experts already differ by 26% (median
    per token) on this checkpoint, while one layer agrees to 0.4%."""
    eng = Engine(compose("generate", ["model=gpt-oss-20b", f"model.path={os.environ['GPTOSS_SYNTH_20B']}",
                                      "model.device=cuda"]))
    m = eng.model
    layers, types = m.model.layers, list(m.config.layer_types)
    ids = torch.randint(0, 199_998, (4, 300), generator=torch.Generator().manual_seed(0)).cuda()
    for i in (0, 1):
        m.model.layers = layers[i : i + 1]
        m.config.layer_types, m.config.num_hidden_layers = [types[i]], 1
        out = {}
        with torch.no_grad():
            for attn, experts in (("gqa_sinks", "triton"), ("eager", "grouped_mm")):
                m.set_attn_implementation(attn)
                m.set_experts_implementation(experts)
                out[attn] = m(ids, use_cache=False).logits.float()
        fast, ref = out["gqa_sinks"], out["eager"]
        assert torch.isfinite(fast).all()
        per_token = (fast - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert per_token.median() < 1e-2, (types[i], per_token.median().item())
        assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


# ------------------------------------------------------------------------------ experts=mxfp4


def _mxfp4_problem(tokens: int, e: int, i: int, seed: int, h: int = 2880, k: int = 4) -> tuple:
    """Random routing (with pairs routed to another rank: id e) and MXFP4 experts in the checkpoint layout."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    x = torch.randn(tokens, h, device=dev, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(e + 1, device=dev, generator=g)[:k] for _ in range(tokens)])
    w = (torch.softmax(torch.randn(tokens, k, device=dev, generator=g), -1) * (idx < e)).bfloat16()
    experts = (
        torch.randint(0, 256, (e, 2 * i, h // 32, 16), dtype=torch.uint8, device=dev, generator=g),
        torch.randint(118, 126, (e, 2 * i, h // 32), dtype=torch.uint8, device=dev, generator=g),
        (torch.randn(e, 2 * i, device=dev, generator=g) * 0.02).bfloat16(),
        torch.randint(0, 256, (e, h, i // 32, 16), dtype=torch.uint8, device=dev, generator=g),
        torch.randint(118, 126, (e, h, i // 32), dtype=torch.uint8, device=dev, generator=g),
        (torch.randn(e, h, device=dev, generator=g) * 0.02).bfloat16(),
    )
    return x, idx, w, experts


def _forced(c) -> dict:  # noqa: ANN001
    """An autotuner's triton.Config as fused_mxfp4_experts' `config` (its tile forced)."""
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


@pytest.mark.parametrize("tokens", [64, 256, 1024])
def test_mxfp4_moe_plain_tiles(tokens: int) -> None:
    """The plain MXFP4 blocks (what runs where the register-operand blocks cannot, e.g. sizes per rank that are not
    multiples of 64), every tile forced one by one, against dequantize-then-matmul."""
    from runtime.kernels import moe_mxfp4

    x, idx, w, experts = _mxfp4_problem(tokens, 32, 2880, seed=tokens)
    ref = moe_mxfp4.reference_mxfp4_experts(x, idx, w, *experts)
    for cfg in map(_forced, moe_mxfp4._dot_configs()):
        out = moe_mxfp4.fused_mxfp4_experts(x, idx, w, *experts, config=cfg, reg_a=False)
        assert not out.isnan().any() and _rel(out, ref) <= 1e-2, (cfg, _rel(out, ref))


@pytest.mark.parametrize(("tokens", "e", "block_m"), [(1, 128, 1), (8, 32, 1), (64, 128, 4)])
def test_mxfp4_gemv_tiles(tokens: int, e: int, block_m: int) -> None:
    """Every GEMV tile forced in turn, as loaded and with the next tile prefetched (PREFETCH), at the 120b's batch 1
    and 64 (the pairs GEMV) and the 20b's batch 8, against the reference."""
    from runtime.kernels import moe_mxfp4

    x, idx, w, experts = _mxfp4_problem(tokens, e, 2880, seed=tokens + e)
    ref = moe_mxfp4.reference_mxfp4_experts(x, idx, w, *experts)
    configs = moe_mxfp4._decode_configs()
    assert sum(bool(c.kwargs.get("PREFETCH")) for c in configs) == len(configs) // 2
    for config in map(_forced, configs):
        out = moe_mxfp4.fused_mxfp4_experts(x, idx, w, *experts, block_m=block_m, config=config)
        assert not out.isnan().any() and _rel(out, ref) <= 1e-2, (config, _rel(out, ref))


@pytest.mark.parametrize("block_m", [2, 4])
@pytest.mark.parametrize(("tokens", "e"), [(64, 128), (64, 32), (20, 32)])
def test_mxfp4_moe_pairs_gemv(tokens: int, e: int, block_m: int) -> None:
    """The pairs GEMV (moe_mxfp4.GEMV_PAIRS_PER_EXPERT; passed on the H200 in the seventh session): 2 or 4 pairs of an
    expert a program, each dequantized weight multiplied with all of them in one PTX block, against the reference
    and the blocks, at the 120b's and the 20b's batch 64 and at 20 tokens, replayed from a CUDA graph on new
    routing."""
    from runtime.kernels import moe_mxfp4

    x, idx, w, experts = _mxfp4_problem(tokens, e, 2880, seed=tokens + e + block_m)
    ref = moe_mxfp4.reference_mxfp4_experts(x, idx, w, *experts)
    out = moe_mxfp4.fused_mxfp4_experts(x, idx, w, *experts, block_m=block_m)
    assert not out.isnan().any() and _rel(out, ref) <= 1e-2, _rel(out, ref)
    assert _rel(out, moe_mxfp4.fused_mxfp4_experts(x, idx, w, *experts, block_m=16)) <= 1e-2
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = moe_mxfp4.fused_mxfp4_experts(x, idx, w, *experts, block_m=block_m)
    x2, idx2, w2, _ = _mxfp4_problem(tokens, e, 2880, seed=tokens + e + block_m + 1)
    for old, new in ((x, x2), (idx, idx2), (w, w2)):
        old.copy_(new)
    graph.replay()
    assert _rel(static, moe_mxfp4.reference_mxfp4_experts(x, idx, w, *experts)) <= 1e-2


@pytest.mark.parametrize("tokens", [1, 8, 64, 1024])
@pytest.mark.parametrize(("e", "i"), [(32, 2880), (128, 2880), (32, 1440)])
def test_mxfp4_moe_real_shapes(tokens: int, e: int, i: int) -> None:
    """gpt-oss-20b / 120b experts (and a tp=2 rank's 1440 hidden units), top-4, bf16, decode and prefill
    token counts, against dequantize-to-bf16-then-matmul."""
    from runtime.kernels import moe_mxfp4

    x, idx, w, experts = _mxfp4_problem(tokens, e, i, seed=tokens + e + i)
    out = moe_mxfp4.fused_mxfp4_experts(x, idx, w, *experts)
    ref = moe_mxfp4.reference_mxfp4_experts(x, idx, w, *experts)
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    assert _rel(out, ref) <= 1e-2, _rel(out, ref)


@pytest.mark.parametrize("tokens", [64, 512, 2048])
@pytest.mark.parametrize("e", [32, 128])
def test_mxfp4_moe_reg_a_blocks(tokens: int, e: int) -> None:
    """The blocks with the weights as wgmma's register operand (moe_mxfp4.REG_A_BLOCKS), every tile forced in turn, at
    the 20b's and 120b's shapes, against the reference and the plain blocks. A forced tile that needs more shared
    memory than the GPU has is skipped, as the autotuner skips it (blocks of 128 pairs at 2,048 tokens: 233,472 of
    232,448 bytes on the H200); the autotuned call at the end must still give the reference's result. Every element
    within 2% of itself + 2% of the output's RMS of the plain blocks' (same products, fp32 sums in another order):
    a wgmma that read a k16 slice's registers after they were reused (a ptxas bug before CUDA 13.3, which the
    asynchronous tiles could meet; docs/benchmarks.md) would move an element by several % of the RMS."""
    from triton.runtime.errors import OutOfResources

    from runtime.kernels import moe_mxfp4

    x, idx, w, experts = _mxfp4_problem(tokens, e, 2880, seed=tokens + e)
    ref = moe_mxfp4.reference_mxfp4_experts(x, idx, w, *experts)
    block_m = moe_mxfp4.plan(tokens * 4, num_experts=32)  # the blocks' size, also where 128 experts take the GEMVs
    plain = moe_mxfp4.fused_mxfp4_experts(x, idx, w, *experts, block_m=block_m, reg_a=False)
    assert _rel(plain, ref) <= 1e-2
    ran = 0
    for config in map(_forced, moe_mxfp4._dot_configs(one_stage=True)):  # (the one-stage tiles too)
        try:
            out = moe_mxfp4.fused_mxfp4_experts(x, idx, w, *experts, block_m=block_m, config=config, reg_a=True)
        except OutOfResources:
            continue
        ran += 1
        assert not out.isnan().any() and _rel(out, ref) <= 1e-2, (config, _rel(out, ref))
        assert _rel(out, plain) <= 1e-2, (config, _rel(out, plain))
        dev, rms = (out.float() - plain.float()).abs(), plain.float().pow(2).mean().sqrt()
        assert (dev <= 0.02 * plain.float().abs() + 0.02 * rms).all(), (config, (dev.max() / rms).item())
    assert ran >= 3, ran
    out = moe_mxfp4.fused_mxfp4_experts(x, idx, w, *experts, block_m=block_m, reg_a=True)  # autotuned
    assert _rel(out, ref) <= 1e-2


@pytest.mark.parametrize("tokens", [1, 8, 300])
def test_mxfp4_moe_replays_from_a_cuda_graph(tokens: int) -> None:
    """Captured once, replayed on new routing: equals the eager call (no host sync, fixed shapes)."""
    from runtime.kernels import moe_mxfp4

    x, idx, w, experts = _mxfp4_problem(tokens, 32, 2880, seed=1)
    moe_mxfp4.fused_mxfp4_experts(x, idx, w, *experts)  # autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_mxfp4.fused_mxfp4_experts(x, idx, w, *experts)
    x2, idx2, w2, _ = _mxfp4_problem(tokens, 32, 2880, seed=2)
    for static, new in ((x, x2), (idx, idx2), (w, w2)):
        static.copy_(new)
    graph.replay()
    assert torch.equal(out, moe_mxfp4.fused_mxfp4_experts(x, idx, w, *experts))
    assert _rel(out, moe_mxfp4.reference_mxfp4_experts(x, idx, w, *experts)) <= 1e-2


@pytest.mark.parametrize("attention", ["gqa_sinks", "triton"])
def test_mxfp4_tokens_equal_the_dequantized_twin_fp32(attention: str) -> None:
    """Tiny MXFP4 model, fp32, static cache + CUDA graph: experts=mxfp4 (4-bit in memory) gives the greedy
    tokens of the experts dequantized at load (grouped_mm, triton) and of the CPU."""
    ours = tokens("cuda", "float32", "mxfp4", attention)
    assert ours == tokens("cuda", "float32", "grouped_mm", attention) == tokens("cuda", "float32", "triton", attention)
    assert ours == tokens("cpu", "float32", "mxfp4")


def test_mxfp4_bf16_logits_close_to_dequantized_twin() -> None:
    logits = {}
    for experts in ("mxfp4", "triton"):
        eng = Engine(compose("generate", ["model.device=cuda", "model.dtype=bfloat16", f"experts={experts}"]))
        assert hasattr(eng.model.model.layers[0].mlp.experts, "gate_up_proj_blocks") == (experts == "mxfp4")
        ids = torch.randint(0, 200_000, (2, 40), generator=torch.Generator().manual_seed(0)).cuda()
        with torch.no_grad():
            logits[experts] = eng.model(ids).logits.float()
    out, ref = logits["mxfp4"], logits["triton"]
    assert torch.isfinite(out).all()
    per_token = (out - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert per_token.median() < 1e-2
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.skipif(not os.environ.get("GPTOSS_SYNTH_20B"),
                    reason="set GPTOSS_SYNTH_20B to a `runtime.synth model=gpt-oss-20b` checkpoint directory")
def test_mxfp4_matches_dequantized_logits_on_20b() -> None:
    """Synthetic gpt-oss-20b in MXFP4, bf16, one decoder layer at a time (see the test above for why):
    experts=mxfp4 against the same checkpoint dequantized at load (experts=triton)."""
    from runtime import checkpoint

    path = os.environ["GPTOSS_SYNTH_20B"]
    if not checkpoint.is_mxfp4(checkpoint.read_config(checkpoint.resolve_path(path))):
        pytest.skip(f"{path} is a bf16 checkpoint: write one with runtime.synth synth.format=mxfp4")
    ids = torch.randint(0, 199_998, (4, 300), generator=torch.Generator().manual_seed(0)).cuda()
    out: dict[str, list[torch.Tensor]] = {}
    for experts in ("mxfp4", "triton"):
        eng = Engine(compose("generate", ["model=gpt-oss-20b", f"model.path={path}", "model.device=cuda",
                                          "attention=gqa_sinks", f"experts={experts}"]))
        m = eng.model
        layers, types = m.model.layers, list(m.config.layer_types)
        out[experts] = []
        for i in (0, 1):
            m.model.layers = layers[i : i + 1]
            m.config.layer_types, m.config.num_hidden_layers = [types[i]], 1
            with torch.no_grad():
                out[experts].append(m(ids, use_cache=False).logits.float())
        del eng, m, layers
        gc.collect()
        torch.cuda.empty_cache()
    for fast, ref in zip(out["mxfp4"], out["triton"]):
        assert torch.isfinite(fast).all()
        per_token = (fast - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert per_token.median() < 1e-2, per_token.median().item()
        assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("compile", [False, True])
def test_continuous_step_sizes_replay_their_own_graphs(compile: bool) -> None:
    """The continuous batcher on the GPU (fp32, our kernels, a CUDA graph per step size, compiled or not):
    10 rows stepping as 1, 8 and 10 rows as sequences join and leave give each sequence the tokens it gets
    alone, its prefill a padded-width graph (the CPU test of the same scenario runs eagerly)."""
    from runtime.continuous import ContinuousBatcher
    from tests.test_continuous import join_and_leave, own_blocks

    eng = Engine(compose("generate", ["model.device=cuda", "model.dtype=float32", "attention=triton",
                                      "experts=triton"]))
    prompts = [eng.render(Request(id=str(i), prompt=p.prompt)) for i, p in enumerate(PROMPTS)]
    ref = [eng.decode([p], 24, ignore_eos=True).tokens[0].tolist() for p in prompts]
    b = ContinuousBatcher(eng.model, eng.dtype, eng.device, rows=10, max_len=512, max_prefill_tokens=400,
                          use_graph=True, compile=compile, group=None, leader=True, generator=eng.generator,
                          num_blocks=2 * 10 * 32)  # every row its 32 blocks, and as many for its window table
    b.warm_up()
    own_blocks(b)
    got, sizes = join_and_leave(b, prompts, 24)
    assert sorted(b._graphs) == [1, 8, 10]
    assert sorted(b._prefill_graphs) == [16, 32, 64, 128, 256, 512]  # every prefill a graph replay
    assert sizes[:9] == [1] * 3 + [8] * 3 + [10] * 3 and set(sizes[9:]) == {1}
    assert got[0] == ref[0] and got[1] == ref[1][:7] and got[2] == ref[2][:4]


def test_async_scheduling_on_the_gpu_gives_the_same_tokens() -> None:
    """generation.async_scheduling on the GPU (fp32, our kernels, the steps as CUDA graphs): each step launched
    before the last one's tokens are read, the block tables copied without waiting for it; a queue of mixed
    lengths over 3 rows with chunked prefill gives the tokens of the queue without it."""
    from runtime.continuous import ContinuousBatcher
    from runtime.offline import QueueRun
    from tests.test_offline import LIMITS, PROMPTS, drain

    eng = Engine(compose("generate", ["model.device=cuda", "model.dtype=float32", "attention=triton",
                                      "experts=triton"]))
    prompts = [eng.render(Request(id=str(i), prompt=p)) for i, p in enumerate(PROMPTS)]
    longest = max(len(p) for p in prompts) + max(LIMITS)

    def queue(overlap: bool) -> dict:
        b = ContinuousBatcher(eng.model, eng.dtype, eng.device, rows=3, max_len=longest, max_prefill_tokens=64,
                              use_graph=True, compile=False, group=None, leader=True, generator=eng.generator)
        return drain(QueueRun(b, prompts, LIMITS, set(), chunk=64, overlap=overlap))

    assert queue(True) == queue(False)


def test_serve_on_gpu(tmp_path) -> None:  # noqa: ANN001
    """runtime.serve on the GPU (continuous batching, its decode step captured as a CUDA graph, our
    kernels): concurrent chat requests all complete, and a greedy request gives the same text twice."""
    import json
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from tests.serve_server import torchrun_server

    def chat(root: str, i: int, stream: bool = False) -> dict:
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 8 + i,
                "temperature": 0, "stream": stream}
        req = urllib.request.Request(root + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            if not stream:
                return json.loads(r.read())
            events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            return {"chunks": [json.loads(e) for e in events[:-1]]}

    overrides = ["attention=triton", "experts=triton", "serve.max_batch=4", "serve.max_len=1024"]
    with torchrun_server(tmp_path, 1, overrides, device=["model.device=cuda"]) as server:
        root = server.root
        first = chat(root, 3)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: chat(root, i, stream=i % 2 == 1), range(8)))
        again = chat(root, 3)
    assert first["choices"][0]["message"] == again["choices"][0]["message"]
    for i, r in enumerate(results):
        if i % 2:
            assert r["chunks"], i
        else:
            assert r["choices"][0]["finish_reason"] in ("stop", "length") and r["usage"]["completion_tokens"] >= 1


def test_serve_sizes_its_cache_from_gpu_memory(tmp_path) -> None:  # noqa: ANN001
    """serve.gpu_memory_utilization: the paged KV cache gets the blocks that fit in that fraction of the GPU after
    the weights (far more tokens than serve.max_batch x serve.max_len here), says so, and the server answers."""
    import json
    import re
    import urllib.request

    from tests.serve_server import torchrun_server

    overrides = ["attention=triton", "experts=triton", "serve.max_len=1024", "serve.gpu_memory_utilization=0.3"]
    with torchrun_server(tmp_path, 1, overrides, device=["model.device=cuda"]) as server:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        req = urllib.request.Request(server.root + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            assert json.loads(r.read())["choices"]
        log = server.log.read_text()
    tokens = int(re.search(r"gpu_memory_utilization=0.3: (\d+) KV-cache tokens fit", log).group(1))
    assert tokens > 32 * 1024 and f"= {tokens} tokens" in log

