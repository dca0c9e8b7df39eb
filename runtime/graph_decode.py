"""Static KV cache and the decode loop replayed as one CUDA graph per step.

transformers' model forward is used as it is; what changes is what it is given:
- a KV cache of fixed buffers [B, kv_heads, S, D] per layer, written at slot indices held in a tensor
  (`StaticKVCache`), so every step has the same shapes and addresses;
- ready-made additive masks for the full and the sliding layers, computed on the GPU from a table of
  the position held in each cache slot (left padding, the causal rule and the 128-token window all
  follow from it), so transformers builds no mask and the Python side holds no per-step values; with
  attention=triton that table itself (a SlotMask) goes to the kernel, which builds no mask at all;
- position ids in a tensor that the loop advances on the GPU.
On CUDA the mask computation and the forward of a decode step are captured once as a CUDA graph and
replayed; so is a small prefill (<= PREFILL_GRAPH_TOKENS) the second time its shape comes (a batch of
one is bound by launches, not by the GPU, which the graph removes); sampling and the stop bookkeeping
run after it without any host sync (the host looks at the stop flags only every `SYNC_EVERY` steps).
On the CPU the same code runs eagerly.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from runtime.kernels.flash import NAME as FLASH, SlotMask

log = logging.getLogger(__name__)

SYNC_EVERY = 16  # steps between host checks of "have all rows stopped?"
PREFILL_GRAPH_TOKENS = 8192  # prefills up to this many tokens (batch x width) are graphed once their shape repeats
PREFILL_GRAPHS = 2  # prefill graphs kept per cache shape (most recent widths)


class StaticKVCache:
    """Fixed K/V buffers per layer; `update` writes the new keys at `self.slots` and returns the buffers.

    Duck-types the part of transformers' Cache that GptOssAttention uses (`update`).
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots = torch.zeros(1, dtype=torch.long, device=device)  # [T] slots written by this forward

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_: Any, **__: Any):
        self.k[layer_idx].index_copy_(2, self.slots, key)
        self.v[layer_idx].index_copy_(2, self.slots, value)
        return self.k[layer_idx], self.v[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def masks(slot_pos: torch.Tensor, query_pos: torch.Tensor, window: int | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Additive masks [B, 1, T, S]: a query at position p sees the slots holding positions <= p
    (and > p - window on sliding layers); empty slots (position -1) and pad queries see nothing."""
    held = slot_pos[:, None, None, :]  # [B, 1, 1, S]
    q = query_pos[:, None, :, None]  # [B, 1, T, 1]
    full = (held >= 0) & (held <= q) & (q >= 0)
    neg = torch.finfo(dtype).min
    zero = torch.zeros((), dtype=dtype, device=slot_pos.device)
    out = {"full_attention": torch.where(full, zero, neg)}
    sliding = full & (held > q - window) if window else full
    out["sliding_attention"] = torch.where(sliding, zero, neg)
    return out


def mark_stops(token: torch.Tensor, done: torch.Tensor, lengths: torch.Tensor, step: int, stop: torch.Tensor,
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows already stopped emit pad; a row emitting a stop token ends with length step + 1 (on the GPU)."""
    token = torch.where(done, torch.full_like(token, pad_id), token)
    hit = torch.isin(token, stop) & ~done
    lengths = torch.where(hit, torch.full_like(lengths, step + 1), lengths)
    return token, done | hit, lengths


def compiled(forward: Callable[..., Any], device: torch.device, combo_kernels: bool) -> Callable[..., Any]:
    """The decode step torch.compile'd for fixed shapes (one compile per step size); on a GPU with `combo_kernels`
    (generation.combo_kernels), inductor also merges the step's independent kernels into one launch."""
    options = {"combo_kernels": True} if combo_kernels and device.type == "cuda" else None
    return torch.compile(forward, dynamic=False, options=options)


def capture(forward: Callable[[], torch.Tensor], restore: Sequence[torch.Tensor] = (), warm_up: bool = True,
            what: str = "decode step", pool: Any = None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
    """`forward()` captured as a CUDA graph, and the output tensor that its replays refill.

    warm_up: run it once first on a side stream, outside the capture (allocator, autotuning,
    compiling), then put the `restore` tensors back as they were. Without it the GPU is synchronized
    first (the caller ran the same work eagerly before). None, after a warning, when an op in it
    cannot be captured (one that syncs with the host, e.g. grouped_mm's fp32 fallback): the caller
    then runs it eagerly. `pool`: a memory pool shared with other graphs that never run at the same time.
    """
    if warm_up:
        saved = [t.clone() for t in restore]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream().wait_stream(side)
        for t, old in zip(restore, saved):
            t.copy_(old)
    else:
        torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool):
            out = forward()
    except RuntimeError as e:
        log.warning("%s cannot be captured as a CUDA graph (%s); running it eagerly", what,
                    str(e).splitlines()[0][:160])
        torch.cuda.synchronize()
        return None
    return graph, out


@dataclass
class DecodeState:
    """What a decode call leaves behind: tokens [B, N], lengths [B], stopped [B] (on the device)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor


class GraphDecoder:
    """Prefill + decode over a StaticKVCache; the decode step is a CUDA graph on GPUs."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device, use_graph: bool,
                 compile: bool = False, max_prefill_tokens: int | None = None, combo_kernels: bool = False) -> None:
        self.model = model
        self.max_prefill_tokens = max_prefill_tokens  # a bigger prefill goes in column chunks (see run)
        self.cfg = model.config
        self.dtype, self.device = dtype, device
        # transformers' eager experts loop syncs with the host every layer: nothing to capture
        self.use_graph = use_graph and device.type == "cuda" and self.cfg._experts_implementation != "eager"
        attn = model.model.layers[0].self_attn
        self.kv_heads = attn.k_proj.out_features // attn.head_dim  # this rank's KV heads
        self.window = getattr(self.cfg, "sliding_window", None)
        self.slot_masks = self.cfg._attn_implementation == FLASH
        self._graph: dict[str, Any] | None = None  # the captured step and its static buffers
        self.graph_prefill = True  # off once a prefill could not be captured
        self._decode_forward = compiled(self._forward, device, combo_kernels) if compile else self._forward

    def _buffers(self, batch: int, max_len: int) -> dict[str, Any]:
        """Static buffers for `batch` rows of at least `max_len` slots: the current ones when they have that
        many rows and enough slots (a new shape costs a compile and a capture, more than attention over the
        spare slots costs: rounds of varied lengths, as static batching runs them, reuse the longest's), else
        new ones."""
        if self._graph is not None:
            rows, slots = self._graph["key"]
            if rows == batch and max_len <= slots:
                return self._graph
        self._graph = None  # free the old cache and graph pool before allocating the new ones
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
        cfg = self.cfg
        cache = StaticKVCache(cfg.num_hidden_layers, batch, self.kv_heads, max_len, cfg.head_dim, self.dtype, self.device)
        dev = self.device
        self._graph = {
            "key": (batch, max_len), "cache": cache, "graph": None,
            "ids": torch.zeros(batch, 1, dtype=torch.long, device=dev),
            "pos": torch.zeros(batch, 1, dtype=torch.long, device=dev),
            "slot_pos": torch.full((batch, max_len), -1, dtype=torch.long, device=dev),
            "slot": torch.zeros(1, dtype=torch.long, device=dev),  # the decode step's slot (the graph reads it)
            "logits": None,
            "prefill": {},  # width -> captured prefill graph and its static inputs
            "prefill_seen": set(),  # widths prefilled once (eagerly)
        }
        return self._graph

    def release_graphs(self) -> None:
        """Drop the captured graphs and the cache (the next call captures anew)."""
        self._graph = None

    def _forward(self, buf: dict[str, Any], ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits of the last token of each row: [B, V]."""
        if self.slot_masks:  # the kernel reads the cache bookkeeping itself (runtime/kernels/flash.py)
            q_slot = buf["cache"].slots[None, :].expand(ids.shape[0], -1).contiguous()
            m = SlotMask(buf["slot_pos"], q_slot).by_layer()
        else:
            m = masks(buf["slot_pos"], pos, self.window, self.dtype)
        out = self.model(input_ids=ids, position_ids=pos.clamp(min=0), attention_mask=m,
                         past_key_values=buf["cache"], use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _step(self, buf: dict[str, Any]) -> torch.Tensor:
        """One decode step from the static buffers (replayed from a CUDA graph when available)."""
        if not self.use_graph:
            return self._decode_forward(buf, buf["ids"], buf["pos"])
        if buf["graph"] is None:
            captured = capture(lambda: self._decode_forward(buf, buf["ids"], buf["pos"]),
                               [buf[k] for k in ("ids", "pos", "slot_pos", "slot")])
            if captured is None:
                self.use_graph = False
                return self._forward(buf, buf["ids"], buf["pos"])
            buf["graph"], buf["logits"] = captured
        buf["graph"].replay()
        return buf["logits"]

    def _prefill(self, buf: dict[str, Any], ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The prompt's forward; replayed from a CUDA graph when small and seen before (see the module doc)."""
        cache, width = buf["cache"], ids.shape[1]
        if not (self.use_graph and self.graph_prefill) or ids.numel() > PREFILL_GRAPH_TOKENS:
            return self._forward(buf, ids, positions)
        g = buf["prefill"].get(width)
        if g is None:
            if width not in buf["prefill_seen"]:  # first time: eagerly (this also warms up / autotunes)
                buf["prefill_seen"].add(width)
                return self._forward(buf, ids, positions)
            if len(buf["prefill"]) >= PREFILL_GRAPHS:
                buf["prefill"].pop(next(iter(buf["prefill"])))
            g = {"ids": ids.clone(), "pos": positions.clone(), "slots": cache.slots}
            captured = capture(lambda: self._forward(buf, g["ids"], g["pos"]), warm_up=False, what="prefill")
            if captured is None:
                self.graph_prefill = False
                return self._forward(buf, ids, positions)
            g["graph"], g["logits"] = captured
            buf["prefill"][width] = g
        g["ids"].copy_(ids)
        g["pos"].copy_(positions)
        cache.slots = g["slots"]
        g["graph"].replay()
        return g["logits"]

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, sample: Callable[[torch.Tensor], torch.Tensor],
            stop: torch.Tensor, pad_id: int, ignore_eos: bool, clock: Any) -> DecodeState:
        """ids/mask: the left-padded prompts [B, T]. Marks `clock` after each token exists."""
        batch, width = ids.shape
        max_len = width + max_new_tokens
        buf = self._buffers(batch, _round_up(max_len, 256))  # fewer distinct shapes: graphs/compiles are reused
        cache = buf["cache"]
        positions = torch.where(mask.bool(), mask.cumsum(-1) - 1, torch.full_like(mask, -1))  # [B, T]; pads -1
        buf["slot_pos"].fill_(-1)
        buf["slot_pos"][:, :width] = positions
        chunk = max(1, self.max_prefill_tokens // batch) if self.max_prefill_tokens else width
        if chunk >= width:
            cache.slots = torch.arange(width, device=self.device)
            logits = self._prefill(buf, ids, positions)
        else:  # column chunks, eagerly: a query sees slots holding positions <= its own, all in this chunk or
            for start in range(0, width, chunk):  # before it (the slot table holds the whole prompt already)
                end = min(width, start + chunk)
                cache.slots = torch.arange(start, end, device=self.device)
                logits = self._forward(buf, ids[:, start:end], positions[:, start:end])
        buf["slot"].fill_(width)
        cache.slots = buf["slot"]  # decode steps write at buf["slot"], which the loop advances in place
        buf["pos"].copy_(positions[:, -1:])
        tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=self.device)
        lengths = torch.full((batch,), max_new_tokens, dtype=torch.long, device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            token = sample(logits)
            if not ignore_eos:
                token, done, lengths = mark_stops(token, done, lengths, step, stop, pad_id)
            tokens[:, step] = token
            clock.mark()
            if step + 1 == max_new_tokens:
                break
            if not ignore_eos and (step + 1) % SYNC_EVERY == 0 and bool(done.all()):
                break
            # the new token goes into the next free slot, at the next position
            buf["ids"].copy_(token[:, None])
            buf["pos"].add_(1)
            buf["slot_pos"].index_copy_(1, cache.slots, buf["pos"])
            logits = self._step(buf)
            cache.slots.add_(1)
        return DecodeState(tokens, lengths, done)


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
