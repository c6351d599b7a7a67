"""Point-to-point transfers of hidden states between pipeline stages."""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.collectives import CommStats


def send_hidden(t: torch.Tensor, dst: int) -> dist.Work:
    """Start sending `t` to global rank `dst`; the caller waits on the returned handle."""
    return dist.isend(t.contiguous(), dst)


def recv_hidden(
    shape: tuple[int, ...], dtype: torch.dtype, src: int, device: torch.device,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Receive a tensor whose shape and dtype the receiver already knows (from the step plan).

    With `stats`, the wait (which includes the previous stage's compute) counts as communication.
    """
    t = torch.empty(shape, dtype=dtype, device=device)
    if stats is None:
        dist.recv(t, src)
    else:
        with stats.timed(device):
            dist.recv(t, src)
    return t
