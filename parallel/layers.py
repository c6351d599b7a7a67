"""Tensor-parallel layers. Each allocates only its own shard; a loader fills it.

Communication is declared by flags (`gather_output`, `input_is_parallel`), never by hooks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.collectives import CommStats, all_gather_uneven, all_reduce
from parallel.kernels import can_prepack, linear, packed_linear, prepack
from parallel.partition import split_range, split_sizes


class ColumnParallelLinear(nn.Module):
    """y = x @ W.T with W's output rows split over the tp group.

    `out_sizes` gives every rank's number of output features (uneven splits allowed); this rank
    holds `out_sizes[tp_rank]`. With `gather_output` the full output is assembled on every rank.
    """

    comm_stats: CommStats | None = None  # see attach_comm_stats
    packed: torch.Tensor | None = None  # see prepack_linears

    def __init__(
        self,
        in_features: int,
        out_sizes: list[int],
        tp_rank: int,
        group: dist.ProcessGroup | None,
        *,
        bias: bool = False,
        gather_output: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.out_sizes = out_sizes
        self.group = group
        self.gather_output = gather_output
        local = out_sizes[tp_rank]
        self.weight = nn.Parameter(torch.empty(local, in_features, dtype=dtype), False)
        self.bias = nn.Parameter(torch.empty(local, dtype=dtype), False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.packed, self.bias)
        if self.gather_output:
            y = all_gather_uneven(y, self.out_sizes, -1, self.group, self.comm_stats)
        return y


class RowParallelLinear(nn.Module):
    """y = x @ W.T with W's input columns split over the tp group; partial sums are all-reduced.

    With `input_is_parallel` the input already holds this rank's slice of features (the output of
    a column-parallel layer). The bias is replicated and added once, after the reduction.
    """

    comm_stats: CommStats | None = None  # see attach_comm_stats
    packed: torch.Tensor | None = None  # see prepack_linears

    def __init__(
        self,
        in_local: int,
        out_features: int,
        group: dist.ProcessGroup | None,
        *,
        bias: bool = False,
        input_is_parallel: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not input_is_parallel:
            raise NotImplementedError("row-parallel layers take an already-split input")
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, in_local, dtype=dtype), False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(linear(x, self.weight, self.packed), self.group, self.comm_stats)
        if self.bias is not None:
            y = y + self.bias
        return y


class VocabParallelEmbedding(nn.Module):
    """Embedding table with its rows (the vocabulary) split over the tp group.

    Each rank looks up the ids inside its range, zeroes the rest, and the sum over ranks is the
    full embedding.
    """

    comm_stats: CommStats | None = None  # see attach_comm_stats

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        tp: int,
        tp_rank: int,
        group: dist.ProcessGroup | None,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.start, self.stop = split_range(vocab_size, tp, tp_rank)
        self.group = group
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(self.stop - self.start, dim, dtype=dtype), False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(ids, self.weight)
        inside = (ids >= self.start) & (ids < self.stop)
        local = torch.where(inside, ids - self.start, torch.zeros_like(ids))
        out = F.embedding(local, self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(out, self.group, self.comm_stats)


class ParallelLMHead(ColumnParallelLinear):
    """Vocabulary projection split like `VocabParallelEmbedding`; logits are gathered over tp."""

    def __init__(
        self,
        dim: int,
        vocab_size: int,
        tp: int,
        tp_rank: int,
        group: dist.ProcessGroup | None,
        *,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            dim, split_sizes(vocab_size, tp), tp_rank, group,
            bias=bias, gather_output=True, dtype=dtype,
        )


def attach_comm_stats(model: nn.Module, stats: CommStats | None) -> None:
    """Make every tp layer of `model` add its collectives' time to `stats` (None: stop)."""
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            m.comm_stats = stats


class MergedColumns:
    """Column-parallel layers that read the same input (q/k/v, gate/up) run as one matmul.

    The parts stay ordinary modules, loaded under their checkpoint names; `fuse()` (called once
    after loading, by `prepack_linears`) concatenates their local shards into one packed weight,
    so a decode step streams them in one pass. Not a module itself: the parts are registered
    where they are declared. Calling it returns the parts' outputs in order; `fused` returns
    them side by side in one tensor.
    """

    def __init__(self, *parts: ColumnParallelLinear) -> None:
        self.parts = parts
        self.sizes = [p.weight.shape[0] for p in parts]
        self.packed: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.packed is None:
            return [p(x) for p in self.parts]
        return list(packed_linear(x, self.packed, self.bias).split(self.sizes, -1))

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """The parts' outputs side by side in one tensor (..., sum of sizes)."""
        if self.packed is None:
            return torch.cat([p(x) for p in self.parts], dim=-1)
        return packed_linear(x, self.packed, self.bias)

    def fuse(self) -> bool:
        """Pack the parts' weights as one; False (nothing changed) where that cannot help."""
        ws = [p.weight for p in self.parts]
        biases = [p.bias for p in self.parts]
        if (any(p.gather_output or p.packed is not None for p in self.parts)
                or not all(can_prepack(w) for w in ws)
                or len({(w.shape[1], w.dtype) for w in ws}) != 1
                or len({b is None for b in biases}) != 1):
            return False
        self.packed = prepack(torch.cat(ws))
        if self.packed is None:
            return False
        if biases[0] is not None:
            self.bias = torch.cat([b.detach() for b in biases])
        for p in self.parts:  # the merged copy replaces them
            p.weight = nn.Parameter(p.weight.new_empty(0, p.weight.shape[1]), False)
        return True


def prepack_linears(model: nn.Module) -> list[torch.Tensor]:
    """Pack `model`'s linear weights for oneDNN once, after loading (parallel/kernels.py):
    first each `MergedColumns` group as one matrix, then every other linear layer. Returns the
    matrices packed by this call (for `kernels.move_to_huge_pages`). Packed layers drop their
    plain weight, so memory does not double (a tied embedding keeps its own reference to a
    shared tensor)."""
    packed: list[torch.Tensor] = []
    for m in list(model.modules()):
        for group in vars(m).values():
            if isinstance(group, MergedColumns) and group.packed is None and group.fuse():
                packed.append(group.packed)
    for m in model.modules():
        # a part of a fused group has already given up its weight (0 rows)
        if (not isinstance(m, (ColumnParallelLinear, RowParallelLinear)) or m.packed is not None
                or m.weight.shape[0] == 0):
            continue
        m.packed = prepack(m.weight)
        if m.packed is not None:
            packed.append(m.packed)
            m.weight = nn.Parameter(m.weight.new_empty(0, m.weight.shape[1]), False)
    return packed
