"""Checkpoints in the real Hugging Face layout of gpt-oss: finding them, reading only the slices a rank
needs, MXFP4 (de)quantization, and writing synthetic ones (random values, real shapes and format).

Layout (as released): config.json (+ MXFP4 `quantization_config`), generation_config.json, tokenizer
files, `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`. Attention, router,
embeddings, norms and lm_head are bf16; the experts are `*_blocks` uint8 [E, out, in/32, 16] (low
nibble = even element, E2M1) and `*_scales` uint8 [E, out, in/32] (E8M0, bias 127). A bf16 checkpoint
stores the experts in transformers' parameter layout instead: gate_up_proj [E, in, 2*inter] with
gate/up interleaved, down_proj [E, inter, hidden].
"""

from __future__ import annotations

from runtime.errors import UserError

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets" / "gpt-oss-20b"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# E2M1 code -> value; index = the 4-bit code.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32
EXPERT_MATRICES = ("gate_up_proj", "down_proj")


class CheckpointError(UserError):
    """A checkpoint cannot be found or read; the message names the fix."""


def cache_root() -> Path:
    """Where synthetic checkpoints (and the tokenizer vocabulary) are cached: $GPTOSS_RUNTIME_CACHE."""
    from runtime import harmony

    return harmony.cache_dir()


# ----------------------------------------------------------------------------------------- finding


