"""What the analyzer searches: the knobs of a model (ordinary: instance count, max_batch_size,
dynamic batching delay and preferred batch size; giant: tp x pp layout, max running requests,
KV-cache budget), the config each point stands for, and the two search strategies (the whole
grid, or coordinate descent that stops raising a knob once it stops paying)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from serving.config import param, set_param

LLM_BACKEND = "shardserve_llm"
IMPROVEMENT = 1.05  # quick mode: a knob's next value must raise throughput by more than 5%
Point = dict[str, Any]


def is_llm(config: mc.ModelConfig) -> bool:
    return config.backend == LLM_BACKEND


def is_ensemble(config: mc.ModelConfig) -> bool:
    return config.platform == "ensemble" or config.backend == "ensemble"


@dataclass
class Grids:
    """Candidate values per knob (from the command line; None: derived defaults)."""

    instances: list[int] = field(default_factory=lambda: [1, 2])
    max_batch_sizes: list[int] | None = None
    queue_delays_us: list[int] = field(default_factory=lambda: [0, 2000])
    preferred_batch_sizes: list[int] = field(default_factory=lambda: [0])
    layouts: list[tuple[int, int]] | None = None  # None: every layout that fits the machine
    max_running: list[int] | None = None
    kv_cache_mb: list[int] | None = None
    max_ranks: int | None = None  # None: GPUs when CUDA is present, else 2 x CPU cores
    concurrency: int = 8


@dataclass
class Space:
    """The ordered knobs of one model (each with ascending candidate values) and the layouts
    that were ruled out before measuring (with the reason)."""

    knobs: list[tuple[str, list[Any]]]
    skipped: list[tuple[Point, str]] = field(default_factory=list)
    # knob -> tier of a value: quick mode tries a whole tier before judging it (layouts: the
    # ones with the same number of ranks, which have no order among themselves)
    tiers: dict[str, Callable[[Any], int]] = field(default_factory=dict)

    def tiered(self, knob: str, values: list[Any]) -> list[list[Any]]:
        """`values` grouped into consecutive tiers (one value per tier unless `tiers` says)."""
        key = self.tiers.get(knob)
        if key is None:
            return [[v] for v in values]
        return [list(g) for _, g in itertools.groupby(values, key=key)]

    def grid(self) -> list[Point]:
        names = [k for k, _ in self.knobs]
        points = [dict(zip(names, combo, strict=True))
                  for combo in itertools.product(*(v for _, v in self.knobs))]
        return dedupe([normalize(p) for p in points])

    def start(self) -> Point:
        return normalize({k: v[0] for k, v in self.knobs})


def normalize(point: Point) -> Point:
    """Equivalent points become equal: without batching, delay and preferred size mean nothing."""
    p = dict(point)
    if p.get("max_batch_size", 2) <= 1:
        p.update({k: 0 for k in ("queue_delay_us", "preferred_batch_size") if k in p})
    if p.get("preferred_batch_size", 0) >= p.get("max_batch_size", 1 << 30):
        p["preferred_batch_size"] = 0
    return p


def dedupe(points: list[Point]) -> list[Point]:
    seen: set[str] = set()
    out = []
    for p in points:
        if (k := point_key(p)) not in seen:
            seen.add(k)
            out.append(p)
    return out


def point_key(point: Point) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items())


def point_label(point: Point) -> str:
    """Short label for tables and charts."""
    short = {"instances": "inst", "max_batch_size": "mbs", "queue_delay_us": "delay_us",
             "preferred_batch_size": "pref", "layout": "", "max_running": "run",
             "kv_cache_mb": "kv_mb"}
    return " ".join(f"{short.get(k, k)}{'=' if short.get(k, k) else ''}{v}"
                    for k, v in point.items())


# --- ordinary models -------------------------------------------------------------------------
def ordinary_space(config: mc.ModelConfig, grids: Grids) -> Space:
    knobs: list[tuple[str, list[Any]]] = []
    if config.max_batch_size > 0:
        sizes = grids.max_batch_sizes or sorted({1, 8, 32, config.max_batch_size})
        knobs.append(("max_batch_size", sorted(set(sizes))))
        knobs.append(("queue_delay_us", sorted(set(grids.queue_delays_us))))
    knobs.append(("instances", sorted(set(grids.instances))))
    if config.max_batch_size > 0:
        knobs.append(("preferred_batch_size", sorted(set(grids.preferred_batch_sizes))))
    return Space(knobs)


def apply_ordinary(config: mc.ModelConfig, point: Point) -> mc.ModelConfig:
    """A copy of `config` with the point's instance count and batching settings."""
    out = mc.ModelConfig()
    out.CopyFrom(config)
    first = config.instance_group[0] if config.instance_group else None
    del out.instance_group[:]
    group = out.instance_group.add(count=point["instances"])
    if first is not None:
        group.kind = first.kind
        group.gpus.extend(first.gpus)
    if "max_batch_size" not in point:
        return out
    out.max_batch_size = point["max_batch_size"]
    if point["max_batch_size"] > 1 or config.HasField("dynamic_batching"):
        dyn = out.dynamic_batching
        dyn.max_queue_delay_microseconds = point["queue_delay_us"]
        del dyn.preferred_batch_size[:]
        if point.get("preferred_batch_size"):
            dyn.preferred_batch_size.append(point["preferred_batch_size"])
    return out


# --- giant models ----------------------------------------------------------------------------
def max_ranks_default() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return 2 * (os.cpu_count() or 1)


