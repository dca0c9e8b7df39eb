"""Build transformers' GptOssForCausalLM for this rank: meta-device skeleton, sharded by
runtime.parallelize, then filled from the checkpoint with only the slices this rank holds."""

from __future__ import annotations

from runtime.errors import UserError

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runtime import checkpoint, fused, kernels, parallelize
from runtime.kernels import arrivals, moe, moe_mxfp4
from runtime.distributed import Groups, WorldLayout

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ATTENTION = ("eager", "flex_attention", "gqa_sinks", "triton_sinks")
EXPERTS = ("grouped_mm", "batched_mm", "eager", "triton", "mxfp4")


class KernelError(UserError):
    """An attention or experts kernel cannot be used here; the message names the fix."""


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"model.dtype={dtype!r}: use one of {sorted(DTYPES)} or auto")
    return DTYPES[dtype]


def check_kernels(attention: str, hub_download: bool, experts: str,
                  dequantized_above_tokens: int | None = None) -> None:
    """Fail before loading weights when a requested kernel cannot be had."""
    if experts not in EXPERTS:
        raise KernelError(f"experts.implementation={experts!r}: use one of {list(EXPERTS)}")
    if dequantized_above_tokens is not None:
        if experts != "mxfp4":
            raise KernelError(
                f"experts.dequantized_above_tokens={dequantized_above_tokens} picks between the 4-bit experts and a "
                f"dequantized copy, so it needs experts=mxfp4 (not experts={experts}): set experts=mxfp4, or "
                f"experts.dequantized_above_tokens=null")
        if isinstance(dequantized_above_tokens, bool) or not isinstance(dequantized_above_tokens, int) \
                or dequantized_above_tokens < 0:
            raise KernelError(f"experts.dequantized_above_tokens={dequantized_above_tokens!r}: a number of tokens "
                              f"per step >= 0, or null (off)")
    if attention in ATTENTION:
        return
    if "/" not in attention:
        raise KernelError(f"attention.implementation={attention!r}: use one of {list(ATTENTION)} or a hub id org/name")
    repo = attention.split(":")[0]
    local = dict(item.split("=", 1) for item in os.environ.get("LOCAL_KERNELS", "").split(",") if "=" in item)
    cache = Path(os.environ.get("HF_HUB_CACHE", Path.home() / ".cache" / "huggingface" / "hub"))
    cached = (cache / f"models--{repo.replace('/', '--')}").is_dir()
    if repo in local or cached or hub_download:
        try:
            import kernels  # noqa: F401
        except ImportError as e:
            raise KernelError(f"attention.implementation={attention} needs the `kernels` package: pip install kernels") from e
        return
    raise KernelError(
        f"attention.implementation={attention} is a hub kernel with no local copy: set "
        f"LOCAL_KERNELS='{repo}=/path/to/kernel', pre-fill HF_HUB_CACHE (with HF_HUB_OFFLINE=1), allow a download "
        f"with attention.hub_download=true, or use attention=eager"
    )


@dataclass
class LoadedModel:
    model: nn.Module
    hf_config: Any
    checkpoint: Path
    load_seconds: float
    bytes_read: int


def build(
    ckpt: Path,
    hf_config: Any,
    layout: WorldLayout,
    groups: Groups,
    device: torch.device,
    dtype: torch.dtype,
    attention: str,
    experts: str,
    dequantized_above_tokens: int | None = None,
) -> LoadedModel:
    """The sharded model on `device`, weights loaded, ready for inference. dequantized_above_tokens: see
    ExpertsConfig (experts=mxfp4 also keeps a dequantized copy of its experts for steps of more tokens)."""
    from accelerate import init_empty_weights
    from transformers import GptOssForCausalLM

    t0 = time.perf_counter()
    kernels.register()
    if experts in ("triton", "mxfp4") and not moe.triton_usable(device):
        log.info("experts=%s: no GPU here, using its torch reference (same function, slower)", experts)
    mxfp4 = checkpoint.is_mxfp4(hf_config)
    if experts == "mxfp4":  # before any weight is read
        if not mxfp4:
            raise KernelError(
                f"experts=mxfp4 runs MXFP4 experts, but {ckpt} stores its experts in bf16 (no MXFP4 "
                f"quantization_config): use experts=triton or experts=grouped_mm, or an MXFP4 checkpoint "
                f"(model.synthetic_format=mxfp4 for synthetic ones)"
            )
        parallelize.check_mxfp4_split(hf_config, layout.tp_size)
        moe_mxfp4.check_device(device)
    hf_config = hf_config.__class__.from_dict({k: v for k, v in hf_config.to_dict().items() if k != "quantization_config"})
    hf_config._attn_implementation = "eager"
    hf_config._experts_implementation = experts
    with init_empty_weights(include_buffers=False):  # parameters on meta, rope buffers real
        model = GptOssForCausalLM(hf_config)
    if experts == "mxfp4":  # keep the checkpoint's uint8 blocks/scales: no bf16 expert weight ever exists
        for layer in model.model.layers:
            moe_mxfp4.use_mxfp4_params(layer.mlp.experts)
        log.info("MXFP4 experts kept in 4 bits (experts=mxfp4)")
    elif mxfp4:
        log.info("MXFP4 experts dequantized to %s at load (experts=mxfp4 keeps them in 4 bits)", dtype)
    plan = parallelize.shard(model, layout, groups)
    reader = checkpoint.CheckpointReader(ckpt)
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in list(model.named_parameters()):
        spec = plan[name]
        module_name, leaf = name.rsplit(".", 1)
        want = torch.float32 if any(f".{m}." in f".{name}" for m in keep_fp32) else dtype
        if param.dtype == torch.uint8:  # MXFP4 blocks/scales, read as stored
            want = torch.uint8
        if spec.zero:
            value = torch.zeros(param.shape, dtype=want)
        else:
            value = checkpoint.read_param(reader, name, spec.index, want)
        if tuple(value.shape) != tuple(param.shape):
            raise checkpoint.CheckpointError(
                f"{ckpt}: {name} has shape {tuple(value.shape)} for this rank, expected {tuple(param.shape)}: "
                f"the checkpoint does not match its config.json"
            )
        value = value.to(device)
        if value.untyped_storage().nbytes() > value.nbytes:
            # safetensors returns a rank's slice as a view of the whole tensor (on the CPU .to() keeps it):
            # hold only this rank's part, dense (the kernels assume dense weights)
            value = value.clone(memory_format=torch.contiguous_format)
        model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    reader.close()
    model.to(device)  # rope buffers
    if experts == "mxfp4" and dequantized_above_tokens is not None:
        moe_mxfp4.keep_dequantized_copies([layer.mlp.experts for layer in model.model.layers], dtype,
                                         dequantized_above_tokens)
        log.info("MXFP4 experts also dequantized to %s for steps of more than %d tokens "
                 "(experts.dequantized_above_tokens)", dtype, dequantized_above_tokens)
    model.eval()
    model.requires_grad_(False)
    if attention != "eager":
        model.set_attn_implementation(attention)
    fused.apply(model, attention, experts)
    arrivals.prepare(device)  # the decode kernels' counters, before any step is compiled or captured
    log.info(
        "loaded %s: %.1f GB read on this rank in %.1f s",
        ckpt.name, reader.bytes_read / 1e9, time.perf_counter() - t0,
    )
    return LoadedModel(model, hf_config, ckpt, time.perf_counter() - t0, reader.bytes_read)


