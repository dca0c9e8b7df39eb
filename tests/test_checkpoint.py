"""Synthetic checkpoints in the real layout, and our sharded loader against transformers' own."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from runtime import checkpoint
from runtime import model as modeling
from runtime.distributed import Groups, make_layout

ASSETS = checkpoint.ASSETS


def test_synthetic_config_is_the_real_one() -> None:
    real = json.loads((ASSETS / "config.json").read_text())
    assert checkpoint.synthetic_config({}, "mxfp4") == real
    bf16 = checkpoint.synthetic_config({}, "bf16")
    assert "quantization_config" not in bf16 and {**bf16, "quantization_config": real["quantization_config"]} == real
    big = checkpoint.synthetic_config({"num_hidden_layers": 36, "num_local_experts": 128}, "mxfp4")
    assert big["layer_types"][:2] == ["sliding_attention", "full_attention"] and len(big["layer_types"]) == 36
    with pytest.raises(checkpoint.CheckpointError, match="% 32"):
        checkpoint.synthetic_config({"hidden_size": 100}, "mxfp4")


def test_real_20b_and_120b_shapes() -> None:
    specs = {n: (s, d) for n, s, d, _ in checkpoint.tensor_specs(checkpoint.synthetic_config({}, "mxfp4"), "mxfp4")}
    x = "model.layers.0.mlp.experts."
    assert specs[x + "gate_up_proj_blocks"] == ((32, 5760, 90, 16), torch.uint8)
    assert specs[x + "gate_up_proj_scales"] == ((32, 5760, 90), torch.uint8)
    assert specs[x + "down_proj_blocks"] == ((32, 2880, 90, 16), torch.uint8)
    assert specs["model.layers.0.self_attn.q_proj.weight"] == ((4096, 2880), torch.bfloat16)
    assert specs["model.layers.0.self_attn.k_proj.weight"] == ((512, 2880), torch.bfloat16)
    assert specs["model.layers.23.self_attn.sinks"] == ((64,), torch.bfloat16)
    assert "model.layers.24.input_layernorm.weight" not in specs
    # gpt-oss-20b has 20.9B parameters (expert weights counted unpacked), 120b has 116.8B.
    for arch, billions in (({}, 20.9), ({"num_hidden_layers": 36, "num_local_experts": 128}, 116.8)):
        cfg = checkpoint.synthetic_config(arch, "bf16")
        n = sum(math.prod(s) for _, s, _, _ in checkpoint.tensor_specs(cfg, "bf16"))
        assert abs(n / 1e9 - billions) < 0.05, n


def test_mxfp4_codes() -> None:
    blocks = torch.tensor([[[0x21] + [0x00] * 15]], dtype=torch.uint8)  # low nibble 1 -> 0.5, high 2 -> 1.0
    vals = checkpoint.dequantize_mxfp4(blocks, torch.tensor([[128]], dtype=torch.uint8), torch.float32)
    assert vals.shape == (1, 32) and vals[0, :2].tolist() == [1.0, 2.0] and vals[0, 2:].abs().sum() == 0
    blocks = torch.tensor([[[0xF9] * 16]], dtype=torch.uint8)  # 9 -> -0.5, 15 -> -6
    vals = checkpoint.dequantize_mxfp4(blocks, torch.tensor([[125]], dtype=torch.uint8), torch.float32)
    assert vals[0, :2].tolist() == [-0.125, -1.5]


def test_mxfp4_round_trip() -> None:
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(110, 140, (3, 5, 4), dtype=torch.uint8, generator=gen)
    vals = checkpoint.dequantize_mxfp4(blocks, scales, torch.float32)
    b2, s2 = checkpoint.quantize_mxfp4(vals)
    assert torch.equal(checkpoint.dequantize_mxfp4(b2, s2, torch.float32), vals)
    w = torch.randn(7, 64, generator=gen) * 0.02
    err = (checkpoint.dequantize_mxfp4(*checkpoint.quantize_mxfp4(w), torch.float32) - w).norm() / w.norm()
    assert err < 0.15  # 4-bit: coarse but unbiased


@pytest.mark.parametrize("fmt", ["bf16", "mxfp4"])
def test_loader_matches_transformers(tmp_path: Path, fmt: str) -> None:
    """Our per-rank loader (full shard here) equals from_pretrained bit for bit, logits included."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    arch = {"num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "hidden_size": 64,
            "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "sliding_window": 8}
    ckpt = checkpoint.write_synthetic(tmp_path / "ck", checkpoint.synthetic_config(arch, fmt), fmt, seed=3,
                                      max_shard_bytes=10_000_000)
    assert len(list(ckpt.glob("model-*-of-*.safetensors"))) > 1  # sharded like the release
    hf = checkpoint.read_config(ckpt)
    assert checkpoint.is_mxfp4(hf) == (fmt == "mxfp4")
    ours = modeling.build(ckpt, hf, make_layout(1, 1, 1, world=(1, 0, 0)), Groups(), torch.device("cpu"),
                          torch.float32, "eager", "grouped_mm").model
    kw = {"quantization_config": Mxfp4Config(dequantize=True)} if fmt == "mxfp4" else {}
    ref = GptOssForCausalLM.from_pretrained(ckpt, dtype=torch.float32, **kw).float().eval()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(p, ref_params[name]), name
    ids = torch.randint(0, 200_000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


@pytest.mark.parametrize(("tp", "ep"), [(2, 1), (1, 2), (2, 2), (4, 2)])
def test_each_rank_holds_its_share(tiny_checkpoint: Path, tp: int, ep: int) -> None:
    """Per rank: attention bytes = full / tp, expert bytes = full / (tp * ep); the shards tile the full tensors."""
    hf = checkpoint.read_config(tiny_checkpoint)
    full = modeling.build(tiny_checkpoint, hf, make_layout(1, 1, 1, world=(1, 0, 0)), Groups(),
                          torch.device("cpu"), torch.bfloat16, "eager", "grouped_mm")
    full_bytes = modeling.param_bytes(full.model)
    full_params = dict(full.model.named_parameters())
    shards, reads = [], []
    for rank in range(tp * ep):
        lm = modeling.build(tiny_checkpoint, hf, make_layout(tp, ep, 1, world=(tp * ep, rank, rank)), Groups(),
                            torch.device("cpu"), torch.bfloat16, "eager", "grouped_mm")
        b = modeling.param_bytes(lm.model)
        # o_proj's and down_proj's biases stay whole (zeros off tp rank 0): allow their few bytes
        assert b["attention"] <= full_bytes["attention"] / tp + 4 * hf.hidden_size * hf.num_hidden_layers
        assert b["attention"] < full_bytes["attention"] or tp == 1
        assert b["experts"] <= full_bytes["experts"] / (tp * ep) + 4 * hf.hidden_size * hf.num_local_experts * 4
        assert b["other"] == full_bytes["other"]  # router and norms stay whole
        assert b["vocab"] == full_bytes["vocab"] / (tp * ep)  # embedding and lm_head rows split over tp*ep
        # and the memory behind each parameter is its own share, dense (no view into a larger read)
        assert all(p.untyped_storage().nbytes() == p.nbytes and p.is_contiguous() for p in lm.model.parameters())
        shards.append(dict(lm.model.named_parameters()))
        reads.append(lm.bytes_read)
    assert max(reads) < full.bytes_read  # each rank read only part of the checkpoint
    name = "model.layers.1.self_attn.q_proj.weight"
    # attention: the tp ranks of one replica tile q_proj by rows
    q = torch.cat([shards[r][name] for r in range(tp)], dim=0)
    assert torch.equal(q, full_params[name])
    # experts: ep groups tile the expert dim, tp ranks tile the hidden units of each expert
    down = "model.layers.1.mlp.experts.down_proj"
    rebuilt = torch.cat(
        [torch.cat([shards[e * tp + t][down] for t in range(tp)], dim=1) for e in range(ep)], dim=0
    )
    assert torch.equal(rebuilt, full_params[down])
    gu = "model.layers.0.mlp.experts.gate_up_proj"
    rebuilt = torch.cat([torch.cat([shards[e * tp + t][gu] for t in range(tp)], dim=2) for e in range(ep)], dim=0)
    # gate/up are interleaved per hidden unit, so the tp shards of a row are contiguous column ranges
    assert torch.equal(rebuilt, full_params[gu])
    # vocab parallel: the tp*ep ranks of the replica tile the embedding and lm_head rows, in rank order
    for vocab in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(torch.cat([shards[r][vocab] for r in range(tp * ep)], dim=0), full_params[vocab])
    # attention: k/v by KV heads, o_proj by its input columns, sinks by head; the biases that the tp sum
    # would add tp times are zeros off tp rank 0
    for proj in ("k_proj", "v_proj"):
        for leaf in ("weight", "bias"):
            n = f"model.layers.0.self_attn.{proj}.{leaf}"
            assert torch.equal(torch.cat([shards[r][n] for r in range(tp)], dim=0), full_params[n])
    o = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(torch.cat([shards[r][o] for r in range(tp)], dim=1), full_params[o])
    sinks = "model.layers.0.self_attn.sinks"
    assert torch.equal(torch.cat([shards[r][sinks] for r in range(tp)]), full_params[sinks])
    for bias in ("model.layers.0.self_attn.o_proj.bias", "model.layers.0.mlp.experts.down_proj_bias"):
        for r in range(tp * ep):
            assert torch.count_nonzero(shards[r][bias]) == 0 or r % tp == 0, (bias, r)


@pytest.mark.parametrize(("arch", "match"), [
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, r"num_attention_heads=6 .* num_key_value_heads=4"),
    ({"num_local_experts": 8, "num_experts_per_tok": 16}, r"num_experts_per_tok=16 .* num_local_experts=8"),
])
def test_synthetic_shape_that_cannot_run_is_refused(arch: dict, match: str) -> None:
    """A model.arch override the model cannot run is refused before anything is written (it crashed in the
    first forward, after the checkpoint was written to the cache)."""
    with pytest.raises(checkpoint.CheckpointError, match=match):
        checkpoint.synthetic_config(arch, "bf16")