def resolve_path(path: str | None) -> Path:
    """A local checkpoint directory for `model.path` (a directory, or a hub id when a hub is reachable)."""
    if not path:
        raise CheckpointError("model.path is not set: pass model.path=/dir/of/checkpoint or model.synthetic=true")
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise CheckpointError(f"model.path={path} has no config.json: point it at the checkpoint directory")
        return local
    if not HUB_ID.match(path) or path.startswith((".", "/", "~")):
        raise CheckpointError(f"model.path={path} does not exist: fix the path, or use model.synthetic=true")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
        return Path(snapshot_download(path, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated...
        raise CheckpointError(
            f"model.path={path} is not a local directory and the hub could not provide it ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). Download it where a hub is reachable and pass the directory, "
            f"or use model.synthetic=true for random weights in the same shape"
        ) from e


def read_config(ckpt: Path) -> Any:
    """The checkpoint's transformers config (weights untouched)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(ckpt)
    if cfg.model_type != "gpt_oss":
        raise CheckpointError(f"{ckpt} holds a {cfg.model_type!r} model; this runtime runs gpt_oss checkpoints")
    return cfg


def is_mxfp4(hf_config: Any) -> bool:
    q = getattr(hf_config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return str(method) == "mxfp4"


# ----------------------------------------------------------------------------------------- reading


class CheckpointReader:
    """Reads whole tensors or slices of them from the safetensors files, mapping each name to its shard."""

    def __init__(self, ckpt: Path) -> None:
        self.dir = ckpt
        index = ckpt / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(ckpt.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{ckpt} has no *.safetensors files: is the download complete?")
            weight_map = {}
            for f in files:
                with safe_open(f, "pt") as h:
                    weight_map.update(dict.fromkeys(h.keys(), f.name))
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, Any] = {}
        self.bytes_read = 0

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, name: str) -> Any:
        file = self.weight_map[name]
        if file not in self._handles:
            path = self.dir / file
            if not path.is_file():
                raise CheckpointError(f"{path} is listed in the index but missing: re-download the checkpoint")
            self._handles[file] = safe_open(path, "pt")
        return self._handles[file]

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """Read `name`, only the rows/columns selected by `index` (one slice per leading dim)."""
        sl = self._handle(name).get_slice(name)
        t = sl[index] if index else sl[:]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def close(self) -> None:
        self._handles.clear()


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., G, 16] uint8 blocks + [..., G] uint8 exponents -> [..., G*32] values."""
    work = torch.float32 if dtype == torch.float16 else dtype  # fp16 would flush small scales to zero
    lut = torch.tensor(FP4_VALUES, dtype=work, device=blocks.device)
    lo, hi = (blocks & 0x0F).int(), (blocks >> 4).int()
    vals = torch.stack((lut[lo], lut[hi]), dim=-1).flatten(-2)  # [..., G, 32], even element = low nibble
    vals = torch.ldexp(vals, (scales.to(torch.int32) - 127).unsqueeze(-1).to(work))
    return vals.flatten(-2).to(dtype)


def quantize_mxfp4(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] float (K % 32 == 0) -> blocks [..., K/32, 16] uint8, scales [..., K/32] uint8.

    Rounds to the nearest E2M1 value after scaling each group of 32 by a power of two chosen so the
    group's largest magnitude fits under 6. Exact inverse of dequantize_mxfp4 on its outputs.
    """
    *lead, k = values.shape
    g = values.float().reshape(*lead, k // MXFP4_GROUP, MXFP4_GROUP)
    amax = g.abs().amax(-1).clamp(min=2.0**-126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = g / torch.exp2(exp).unsqueeze(-1)
    grid = torch.tensor(FP4_VALUES[:8])
    codes = (scaled.abs().unsqueeze(-1) - grid).abs().argmin(-1)  # nearest magnitude
    codes = codes + 8 * (scaled < 0).long()
    codes = codes.to(torch.uint8).reshape(*lead, k // MXFP4_GROUP, 16, 2)
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    return blocks, (exp + 127).to(torch.uint8)


def read_param(
    reader: CheckpointReader, name: str, index: tuple[slice, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Read parameter `name` in transformers' layout, restricted to `index` (slices in that layout).

    MXFP4 experts are read as blocks/scales of the selected experts and output rows (and input groups
    where the slice is aligned to 32), then dequantized: no full bf16 copy of a layer ever exists.
    """
    if reader.has(name):
        return reader.read(name, index).to(dtype)
    stem = name.rsplit(".", 1)[-1]
    if stem in EXPERT_MATRICES and reader.has(name + "_blocks"):
        # param [E, in, out]  <->  blocks [E, out, in/32, 16]
        full = [slice(None)] * 3
        e, i, o = (tuple(index) + (slice(None),) * 3)[:3]
        rows_in = _aligned_groups(i)
        b_index = (e, o, rows_in if rows_in is not None else slice(None))
        blocks = reader.read(name + "_blocks", b_index)
        scales = reader.read(name + "_scales", b_index)
        w = dequantize_mxfp4(blocks, scales, dtype).transpose(1, 2)  # [E, in, out]
        if rows_in is None:
            full[1] = i
            w = w[tuple(full)]
        return w.contiguous()
    raise CheckpointError(
        f"{reader.dir} has no tensor {name!r} (nor MXFP4 {name}_blocks): is this a gpt-oss checkpoint of this size?"
    )


def _aligned_groups(s: slice) -> slice | None:
    """The MXFP4 group range covering `s` when its ends are multiples of 32, else None (read all)."""
    if s.start is None and s.stop is None:
        return slice(None)
    start, stop = s.start or 0, s.stop
    if stop is None or start % MXFP4_GROUP or stop % MXFP4_GROUP:
        return None
    return slice(start // MXFP4_GROUP, stop // MXFP4_GROUP)


# ----------------------------------------------------------------------------------------- writing


def max_positions(model: Any) -> int | None:
    """The model's max_position_embeddings from its config.json (no weight is read); `model` is the
    `model` config group."""
    from omegaconf import OmegaConf

    if model.synthetic:
        return synthetic_config(OmegaConf.to_container(model.arch), model.synthetic_format).get(  # type: ignore[arg-type]
            "max_position_embeddings")
    return getattr(read_config(resolve_path(model.path)), "max_position_embeddings", None)


def synthetic_config(arch: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The real gpt-oss-20b config.json with shape overrides applied (null = keep the real value)."""
    if fmt not in ("mxfp4", "bf16"):
        raise CheckpointError(f"synthetic format {fmt!r}: use mxfp4 or bf16")
    cfg = json.loads((ASSETS / "config.json").read_text())
    for key, value in arch.items():
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"model.arch.{key}={value!r} must be a whole number >= 1")
            cfg[key] = value
    if cfg["head_dim"] % 2:
        raise CheckpointError(f"model.arch.head_dim={cfg['head_dim']} must be even (rotary embeddings rotate pairs)")
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if heads % kv_heads:
        raise CheckpointError(f"num_attention_heads={heads} must be a multiple of num_key_value_heads={kv_heads} "
                              "(each KV head serves a group of query heads): change model.arch")
    if cfg["num_experts_per_tok"] > cfg["num_local_experts"]:
        raise CheckpointError(f"num_experts_per_tok={cfg['num_experts_per_tok']} exceeds num_local_experts="
                              f"{cfg['num_local_experts']}: change model.arch")
    cfg["experts_per_token"] = cfg["num_experts_per_tok"]
    cfg["layer_types"] = [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg["num_hidden_layers"])
    ]
    if fmt == "mxfp4":
        for key in ("hidden_size", "intermediate_size"):
            if cfg[key] % MXFP4_GROUP:
                raise CheckpointError(f"MXFP4 needs {key} % 32 == 0, got {cfg[key]}: change it or use bf16")
    else:
        cfg.pop("quantization_config", None)
    return cfg


def tensor_specs(cfg: dict[str, Any], fmt: str) -> Iterator[tuple[str, tuple[int, ...], torch.dtype, str]]:
    """(name, shape, dtype, kind) of every tensor of the checkpoint, in file order."""
    h, inter, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    bf = torch.bfloat16
    yield "model.embed_tokens.weight", (cfg["vocab_size"], h), bf, "weight"
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,), bf, "norm"
        for proj, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            yield p + f"self_attn.{proj}.weight", (out, h), bf, "weight"
            yield p + f"self_attn.{proj}.bias", (out,), bf, "bias"
        yield p + "self_attn.o_proj.weight", (h, q), bf, "weight"
        yield p + "self_attn.o_proj.bias", (h,), bf, "bias"
        yield p + "self_attn.sinks", (cfg["num_attention_heads"],), bf, "sinks"
        yield p + "post_attention_layernorm.weight", (h,), bf, "norm"
        yield p + "mlp.router.weight", (e, h), bf, "weight"
        yield p + "mlp.router.bias", (e,), bf, "bias"
        x = p + "mlp.experts."
        if fmt == "mxfp4":
            yield x + "gate_up_proj_blocks", (e, 2 * inter, h // 32, 16), torch.uint8, "blocks"
            yield x + "gate_up_proj_scales", (e, 2 * inter, h // 32), torch.uint8, "scales"
        else:
            yield x + "gate_up_proj", (e, h, 2 * inter), bf, "weight"
        yield x + "gate_up_proj_bias", (e, 2 * inter), bf, "bias"
        if fmt == "mxfp4":
            yield x + "down_proj_blocks", (e, h, inter // 32, 16), torch.uint8, "blocks"
            yield x + "down_proj_scales", (e, h, inter // 32), torch.uint8, "scales"
        else:
            yield x + "down_proj", (e, inter, h), bf, "weight"
        yield x + "down_proj_bias", (e, h), bf, "bias"
    yield "model.norm.weight", (h,), bf, "norm"
    yield "lm_head.weight", (cfg["vocab_size"], h), bf, "weight"


def _random(shape: tuple[int, ...], dtype: torch.dtype, kind: str, gen: torch.Generator) -> torch.Tensor:
    # Magnitudes like a trained model's, so activations neither vanish nor overflow in bf16.
    dev = gen.device
    if kind == "blocks":
        t = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen, device=dev)
    elif kind == "scales":  # 2^-7..2^-5 times E2M1 values up to 6: weights of order 0.02
        t = torch.randint(120, 123, shape, dtype=torch.uint8, generator=gen, device=dev)
    elif kind == "norm":
        t = (1.0 + 0.1 * torch.randn(shape, generator=gen, device=dev)).to(dtype)
    else:
        std = {"weight": 0.02, "bias": 0.02, "sinks": 1.0}[kind]
        t = (std * torch.randn(shape, generator=gen, device=dev)).to(dtype)
    return t.cpu()


def write_synthetic(
    out: Path, cfg: dict[str, Any], fmt: str, seed: int = 0, max_shard_bytes: int = 4_000_000_000
) -> Path:
    """Write a complete checkpoint directory with random weights; atomic (tmp dir + rename)."""
    from tqdm import tqdm

    from runtime import harmony

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"synth.out={out} exists and is not empty: choose a new directory")
    specs = list(tensor_specs(cfg, fmt))
    sizes = [math.prod(s) * torch.empty((), dtype=d).element_size() for _, s, d, _ in specs]
    shards: list[list[int]] = [[]]
    acc = 0
    for i, size in enumerate(sizes):
        if shards[-1] and acc + size > max_shard_bytes:
            shards.append([])
            acc = 0
        shards[-1].append(i)
        acc += size
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # A GPU draws the 20-120 B random values in seconds (the CPU takes minutes); values differ by device.
    gen = torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu").manual_seed(seed)
    weight_map: dict[str, str] = {}
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=f"synth {out.name}", disable=None)
    for n, members in enumerate(shards, start=1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for i in members:
            name, shape, dtype, kind = specs[i]
            tensors[name] = _random(shape, dtype, kind, gen)
            weight_map[name] = fname
            bar.update(sizes[i])
        save_file(tensors, tmp / fname, metadata={"format": "pt"})
        del tensors
    bar.close()
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copyfile(ASSETS / "generation_config.json", tmp / "generation_config.json")
    harmony.write_hf_tokenizer(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)
    return out


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_synthetic(name: str, arch: dict[str, Any], fmt: str, seed: int) -> Path:
    """The cached synthetic checkpoint for this shape/format/seed, written on first use.

    Safe when several ranks (or jobs) ask at once: one writes under a lock, the others wait and reuse.
    """
    if not name or name in (".", "..") or any(ch in name for ch in "/\\\0"):
        raise CheckpointError(f"model.name={name!r} names the synthetic checkpoint's cache directory: use a plain "
                              "name without path separators")
    cfg = synthetic_config(arch, fmt)
    key = hashlib.sha256(json.dumps([cfg, fmt, seed], sort_keys=True).encode()).hexdigest()[:12]
    out = cache_root() / "synthetic" / f"{name}-{fmt}-seed{seed}-{key}"
    if (out / "config.json").is_file():
        return out
    with _file_lock(out.parent / f".{out.name}.lock"):
        if not (out / "config.json").is_file():
            log.info("writing synthetic %s checkpoint (%s) to %s (once; cached)", name, fmt, out)
            write_synthetic(out, cfg, fmt, seed)
    return out
