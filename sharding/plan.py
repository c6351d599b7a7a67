"""Shard plan: which tensors (and which slices, in which dtype) go into which rank file.

The plan is computed from shapes and dtypes alone, before any tensor byte is read, and checks
that the source is complete and that every tensor's cuts fit its shape and cover it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from sharding.checkpoint import CheckpointError
from sharding.rules import _LAYER_RE, ArchRules, Cut, architecture_of, rules_for
from sharding.sources import TensorSource
from sharding.stformat import dtype_name, nbytes


class PlanError(ValueError):
    """The source cannot be sharded as asked (incomplete, or shapes that do not fit)."""


@dataclass(frozen=True, eq=False)
class Entry:
    """One tensor of one rank file: its cut of the full tensor, stored shape and dtype."""

    name: str
    cut: Cut
    shape: tuple[int, ...]
    dtype: torch.dtype
    full_shape: tuple[int, ...]

    def meta_json(self) -> str:
        return cut_meta(self.cut, self.full_shape)


def cut_meta(cut: Cut, full_shape: tuple[int, ...] | list[int]) -> str:
    """The per-tensor safetensors metadata value: split dim, pieces and full shape."""
    return json.dumps({"dim": cut.dim, "pieces": [list(p) for p in cut.pieces],
                       "shape": list(full_shape)})


def parse_cut_meta(value: str) -> tuple[Cut, list[int]]:
    """Inverse of `cut_meta` (raises ValueError/KeyError/TypeError on malformed values)."""
    raw = json.loads(value)
    dim = raw["dim"]
    pieces = tuple((int(a), int(b)) for a, b in raw["pieces"])
    return Cut(None if dim is None else int(dim), pieces), [int(s) for s in raw["shape"]]


def cut_shape(full: tuple[int, ...] | list[int], cut: Cut) -> tuple[int, ...]:
    shape = list(full)
    if cut.dim is not None:
        shape[cut.dim] = sum(b - a for a, b in cut.pieces)
    return tuple(shape)


def covers(pieces: list[tuple[int, int]], n: int) -> bool:
    """True when the union of [a, b) ranges is exactly [0, n)."""
    reach = 0
    for a, b in sorted(pieces):
        if a > reach or a < 0 or b > n:
            return False
        reach = max(reach, b)
    return reach == n


def check_cuts(name: str, shape: list[int], cuts: list[Cut]) -> None:
    """Every cut must fit `shape`, and together the tp ranks' cuts must cover it."""
    cut_dims = {c.dim for c in cuts}
    if cut_dims == {None}:
        return
    if len(cut_dims) != 1:
        raise PlanError(f"tensor {name}: tp ranks disagree on the split dim")
    dim = cut_dims.pop()
    assert dim is not None
    pieces = [p for c in cuts for p in c.pieces]
    if dim >= len(shape) or not covers(pieces, shape[dim]):
        raise PlanError(f"tensor {name} has shape {shape}, which does not match the layout the "
                        f"config implies (pieces {sorted(pieces)} of dim {dim})")


def check_complete(rules: ArchRules, names: set[str]) -> None:
    """The source must have the same tensors in every layer, plus embedding/head/norms."""
    per_layer: dict[int, set[str]] = defaultdict(set)
    for name in names:
        m = _LAYER_RE.match(name)
        if m and not rules.is_ignored(name):
            per_layer[int(m.group(1))].add(name[m.end():])
    needed = [rules.embed_name, *rules.first_stage_names, *rules.last_stage_names]
    if not rules.dims.tied:
        needed.append(rules.head_name)
    missing = [n for n in needed if n not in names]
    reference = per_layer.get(0, set())
    for layer in range(rules.dims.num_layers):
        lacking = reference - per_layer.get(layer, set())
        if not per_layer.get(layer) or lacking:
            missing.append(f"layer {layer}: {', '.join(sorted(lacking)) or 'all tensors'}")
    if missing:
        raise PlanError(f"source checkpoint is incomplete; missing {'; '.join(missing[:5])}")


@dataclass
class Plan:
    """The full layout: entries per global rank, and per tensor the ranks that hold it."""

    architecture: str
    rules: ArchRules
    ranks: list[list[Entry]]
    holders: dict[str, list[tuple[int, Entry]]]
    tensors: dict[str, dict[str, Any]]
    ignored: list[str]
    dtype: str
    total_bytes: int
    largest_source_bytes: int


def layout_rules(config: dict[str, Any], tp: int, pp: int,
                 stage_layers: list[int] | None) -> ArchRules:
    """Rules for the layout, with the CLI's checks on pp and --stage-layers."""
    architecture_of(config)
    if stage_layers is not None and len(stage_layers) != pp:
        raise ValueError(f"--stage-layers has {len(stage_layers)} entries but pp={pp}")
    if pp < 1:
        raise ValueError(f"pp={pp} must be at least 1")
    try:
        return rules_for(config, tp, pp, stage_layers)
    except KeyError as e:
        raise CheckpointError(f"config.json: lacks {e} needed for sharding") from e


def make_plan(source: TensorSource, tp: int, pp: int, stage_layers: list[int] | None = None,
              dtype: torch.dtype | None = None) -> Plan:
    """Plan a tp x pp layout of `source`, optionally converting float tensors to `dtype`."""
    rules = layout_rules(source.config, tp, pp, stage_layers)
    names = source.names()
    check_complete(rules, set(names))
    ranks: list[list[Entry]] = [[] for _ in range(rules.pp * tp)]
    holders: dict[str, list[tuple[int, Entry]]] = {}
    tensors: dict[str, dict[str, Any]] = {}
    ignored: list[str] = []
    largest = 0
    for name in names:
        if rules.is_ignored(name):
            ignored.append(name)
            continue
        stages = rules.stages_of(name)
        if stages is None:
            raise PlanError(f"tensor {name} of {source.path} is not part of a "
                            f"{architecture_of(source.config)} model")
        full = tuple(source.shape(name))
        src_dtype = source.dtype(name)
        largest = max(largest, nbytes(full, src_dtype))
        out_dtype = dtype if dtype is not None and src_dtype.is_floating_point else src_dtype
        cuts = [rules.cut(name, t) for t in range(tp)]
        check_cuts(name, list(full), cuts)
        holders[name] = []
        for stage in stages:
            for t, cut in enumerate(cuts):
                entry = Entry(name, cut, cut_shape(full, cut), out_dtype, full)
                ranks[stage * tp + t].append(entry)
                holders[name].append((stage * tp + t, entry))
        tensors[name] = {"shape": list(full), "dtype": dtype_name(out_dtype),
                         "stages": list(stages)}
    floats = {e.dtype for r in ranks for e in r if e.dtype.is_floating_point}
    total = sum(nbytes(e.shape, e.dtype) for r in ranks for e in r)
    return Plan(architecture_of(source.config), rules, ranks, holders, tensors, ignored,
                dtype_name(floats.pop()) if len(floats) == 1 else "mixed", total, largest)