def check_transformers_plan(layout: WorldLayout, attention: str, experts: str) -> None:
    """parallel.plan=transformers: what the recipe's sharding can run (before any weight is read)."""
    if layout.dp_size != 1:
        raise KernelError(f"parallel.plan=transformers shards one model over all ranks: set parallel.dp_size=1 "
                          f"(not {layout.dp_size}), or use parallel.plan=ours for data-parallel replicas")
    if layout.tp_size > 1 and layout.ep_size > 1:
        raise KernelError(
            f"parallel.plan=transformers has one mesh over all {layout.world_size} ranks: tensor parallel "
            f"(parallel.tp_size={layout.world_size}) or, with expert parallel on it, parallel.ep_size="
            f"{layout.world_size}; a tp x ep mix needs parallel.plan=ours")
    if attention not in ("eager",) or experts != "grouped_mm":
        raise KernelError(
            f"parallel.plan=transformers runs the recipe's kernels (attention=eager experts=grouped_mm; "
            f"transformers' expert parallel needs grouped_mm), not attention={attention} experts={experts}: "
            f"drop those overrides, or use parallel.plan=ours for our kernels")


def recipe_kwargs(hf_config: Any, layout: WorldLayout, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """`from_pretrained` arguments of the published transformers recipe for gpt-oss on this layout:
    one device, or under torchrun `tp_plan="auto"` with `DistributedConfig(enable_expert_parallel=True)`
    when the experts are split (transformers 5.17's API). MXFP4 experts are dequantized to `dtype`
    (`Mxfp4Config(dequantize=True)`; its kernel path needs a hub download)."""
    kw: dict[str, Any] = {"dtype": dtype}
    if layout.world_size > 1:
        from transformers.distributed import DistributedConfig

        # the guide's `tp_plan="auto"` + `DistributedConfig(enable_expert_parallel=1)`, written the one way
        # 5.17 accepts both together
        kw["distributed_config"] = DistributedConfig(tp_plan="auto", enable_expert_parallel=layout.ep_size > 1)
    else:
        kw["device_map"] = str(device)
    if checkpoint.is_mxfp4(hf_config):
        from transformers import Mxfp4Config

        kw["quantization_config"] = Mxfp4Config(dequantize=True)
    return kw


def build_transformers(ckpt: Path, hf_config: Any, layout: WorldLayout, device: torch.device,
                       dtype: torch.dtype) -> LoadedModel:
    """parallel.plan=transformers: the model as the transformers recipe loads and shards it."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager",
                                                 experts_implementation="grouped_mm",
                                                 **recipe_kwargs(hf_config, layout, device, dtype))
    model.eval()
    model.requires_grad_(False)
    log.info("loaded %s with transformers' plan (tp_plan=auto%s) in %.1f s", ckpt.name,
             ", expert parallel" if layout.ep_size > 1 else "", time.perf_counter() - t0)
    return LoadedModel(model, model.config, ckpt, time.perf_counter() - t0, 0)


def param_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of this rank's attention, expert and other parameters (for sharding checks and records);
    MXFP4 experts count as held: their uint8 blocks and scales, and the biases. `vocab`: the embedding
    and lm_head; `other`: router and norms."""
    out = {"attention": 0, "experts": 0, "vocab": 0, "other": 0}
    for name, p in model.named_parameters():
        local = getattr(p, "to_local", None)  # transformers' plan may hold DTensors: count this rank's part
        p = local() if local is not None else p
        if ".self_attn." in name:
            kind = "attention"
        elif ".experts." in name:
            kind = "experts"
        elif name.startswith(("model.embed_tokens.", "lm_head.")):
            kind = "vocab"
        else:
            kind = "other"
        out[kind] += p.numel() * p.element_size()
    return out