def model_path(config: mc.ModelConfig, model_dir: Path) -> Path:
    """The checkpoint or shard folder a giant model's config names (as the backend resolves
    it, against the highest version folder)."""
    versions = sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()),
                      key=lambda p: int(p.name))
    base = versions[-1] if versions else model_dir / "1"
    return (base / (param(config, "model_path") or ".")).resolve()


def _heads(path: Path) -> int | None:
    import json

    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    d = json.loads(cfg.read_text())
    return d.get("num_attention_heads") or d.get("n_head")


def vocab_size(path: Path, default: int = 100) -> int:
    import json

    cfg = path / "config.json"
    if cfg.is_file():
        return int(json.loads(cfg.read_text()).get("vocab_size") or default)
    return default


def _layout_problem(path: Path, tp: int, pp: int, max_ranks: int, heads: int | None
                    ) -> str | None:
    """Why a layout cannot run here (None: it can)."""
    from runtime.worker import EngineSpec, check_layout

    if tp * pp > max_ranks:
        return f"{tp * pp} ranks exceed the machine's limit of {max_ranks}"
    if heads is not None and tp > heads:
        return f"tp={tp} exceeds the model's {heads} attention heads"
    try:
        check_layout(EngineSpec(str(path), tp, pp))
    except Exception as e:  # noqa: BLE001 (any refusal rules the layout out, with its reason)
        return str(e).splitlines()[0][:200]
    return None


def candidate_layouts(max_ranks: int) -> list[tuple[int, int]]:
    """Power-of-two tp x pp up to `max_ranks` ranks, fewest ranks first."""
    sizes = [1 << i for i in range(max_ranks.bit_length())]
    return sorted(((tp, pp) for tp in sizes for pp in sizes if tp * pp <= max_ranks),
                  key=lambda lp: (lp[0] * lp[1], lp[1]))


def llm_space(config: mc.ModelConfig, model_dir: Path, grids: Grids) -> Space:
    from sharding.manifest import is_shard_folder, load_manifest

    path = model_path(config, model_dir)
    max_ranks = grids.max_ranks or max_ranks_default()
    if is_shard_folder(path):  # a shard folder runs at the layout it was cut for
        m = load_manifest(path)
        wanted = [(m.tp, m.pp)]
    else:
        wanted = grids.layouts or candidate_layouts(max_ranks)
    heads = _heads(path)
    layouts, skipped = [], []
    for tp, pp in wanted:
        problem = _layout_problem(path, tp, pp, max_ranks, heads)
        if problem:
            skipped.append(({"layout": f"{tp}x{pp}"}, problem))
        else:
            layouts.append(f"{tp}x{pp}")
    c = grids.concurrency
    running = grids.max_running or sorted({max(1, c // 4), max(1, c // 2), c})
    kv_default = int(param(config, "kv_cache_bytes") or 256 * 2**20) // 2**20
    kv = grids.kv_cache_mb or sorted({max(1, kv_default // 4), kv_default})
    layouts.sort(key=_ranks)
    return Space([("layout", layouts), ("max_running", sorted(set(running))),
                  ("kv_cache_mb", sorted(set(kv)))], skipped, {"layout": _ranks})


def _ranks(layout: str) -> int:
    tp, pp = layout.split("x")
    return int(tp) * int(pp)


def apply_llm(config: mc.ModelConfig, point: Point) -> mc.ModelConfig:
    """A copy of `config` with the point's layout, max_running and KV budget (per rank)."""
    out = mc.ModelConfig()
    out.CopyFrom(config)
    tp, pp = point["layout"].split("x")
    set_param(out, "tp", int(tp))
    set_param(out, "pp", int(pp))
    set_param(out, "max_running", point["max_running"])
    set_param(out, "kv_cache_bytes", point["kv_cache_mb"] * 2**20)
    if "num_blocks" in out.parameters:  # it would override the KV budget being searched
        del out.parameters["num_blocks"]
    return out


# --- search ----------------------------------------------------------------------------------
Measure = Callable[[Point], dict[str, Any]]


def _better(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Feasible beats infeasible; otherwise more than 5% more throughput."""
    if new["status"] != "ok":
        return False
    if old["status"] != "ok" or new["meets_all"] != old["meets_all"]:
        return new["meets_all"] or old["status"] != "ok"
    return (new["throughput"] or 0) > (old["throughput"] or 0) * IMPROVEMENT


def _rank(result: dict[str, Any]) -> tuple[bool, bool, float]:
    return (result["status"] == "ok", bool(result["meets_all"]), result["throughput"] or 0.0)


def coordinate_descent(space: Space, measure: Measure) -> None:
    """Quick mode: from the smallest value of every knob, raise one knob at a time and keep a
    value only while it pays (a better point by `_better`); the first tier of values that does
    not (too slow, over a budget, or under 5% gain) ends that knob."""
    current = space.start()
    best = measure(current)
    for knob, values in space.knobs:
        tiers = space.tiered(knob, values)
        start = next((i for i, t in enumerate(tiers) if current[knob] in t), 0)
        for tier in tiers[start:]:
            top = None
            for value in tier:
                candidate = normalize({**current, knob: value})
                if candidate == current:
                    continue
                result = measure(candidate)
                if top is None or _rank(result) > _rank(top[0]):
                    top = (result, candidate)
            if top is None:
                continue
            if not _better(top[0], best):
                break
            best, current = top


def full_grid(space: Space, measure: Measure) -> None:
    for point in space.grid():
        measure(point)
