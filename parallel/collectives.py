"""Collectives over a group. Each returns early for a one-rank (or absent) group.

`all_reduce` and `all_gather_uneven` take an optional `CommStats`: when given (benchmarks), the
time spent in the collective is added to it; when None (the default) nothing is measured.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


class CommStats:
    """Seconds one rank spends communicating, per executed step (off unless a context has one).

    On CPU the host time of each transfer is measured; on CUDA, events recorded around it on the
    current stream give the device time, read once at the end of the step (no sync per call).
    `steps` holds (step seconds, communication seconds) for every step, in order.
    """

    def __init__(self) -> None:
        self.steps: list[tuple[float, float]] = []
        self._comm_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._t0 = 0.0

    def begin_step(self) -> None:
        self._comm_s, self._events = 0.0, []
        self._t0 = time.perf_counter()

    def end_step(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self._comm_s += sum(a.elapsed_time(b) for a, b in self._events) / 1e3
        self.steps.append((time.perf_counter() - self._t0, self._comm_s))

    @contextmanager
    def timed(self, device: torch.device) -> Iterator[None]:
        """Count the enclosed transfer as communication."""
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
            return
        t0 = time.perf_counter()
        yield
        self._comm_s += time.perf_counter() - t0


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else group.size()


def all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None,
               stats: CommStats | None = None) -> torch.Tensor:
    """Sum `t` over the group in place and return it."""
    if group_size(group) == 1:
        return t
    if stats is None:
        dist.all_reduce(t, group=group)
    else:
        with stats.timed(t.device):
            dist.all_reduce(t, group=group)
    return t


def all_gather_uneven(
    t: torch.Tensor, sizes: list[int], dim: int, group: dist.ProcessGroup | None,
    stats: CommStats | None = None,
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
    if stats is None:
        dist.all_gather(pieces, t.contiguous(), group=group)
    else:
        with stats.timed(t.device):
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
