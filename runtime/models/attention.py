"""Attention over a paged KV cache, shared by every architecture."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

T = TypeVar("T")


@dataclass
class AttentionBatch:
    """Per-step attention metadata, padded to (batch, max new tokens).

    `slot_mapping` gives each new token's cache slot (block * block_size + offset, -1 for
    padding); `block_tables` each sequence's blocks; `kv_len` the longest context this step.
    `fresh` means no sequence has cached tokens yet, so attention can skip the cache read.
    The methods build their per-step values (masks, slot indices) once and share them across
    layers.
    """

    positions: torch.Tensor  # (batch, seq) long
    slot_mapping: torch.Tensor  # (batch, seq) long
    block_tables: torch.Tensor  # (batch, max_blocks) long
    last_index: torch.Tensor  # (batch,) index of each row's last real token
    kv_len: int
    fresh: bool
    sliding_window: int | None = None
    _memo: dict[tuple[object, ...], Any] = field(default_factory=dict, repr=False)

    def _once(self, key: tuple[object, ...], build: Callable[[], T]) -> T:
        """Per-step values are built on first use and shared by every layer."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def mask(self, key_len: int) -> torch.Tensor:
        """(batch, 1, seq, key_len) boolean: causal (and windowed) over absolute positions,
        True where a query may attend."""
        def build() -> torch.Tensor:
            keys = torch.arange(key_len, device=self.positions.device)
            q = self.positions.unsqueeze(-1)  # (batch, seq, 1)
            allowed = keys <= q
            if self.sliding_window is not None:
                allowed &= keys > q - self.sliding_window
            return allowed.unsqueeze(1)

        return self._once(("mask", key_len, self.sliding_window), build)

    def decode_bias(self, key_len: int, kv_heads: int) -> torch.Tensor:
        """(batch * kv_heads, 1, key_len) fp32: 0 where a decode query may attend, -inf where
        not; added to the scores by `decode_attention`."""
        def build() -> torch.Tensor:
            allowed = self.mask(key_len)  # (batch, 1, 1, key_len)
            bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
            bias.masked_fill_(~allowed, float("-inf"))
            return bias.expand(-1, kv_heads, 1, key_len).reshape(-1, 1, key_len)

        return self._once(("bias", key_len, kv_heads, self.sliding_window), build)

    def store_index(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cache slots of the real new tokens, their rows in the flattened (batch * seq)
        tokens, or None when every token is real)."""
        def build() -> tuple[torch.Tensor, torch.Tensor | None]:
            flat = self.slot_mapping.flatten()
            valid = flat >= 0
            if bool(valid.all()):
                return flat, None
            rows = valid.nonzero().squeeze(1)
            return flat[rows], rows

        return self._once(("store",), build)

    def tokenwise(self, fn: Callable[[torch.Tensor], torch.Tensor],
                  x: torch.Tensor) -> torch.Tensor:
        """fn (a per-token map, like an MLP) applied to the real tokens of x (batch, seq, dim)
        only; padding rows come back as zeros. A prefill batch padded to its longest prompt
        would otherwise spend its largest matmuls on padding."""
        _, rows = self.store_index()
        if rows is None:
            return fn(x)
        b, s, dim = x.shape
        y = fn(x.reshape(b * s, dim)[rows])  # (real tokens, out)
        return y.new_zeros(b * s, y.shape[-1]).index_copy_(0, rows, y).view(b, s, -1)

    def context_slots(self, block_size: int) -> torch.Tensor:
        """(batch, kv_len) cache slot of every context position (padding rows read block 0,
        which the mask hides)."""
        def build() -> torch.Tensor:
            pos = torch.arange(self.kv_len, device=self.block_tables.device)
            blocks = self.block_tables[:, pos // block_size]  # (batch, kv_len)
            return blocks * block_size + pos % block_size

        return self._once(("context", block_size), build)


KVCache = tuple[torch.Tensor, torch.Tensor]  # each (num_blocks, block_size, kv_heads, head_dim)


def kv_group_size(kv_index: list[int]) -> int | None:
    """g when query head h uses kv head h // g for every h (the usual GQA layout), else None
    (uneven tp splits can give a rank an irregular head map)."""
    heads, kv_heads = len(kv_index), max(kv_index) + 1
    if heads % kv_heads:
        return None
    g = heads // kv_heads
    return g if all(kv == h // g for h, kv in enumerate(kv_index)) else None


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache,
    batch: AttentionBatch,
    kv_index: torch.Tensor,
    scale: float,
    kv_group: int | None = None,
) -> torch.Tensor:
    """Store this step's k/v in the cache and attend over each sequence's whole context.

    q: (batch, seq, heads, head_dim); k, v: (batch, seq, kv_heads, head_dim). `kv_index` maps
    each local query head to its local kv head (uneven tp splits make this irregular);
    `kv_group` is `kv_group_size(kv_index)`. Returns (batch, seq, heads, head_dim).
    """
    k_cache, v_cache = cache
    b, _, kv_heads, d = k.shape
    flat_k = k_cache.view(-1, kv_heads, d)  # (slots, kv_heads, head_dim)
    flat_v = v_cache.view(-1, kv_heads, d)
    slots, rows = batch.store_index()
    new_k, new_v = k.reshape(-1, kv_heads, d), v.reshape(-1, kv_heads, d)
    if rows is not None:  # drop padding tokens
        new_k, new_v = new_k[rows], new_v[rows]
    flat_k.index_copy_(0, slots, new_k.to(flat_k.dtype))
    flat_v.index_copy_(0, slots, new_v.to(flat_v.dtype))
    if batch.fresh:
        keys, values = k, v  # whole context is this step's tokens
    else:
        ctx = batch.context_slots(k_cache.shape[1]).flatten()
        keys = flat_k.index_select(0, ctx).view(b, batch.kv_len, kv_heads, d)
        values = flat_v.index_select(0, ctx).view(b, batch.kv_len, kv_heads, d)
    if q.shape[1] == 1:
        # an irregular head map is attended head by head (group 1)
        bias = batch.decode_bias(keys.shape[1], q.shape[2] // (kv_group or 1))
        return decode_attention(q, keys, values, bias, kv_index, kv_group, scale)
    keys = keys.index_select(2, kv_index).transpose(1, 2)  # (batch, heads, kv_len, head_dim)
    values = values.index_select(2, kv_index).transpose(1, 2)
    mask = batch.mask(keys.shape[2])
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=mask, scale=scale
    )  # (batch, heads, seq, head_dim)
    return out.transpose(1, 2)


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    kv_index: torch.Tensor,
    kv_group: int | None,
    scale: float,
) -> torch.Tensor:
    """One new token per sequence: two small batched matmuls in fp32 instead of SDPA.

    For a single query row, CPU SDPA (and expanding kv heads for it) costs several times the
    arithmetic; grouping the query heads by their kv head reads each cached key once, and fp32
    scores and softmax keep it at least as accurate as SDPA's fused kernel. Few ops on purpose:
    each small op costs several microseconds right after a weight stream has cooled the caches.
    q: (batch, 1, heads, head_dim); keys, values: (batch, kv_len, kv_heads, head_dim);
    bias: (batch * kv_heads, 1, kv_len), -inf for keys a row must not see (`decode_bias`; with
    an irregular head map, kv_heads = heads). Returns (batch, 1, heads, head_dim).
    """
    b, _, heads, d = q.shape
    if kv_group is None:  # irregular head map: give every query head its own copy of its kv head
        keys, values, kv_group = keys.index_select(2, kv_index), values.index_select(2, kv_index), 1
    n, kv_len = b * (heads // kv_group), keys.shape[1]
    f32 = torch.float32
    qg = q.reshape(n, kv_group, d).to(f32)  # (batch * kv_heads, group, head_dim)
    # (batch * kv_heads, kv_len, head_dim) fp32 in one copy: the cast makes low-precision keys
    # contiguous, and for fp32 keys (which `to` returns as they are) reshape copies
    contiguous = torch.contiguous_format
    k = keys.transpose(1, 2).to(f32, memory_format=contiguous).reshape(n, kv_len, d)
    v = values.transpose(1, 2).to(f32, memory_format=contiguous).reshape(n, kv_len, d)
    scores = torch.baddbmm(bias, qg, k.transpose(1, 2), alpha=scale)  # (n, group, kv_len)
    out = torch.bmm(scores.softmax(-1), v)  # (batch * kv_heads, group, head_dim)
    return out.view(b, 1, heads, d).to(q.dtype)
