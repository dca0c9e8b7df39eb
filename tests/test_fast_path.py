"""The fast decode path against the references, on the CPU: the static cache and GPU-side masks give
transformers' DynamicCache tokens; our GQA attention with sinks equals transformers' eager attention."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

from runtime import graph_decode
from runtime.config import GenerationConfig
from runtime.graph_decode import masks
from runtime.kernels import attention
from tests.conftest import ROOT, generate, read_jsonl, traced_targets


@pytest.mark.parametrize("t", [1, 7])
def test_gqa_sinks_attention_equals_eager(monkeypatch: pytest.MonkeyPatch, t: int) -> None:
    gen = torch.Generator().manual_seed(t)
    b, hq, hkv, s, d = 3, 8, 2, 11, 16
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for h, n in ((hq, t), (hkv, s), (hkv, s)))
    mask = torch.where(torch.rand(b, 1, t, s, generator=gen) < 0.3, torch.finfo(torch.float32).min, 0.0)
    mask[0, :, 0, :] = torch.finfo(torch.float32).min  # a query that sees nothing (a left-pad row)
    module = SimpleNamespace(sinks=torch.randn(hq, generator=gen), num_key_value_groups=hq // hkv, training=False)
    ref, _ = eager_attention_forward(module, q, k, v, mask, scaling=d**-0.5)
    monkeypatch.setattr(attention, "SCORE_BYTES_BUDGET", hq * t * s * 4)  # one sequence at a time
    out, _ = attention.gqa_sinks_attention(module, q, k, v, mask, scaling=d**-0.5)
    assert out.shape == ref.shape == (b, t, hq, d)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_combo_kernels_reach_inductor_on_gpus_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """generation.combo_kernels (on by default) becomes inductor's combo_kernels option of the compiled decode step
    on a GPU; on a CPU, or set false, the step compiles with inductor's defaults."""
    seen = []
    monkeypatch.setattr(graph_decode.torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    assert GenerationConfig().combo_kernels
    for device, combo in (("cuda", True), ("cuda", False), ("cpu", True)):
        graph_decode.compiled(len, torch.device(device), combo)
    assert [kw["options"] for kw in seen] == [{"combo_kernels": True}, None, None]
    assert all(kw["dynamic"] is False for kw in seen)


def test_fast_paths_swap_every_norm_and_compile_keeps_transformers_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """runtime.fused gives every RMSNorm (two a layer and the final one) its one-launch forward on the fast paths
    and none on the reference; inside torch.compile that forward is transformers' (aten ops that inductor fuses with
    the residual add), not a Triton launch, even where Triton runs."""
    import torch.utils._triton as torch_triton
    from transformers import GptOssConfig, GptOssForCausalLM
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    from runtime import fused
    from runtime.kernels import moe

    cfg = GptOssConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=32, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=4, vocab_size=128)
    for attention, experts, swapped in (("eager", "grouped_mm", 0), ("triton", "mxfp4", 5), ("gqa_sinks", "triton", 5)):
        model = GptOssForCausalLM(cfg)
        fused.apply(model, attention, experts)
        norms = [m for m in model.modules() if isinstance(m, GptOssRMSNorm)]
        assert len(norms) == 5 and sum(type(m) is fused.FusedRMSNorm for m in norms) == swapped
    monkeypatch.setattr(torch_triton, "has_triton", lambda: True)
    monkeypatch.setattr(moe, "triton_usable", lambda device: True)
    graph = traced_targets(norms[0], torch.randn(3, 64))
    assert not any("triton_kernel_wrapper" in t for t in graph) and any("rsqrt" in t for t in graph), graph


