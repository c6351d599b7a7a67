"""Paged KV cache: fixed-size blocks handed out by rank 0, identical tensors on every rank."""

from __future__ import annotations

import torch

from runtime.models.attention import KVCache


class BlockAllocator:
    """Free list of KV blocks (rank 0 only: the scheduler decides, workers follow the plan)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"need {n} KV blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def bytes_per_block(layers: int, kv_heads: int, head_dim: int, block_size: int,
                    dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * kv_heads * head_dim * block_size * elem


def allocate_caches(layer_ids: list[int], num_blocks: int, block_size: int, kv_heads: int,
                    head_dim: int, dtype: torch.dtype, device: torch.device
                    ) -> dict[int, KVCache]:
    """Per-layer (k, v) of shape (num_blocks, block_size, kv_heads, head_dim)."""
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return {i: (torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device)) for i in layer_ids}
