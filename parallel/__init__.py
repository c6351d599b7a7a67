"""Parallel substrate: rank grid, collectives, tensor-parallel layers and pipeline transfers."""

from parallel.context import ParallelContext, init_parallel
from parallel.partition import HeadLayout, head_layout, split_range, split_sizes

__all__ = [
    "HeadLayout",
    "ParallelContext",
    "head_layout",
    "init_parallel",
    "split_range",
    "split_sizes",
]
