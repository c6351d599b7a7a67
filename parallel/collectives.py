"""Collectives over a group. Each returns early for a one-rank (or absent) group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum `t` over the group in place and return it."""
    if group_size(group) == 1:
        return t
    dist.all_reduce(t, group=group)
    return t


def all_gather_uneven(
    t: torch.Tensor, sizes: list[int], dim: int, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Concatenate each rank's `t` along `dim`, where rank i holds `sizes[i]` entries there.

    gloo and NCCL need equal sizes, so pieces are padded to the largest and trimmed after.
    """
    if group_size(group) == 1:
        return t
    dim = dim % t.dim()
    width = max(sizes)
    if t.shape[dim] < width:
        pad_shape = list(t.shape)
        pad_shape[dim] = width - t.shape[dim]
        t = torch.cat([t, t.new_zeros(pad_shape)], dim=dim)
    pieces = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(pieces, t.contiguous(), group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(pieces, sizes, strict=True)], dim=dim)


def broadcast_object(obj: object, src: int, group: dist.ProcessGroup | None) -> object:
    """Broadcast a picklable object from global rank `src` (control channel, CPU)."""
    if group_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj: object, group: dist.ProcessGroup | None) -> list[object]:
    """Every rank's `obj`, in rank order (control channel, CPU)."""
    if group_size(group) == 1:
        return [obj]
    out: list[object] = [None] * group_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
