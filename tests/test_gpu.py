"""On a CUDA GPU (`pytest -m gpu`): the tiny model gives the CPU's greedy tokens, in fp32 and bf16."""

from __future__ import annotations

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
@pytest.mark.parametrize("kernels", [("gqa_sinks", "grouped_mm"), ("triton", "triton")])
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


@pytest.mark.parametrize("attention", ["gqa_sinks", "triton"])
def test_fast_path_tokens_equal_reference_path(attention: str) -> None:
    """Tiny model, fp32 on the GPU: static cache + CUDA graph + our attention + triton experts = dynamic +
    eager + grouped_mm."""
    fast = tokens("cuda", "float32", "triton", attention)
    eng = Engine(compose("generate", ["model.device=cuda", "model.dtype=float32", "generation.kv_cache=dynamic",
                                      "attention=eager", "experts=grouped_mm", "generation.max_new_tokens=16",
                                      "output.token_ids=true"]))
    assert fast == [r["completion_ids"] for r in eng.generate(PROMPTS)]


@pytest.mark.parametrize("attention", ["gqa_sinks", "triton"])
def test_compiled_decode_step_equals_plain(attention: str) -> None:
    runs = {}
    for comp in ("true", "false"):
        eng = Engine(compose("generate", ["model.device=cuda", "model.dtype=float32", f"attention={attention}",
                                          "experts=triton", f"generation.compile={comp}", "generation.max_new_tokens=24",
                                          "output.token_ids=true"]))
        runs[comp] = [r["completion_ids"] for r in eng.generate(PROMPTS)]
    assert runs["true"] == runs["false"]


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
