"""The paged KV cache: a pool of fixed-size blocks on the device, and the host's bookkeeping of them.

Keys and values live in pools [blocks, kv_heads, BLOCK_SIZE, head_dim]. A sequence owns a list of blocks (its
block table): position p of the sequence is slot p % BLOCK_SIZE of its block p // BLOCK_SIZE. Blocks are taken
as a sequence grows and given back when it ends, so the cache holds the tokens the running sequences have, not
rows x max_len (`PagedKVCache`, on the device).

Sliding-window layers (gpt-oss: every other layer, 128 positions) have a block table of their own, the window
table: a sequence holds window blocks only for the positions its next queries can still see, and gives the older
ones back as it grows (SCRATCH in its window table), so a long sequence costs the full layers' keys plus a
window's. Both kinds of block come from the one pool: a full layer and a sliding layer share one device tensor
(block b holds the full layer's keys if a full table lists it, the sliding layer's if a window table does), so a
block costs max(full, sliding) layers, half of all layers for gpt-oss.

`BlockPool` (host only, no torch) hands blocks out and keeps the prefix cache: a full block is known by its
tokens and everything before them (a chain of BLAKE2b digests: the previous block's digest and this block's
tokens; a collision-resistant key, so one request can never be handed another's keys by a crafted prompt), so
two prompts that start alike share their first blocks, and a sequence that ended leaves its full blocks
findable until their room is needed (least recently freed first; a sequence's last block before its first,
so an evicted block never cuts a chain whose tail is still cached). Shared blocks are only ever read: a
sequence writes to blocks it alone holds (a prompt's cached part ends at a block boundary before its last
token, see `lookup`). Block 0 is scratch: free rows of a decode step and pad tokens write their junk there.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import torch

BLOCK_SIZE = 16
"""Tokens per KV-cache block (the prefix cache's granularity)."""

SCRATCH = 0
"""The block that junk writes go to; never given to a sequence."""

WINDOW_TAG = b"w"
"""Appended to a block's content key for its sliding layers' block (the same positions, the other layers)."""


def blocks_for(tokens: int) -> int:
    """Blocks that hold `tokens` positions."""
    return -(-tokens // BLOCK_SIZE)


class BlockPool:
    """Blocks 1..num_blocks: free, held by sequences (reference counted), or cached (free, but findable by
    their content until reused)."""

    def __init__(self, num_blocks: int, prefix_cache: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.prefix_cache = prefix_cache
        self.free: deque[int] = deque(range(1, num_blocks + 1))  # holding nothing findable
        self.refs = [0] * (num_blocks + 1)
        self.key_of: dict[int, bytes] = {}  # block -> its content key
        self.by_key: dict[bytes, int] = {}  # content key -> block
        self.cached: OrderedDict[int, None] = OrderedDict()  # unreferenced findable blocks, oldest first

    @property
    def available(self) -> int:
        """Blocks that can be handed out now (free, or cached and unreferenced)."""
        return len(self.free) + len(self.cached)

    @staticmethod
    def keys(tokens: Sequence[int], n: int, known: Sequence[bytes] = ()) -> list[bytes]:
        """The content keys of the first n full blocks of `tokens` (`known`: keys of its first blocks already
        computed, reused)."""
        keys = list(known[:n])
        parent = keys[-1] if keys else b""
        for j in range(len(keys), n):
            data = array("q", tokens[j * BLOCK_SIZE : (j + 1) * BLOCK_SIZE]).tobytes()
            parent = hashlib.blake2b(parent + data, digest_size=16).digest()
            keys.append(parent)
        return keys

    def lookup(self, tokens: Sequence[int]) -> list[int]:
        """The cached blocks holding the longest prefix of `tokens`, in whole blocks, leaving at least the last
        token to compute (its logits give the next token). Not taken: see `take`."""
        return self.match(self.keys(tokens, (len(tokens) - 1) // BLOCK_SIZE)) if self.prefix_cache else []

    def find(self, key: bytes) -> int | None:
        """The cached block of this content key, if any."""
        return self.by_key.get(key) if self.prefix_cache else None

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest run of these content keys from the first."""
        out = []
        if not self.prefix_cache:
            return out
        for key in keys:
            block = self.by_key.get(key)
            if block is None:
                break
            out.append(block)
        return out

    def take(self, blocks: Sequence[int]) -> None:
        """Hold these (cached) blocks for one more sequence."""
        for b in blocks:
            self.refs[b] += 1
            self.cached.pop(b, None)

    def allocate(self, n: int) -> list[int] | None:
        """n blocks for one sequence (fresh ones first, then the least recently freed cached ones, whose content
        is forgotten); None, taking nothing, when fewer are available."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.popleft()
            else:
                b, _ = self.cached.popitem(last=False)
                del self.by_key[self.key_of.pop(b)]
            self.refs[b] = 1
            out.append(b)
        return out

    def register(self, blocks: Sequence[int], tokens: Sequence[int], known: Sequence[bytes] = (),
                 tag: bytes = b"") -> None:
        """`tokens` (position order) have their keys in `blocks` (SCRATCH entries: none held): the full ones become
        findable by that content + `tag` (unless the same is findable already), for other sequences to share while
        this one runs and after it ends. `known`: content keys of the first blocks, computed already."""
        full = min(len(blocks), len(tokens) // BLOCK_SIZE) if self.prefix_cache else 0
        self.register_keyed(blocks, [k + tag for k in self.keys(tokens, full, known)] if full else [])

    def register_keyed(self, blocks: Sequence[int], keys: Sequence[bytes]) -> None:
        """blocks[j] becomes findable by keys[j] (those with a key; SCRATCH skipped)."""
        for b, key in zip(blocks, keys):
            if b != SCRATCH and b not in self.key_of and key not in self.by_key:
                self.key_of[b], self.by_key[key] = key, b

    def release(self, blocks: Sequence[int], tokens: Sequence[int]) -> None:
        """A sequence lets go of its blocks; `tokens` are the ones whose keys it wrote (see `register`)."""
        self.register(blocks, tokens)
        self.unref(blocks)

    def unref(self, blocks: Sequence[int]) -> None:
        """One holder fewer for each block (SCRATCH skipped); unheld ones become cached (findable) or free."""
        for b in reversed(blocks):  # the chain's tail is evicted before its head
            if b == SCRATCH:
                continue
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.key_of:
                    self.cached[b] = None
                else:
                    self.free.append(b)


def pool_tensors(sliding: Sequence[bool]) -> int:
    """Device tensors (each of K and V) a cache of these layers needs (True: a sliding-window layer): a full and a
    sliding layer share one (see the module's docstring)."""
    return max(sum(sliding), len(sliding) - sum(sliding))


class PagedKVCache:
    """K/V pools [num_blocks + 1, kv_heads, BLOCK_SIZE, head_dim] (block 0: scratch), one per layer or, with
    sliding layers, one per full/sliding pair, and the rows' block tables [rows, max_blocks] (full layers) and
    window tables (sliding layers) on the device; duck-types the part of transformers' Cache that
    GptOssAttention uses (`update`).

    Before each forward the batcher sets where this forward's tokens go (`write_block` in the full layers,
    `write_wblock` in the sliding ones, `write_offset`, one per token, flattened) and what `update` returns:
    `dense_rows` None: the pools themselves (the paged kernel reads them through the tables); `dense_rows` set
    (attention implementations that want [n, H, S, D] keys): those rows' blocks gathered into consecutive slots,
    `dense_blocks` of them; `fresh`: the forward's own keys (a prompt with nothing cached attends to itself only).
    """

    def __init__(self, layers: int, num_blocks: int, rows: int, max_blocks: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, sliding: Sequence[bool] | None = None) -> None:
        shape = (num_blocks + 1, kv_heads, BLOCK_SIZE, head_dim)
        flags = list(sliding) if sliding is not None else [False] * layers
        if len(flags) != layers:
            raise ValueError(f"{len(flags)} layer kinds for {layers} layers")
        self.sliding = frozenset(i for i, f in enumerate(flags) if f)
        """Layers that read and write through the window table."""
        ks = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(pool_tensors(flags))]
        vs = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(len(ks))]
        # layer i: the tensor of its rank among the layers of its kind (a full and a sliding layer share each)
        rank = [sum(1 for j in range(i) if flags[j] == flags[i]) for i in range(layers)]
        self.k, self.v = [ks[r] for r in rank], [vs[r] for r in rank]
        self._tensors = ks + vs
        self.table = torch.zeros((rows, max_blocks), dtype=torch.int32, device=device)
        self.wtable = torch.zeros((rows, max_blocks), dtype=torch.int32, device=device)
        self.write_block = torch.zeros(rows, dtype=torch.long, device=device)  # the decode step's, per row
        self.write_wblock = torch.zeros(rows, dtype=torch.long, device=device)
        self.write_offset = torch.zeros(rows, dtype=torch.long, device=device)
        self.prefill_write: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        """[n * W] blocks (full layers), blocks (sliding layers), offsets."""
        self.fresh = False
        self.dense_rows: torch.Tensor | slice | None = None
        self.dense_blocks = 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_: Any, **__: Any):
        n, h, w, d = key.shape
        window = layer_idx in self.sliding
        if self.prefill_write is not None:
            blk, wblk, off = self.prefill_write
        else:
            blk, wblk, off = self.write_block[:n], self.write_wblock[:n], self.write_offset[:n]
        if window:
            blk = wblk
        kp, vp = self.k[layer_idx], self.v[layer_idx]
        kp[blk, :, off] = key.permute(0, 2, 1, 3).reshape(n * w, h, d)
        vp[blk, :, off] = value.permute(0, 2, 1, 3).reshape(n * w, h, d)
        if self.fresh:
            return key, value
        if self.dense_rows is None:
            return kp, vp
        table = (self.wtable if window else self.table)[self.dense_rows, : self.dense_blocks]
        return gather(kp, table), gather(vp, table)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors)


def gather(pool: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """A pool's blocks [N, H, BS, D] listed in `table` [n, m], as consecutive slots [n, H, m * BS, D]."""
    n, m = table.shape
    _, h, bs, d = pool.shape
    return pool[table.long()].permute(0, 2, 1, 3, 4).reshape(n, h, m * bs, d)


def block_bytes(tensors: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Device bytes of one block in `tensors` key and value pools (`pool_tensors`)."""
    return 2 * tensors * kv_heads * BLOCK_SIZE * head_dim * torch.empty((), dtype=dtype).element_size()


def window_reserve(rows: int, window: int | None, max_prefill_tokens: int, max_blocks: int) -> int:
    """Blocks beyond the full layers' for the sliding-window layers: each row's window and one prefill chunk's
    (0 without sliding layers)."""
    if not window:
        return 0
    return rows * min(max_blocks, window_blocks(window, 1)) + min(max_blocks, window_blocks(window, max_prefill_tokens))


def sliding_layers(cfg: Any) -> tuple[list[bool], int | None]:
    """A model config's sliding-window layers (True per layer) and the positions they see; all False and None when
    it has none (then there are no window tables)."""
    kinds = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    sliding = [k == "sliding_attention" for k in kinds]
    window = getattr(cfg, "sliding_window", None) if any(sliding) else None
    return (sliding if window else [False] * len(sliding)), window


def sequence_blocks(max_blocks: int, window: int | None, max_prefill_tokens: int) -> int:
    """Blocks one sequence of `max_blocks` may hold at once: its own and, with sliding layers, its window blocks
    while a chunk of up to `max_prefill_tokens` is prefilled (the least a cache must have)."""
    return max_blocks + min(max_blocks, window_blocks(window, max_prefill_tokens))


def window_blocks(window: int | None, chunk: int) -> int:
    """Window-table blocks one sequence holds at most: the 16-token blocks that the window of `window` positions
    before a prefill chunk of `chunk` tokens touches, the chunk's own and the next token's; 0 without sliding
    layers."""
    return blocks_for(window + chunk) + 2 if window else 0


def blocks_that_fit(total: int, used: int, utilization: float, reserve: int, per_block: int) -> int:
    """Blocks of `per_block` bytes in `utilization` x `total` bytes of device memory, less what is `used` (the
    weights, other processes) and a `reserve` for activations."""
    return max(0, int((utilization * total - used - reserve) // per_block))
