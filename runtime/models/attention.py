"""Attention over a paged KV cache, shared by every architecture."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionBatch:
    """Per-step attention metadata, padded to (batch, max new tokens).

    `slot_mapping` gives each new token's cache slot (block * block_size + offset, -1 for
    padding); `block_tables` each sequence's blocks; `kv_len` the longest context this step.
    `fresh` means no sequence has cached tokens yet, so attention can skip the cache read.
    """

    positions: torch.Tensor  # (batch, seq) long
    slot_mapping: torch.Tensor  # (batch, seq) long
    block_tables: torch.Tensor  # (batch, max_blocks) long
    last_index: torch.Tensor  # (batch,) index of each row's last real token
    kv_len: int
    fresh: bool
    sliding_window: int | None = None

    def mask(self, key_len: int) -> torch.Tensor:
        """(batch, 1, seq, key_len) boolean: causal (and windowed) over absolute positions."""
        keys = torch.arange(key_len, device=self.positions.device)
        q = self.positions.unsqueeze(-1)  # (batch, seq, 1)
        allowed = keys <= q
        if self.sliding_window is not None:
            allowed &= keys > q - self.sliding_window
        return allowed.unsqueeze(1)


KVCache = tuple[torch.Tensor, torch.Tensor]  # each (num_blocks, block_size, kv_heads, head_dim)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache,
    batch: AttentionBatch,
    kv_index: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Store this step's k/v in the cache and attend over each sequence's whole context.

    q: (batch, seq, heads, head_dim); k, v: (batch, seq, kv_heads, head_dim). `kv_index` maps
    each local query head to its local kv head (uneven tp splits make this irregular).
    Returns (batch, seq, heads, head_dim).
    """
    k_cache, v_cache = cache
    flat_k = k_cache.view(-1, *k_cache.shape[2:])  # (slots, kv_heads, head_dim)
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    valid = batch.slot_mapping >= 0
    slots = batch.slot_mapping[valid]
    flat_k[slots] = k[valid].to(flat_k.dtype)
    flat_v[slots] = v[valid].to(flat_v.dtype)
    if batch.fresh:
        keys, values = k, v  # whole context is this step's tokens
    else:
        keys = k_cache[batch.block_tables].flatten(1, 2)[:, : batch.kv_len]  # (b, kv_len, kvh, d)
        values = v_cache[batch.block_tables].flatten(1, 2)[:, : batch.kv_len]
    keys = keys.index_select(2, kv_index).transpose(1, 2)  # (batch, heads, kv_len, head_dim)
    values = values.index_select(2, kv_index).transpose(1, 2)
    mask = batch.mask(keys.shape[2])
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=mask, scale=scale
    )  # (batch, heads, seq, head_dim)
    return out.transpose(1, 2)
