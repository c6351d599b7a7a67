"""The tp x pp rank grid. Global rank = pp_rank * tp + tp_rank: tp is innermost so that a tp
group sits inside one node, and pipeline stages are consecutive blocks of ranks."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel.collectives import CommStats


@dataclass
class ParallelContext:
    """Parallel state of one rank, passed explicitly to layers and the engine."""

    tp: int = 1
    pp: int = 1
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: dist.ProcessGroup | None = None
    control_group: dist.ProcessGroup | None = None  # gloo, CPU: step plans, tokens, shutdown
    comm_stats: CommStats | None = None  # set (before the model is built) to time communication

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def global_rank(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp + tp_rank

    @property
    def prev_stage_rank(self) -> int:
        return self.global_rank(self.pp_rank - 1, self.tp_rank)

    @property
    def next_stage_rank(self) -> int:
        return self.global_rank(self.pp_rank + 1, self.tp_rank)

    @property
    def last_stage_leader(self) -> int:
        """The rank that samples tokens: tp rank 0 of the last stage."""
        return self.global_rank(self.pp - 1, 0)

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> ParallelContext:
        """A one-rank context for single-process use and unit tests."""
        return cls(device=torch.device(device))


def init_parallel(
    tp: int,
    pp: int,
    rank: int,
    *,
    backend: str = "gloo",
    init_method: str = "env://",
    device: torch.device | str = "cpu",
    timeout_s: float = 60.0,
) -> ParallelContext:
    """Join the world of tp * pp ranks and build every group from the grid, in one place.

    All ranks must call this with the same arguments: `new_group` is collective and groups are
    created in the same order everywhere (tp groups stage by stage, then the control group).
    """
    world = tp * pp
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout
        )
    if dist.get_world_size() != world:
        raise RuntimeError(f"world size {dist.get_world_size()} != tp*pp = {tp}*{pp}")
    ctx = ParallelContext(tp=tp, pp=pp, rank=rank, device=torch.device(device))
    for stage in range(pp):
        ranks = [ctx.global_rank(stage, t) for t in range(tp)]
        group = dist.new_group(ranks, timeout=timeout)
        if stage == ctx.pp_rank:
            ctx.tp_group = group
    if backend == "gloo":
        ctx.control_group = dist.group.WORLD
    else:
        ctx.control_group = dist.new_group(list(range(world)), backend="gloo", timeout=timeout)
    return ctx