def test_masks_follow_positions_and_window() -> None:
    # row 0: two pad slots, then positions 0..3; row 1: positions 0..5; query at position 4 / 6 (slot 6)
    slot_pos = torch.tensor([[-1, -1, 0, 1, 2, 3, 4, -1], [0, 1, 2, 3, 4, 5, 6, -1]])
    q = torch.tensor([[4], [6]])
    m = masks(slot_pos, q, window=3, dtype=torch.float32)
    seen_full = (m["full_attention"][:, 0, 0] == 0).int().tolist()
    seen_sliding = (m["sliding_attention"][:, 0, 0] == 0).int().tolist()
    assert seen_full == [[0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 0]]
    assert seen_sliding == [[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1, 0]]
    pad_query = masks(slot_pos, torch.tensor([[-1], [-1]]), window=3, dtype=torch.float32)
    assert (pad_query["full_attention"] != 0).all()


@pytest.mark.parametrize("attn", ["eager", "gqa_sinks", "triton"])
def test_static_cache_gives_the_dynamic_cache_tokens(tmp_path: Path, attn: str) -> None:
    """attention=triton runs its torch fallback here (its SlotMask as an additive mask); the kernel itself
    is checked in the interpreter below and on the GPU."""
    prompts = tmp_path / "p.jsonl"
    texts = ["hi", "A prompt long enough to run past the tiny model's 32-token sliding window " * 3, "2+2?"]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    runs = {}
    for cache in ("dynamic", "static"):
        out = tmp_path / f"{cache}.jsonl"
        generate([f"prompts.path={prompts}", f"output.path={out}", "output.token_ids=true", f"attention={attn}",
                  f"generation.kv_cache={cache}", "generation.max_new_tokens=40", "generation.batch_size=3"])
        runs[cache] = [r["completion_ids"] for r in read_jsonl(out)]
    assert runs["static"] == runs["dynamic"]


@pytest.mark.parametrize("attn", ["eager", "triton"])
def test_static_rounds_prefill_in_column_chunks(tmp_path: Path, attn: str) -> None:
    """generation.max_prefill_tokens below rows x prompt width: a static round's prefill runs in column chunks
    (3 rows x 7 columns here, the long prompt's 100+ tokens in 15 forwards, across the 32-token window) and
    gives the tokens of one forward."""
    prompts = tmp_path / "p.jsonl"
    texts = ["hi", "A prompt long enough to run past the tiny model's 32-token sliding window " * 3, "2+2?"]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    runs = {}
    for budget in (8192, 21):
        out = tmp_path / f"{budget}.jsonl"
        generate([f"prompts.path={prompts}", f"output.path={out}", "output.token_ids=true", f"attention={attn}",
                  "generation.batching=static", f"generation.max_prefill_tokens={budget}",
                  "generation.max_new_tokens=24", "generation.batch_size=3"])
        runs[budget] = [r["completion_ids"] for r in read_jsonl(out)]
    assert runs[21] == runs[8192]


def test_flash_kernel_static_path_gives_the_dynamic_cache_tokens(tmp_path: Path) -> None:
    """The whole static-cache loop with our kernels (flash attention, router, MoE; fused QKV) in Triton's interpreter ==
    transformers' loop; so do static rounds whose prefill goes in column chunks (the flash kernel's queries at a
    chunk's slots)."""
    prompts = tmp_path / "p.jsonl"
    texts = ["hi", "A prompt long enough to run past the tiny model's 32-token sliding window " * 3]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    common = [f"prompts.path={prompts}", "output.token_ids=true", "generation.max_new_tokens=12",
              "generation.batch_size=2", "model.device=cpu"]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    fast = tmp_path / "fast.jsonl"
    subprocess.run([sys.executable, "-m", "runtime.generate", *common, f"output.path={fast}",
                    "attention=triton", "experts=triton", "generation.kv_cache=static"],
                   cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    chunked = tmp_path / "chunked.jsonl"
    subprocess.run([sys.executable, "-m", "runtime.generate", *common, f"output.path={chunked}", "attention=triton",
                    "experts=triton", "generation.batching=static", "generation.max_prefill_tokens=40"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    ref = tmp_path / "ref.jsonl"
    generate([*common, f"output.path={ref}", "generation.kv_cache=dynamic"])
    want = [r["completion_ids"] for r in read_jsonl(ref)]
    assert [r["completion_ids"] for r in read_jsonl(fast)] == want
    assert [r["completion_ids"] for r in read_jsonl(chunked)] == want
