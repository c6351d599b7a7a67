"""The analyzer's search space without a server: which layouts a giant model may use here,
the configs a point stands for (parsed back by the serving config loader), and how quick
mode's coordinate descent and the full grid walk a space."""

from __future__ import annotations

import itertools
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from launcher.analyze_run import link_model
from launcher.analyze_space import (
    Grids,
    Space,
    apply_llm,
    apply_ordinary,
    coordinate_descent,
    full_grid,
    llm_space,
    ordinary_space,
)
from serving.cli import add_llm_model
from serving.config import load_config, parse_config
from serving.repository import ModelRepository

ORDINARY = textwrap.dedent("""
    name: "m"
    backend: "python"
    max_batch_size: 8
    input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
    output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]
    instance_group [ { count: 3 kind: KIND_CPU } ]
    dynamic_batching { priority_levels: 2 default_priority_level: 1 }
""")


def test_ordinary_point_config_round_trips(tmp_path: Path) -> None:
    config = parse_config(ORDINARY, "m")
    space = ordinary_space(config, Grids(max_batch_sizes=[1, 4], queue_delays_us=[0, 500],
                                         instances=[1, 2], preferred_batch_sizes=[0, 2]))
    assert [k for k, _ in space.knobs] == ["max_batch_size", "queue_delay_us", "instances",
                                           "preferred_batch_size"]
    grid = space.grid()
    # mbs=1 collapses delay and preferred size: 2 instance counts + 2*2*2 batched points
    assert len(grid) == 2 + 8
    point = {"max_batch_size": 4, "queue_delay_us": 500, "instances": 2,
             "preferred_batch_size": 2}
    out = apply_ordinary(config, point)
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.pbtxt").write_text(ORDINARY)
    link_model(tmp_path / "src", tmp_path / "m", out)
    back = load_config(tmp_path / "m")
    assert back.max_batch_size == 4 and back.instance_group[0].count == 2
    assert back.instance_group[0].kind == config.instance_group[0].kind
    assert back.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(back.dynamic_batching.preferred_batch_size) == [2]
    assert back.dynamic_batching.priority_levels == 2  # untouched settings survive


def test_unbatched_model_only_searches_instances() -> None:
    config = parse_config(ORDINARY.replace("max_batch_size: 8", "max_batch_size: 0"), "m")
    space = ordinary_space(config, Grids(instances=[1, 2, 4]))
    assert space.knobs == [("instances", [1, 2, 4])]


def test_llm_layouts_that_do_not_fit_are_skipped(tmp_path: Path,
                                                 checkpoint_dir: Callable[[str], Path]) -> None:
    repo = tmp_path / "repo"
    add_llm_model(repo, "llm", checkpoint_dir("llama"), extra={"num_blocks": "64"})
    config = ModelRepository(repo).config("llm")
    grids = Grids(layouts=[(1, 1), (2, 1), (1, 2), (8, 1), (1, 8), (2, 2)], max_ranks=4,
                  concurrency=8)
    space = llm_space(config, repo / "llm", grids)
    layouts = dict(space.knobs)["layout"]
    assert layouts == ["1x1", "2x1", "1x2", "2x2"]
    reasons = {p["layout"]: why for p, why in space.skipped}
    assert set(reasons) == {"8x1", "1x8"}
    assert "limit of 4" in reasons["8x1"] and "limit of 4" in reasons["1x8"]
    assert dict(space.knobs)["max_running"] == [2, 4, 8]
    assert dict(space.knobs)["kv_cache_mb"] == [64, 256]
    # with room for 8 ranks, tp=8 > 4 heads and pp=8 > 4 layers are refused for the model
    wide = llm_space(config, repo / "llm", Grids(layouts=[(8, 1), (1, 8)], max_ranks=8))
    reasons = {p["layout"]: why for p, why in wide.skipped}
    assert "4 attention heads" in reasons["8x1"]
    assert reasons["1x8"] and dict(wide.knobs)["layout"] == []
    out = apply_llm(config, {"layout": "2x1", "max_running": 4, "kv_cache_mb": 16})
    assert {k: out.parameters[k].string_value for k in ("tp", "pp", "max_running",
                                                        "kv_cache_bytes")} == {
        "tp": "2", "pp": "1", "max_running": "4", "kv_cache_bytes": str(16 * 2**20)}
    assert "num_blocks" not in out.parameters  # it would override the searched KV budget


def _fake_measure(throughput: Callable[[dict[str, Any]], tuple[float, float]],
                  latency_budget: float | None = None
                  ) -> tuple[Callable[[dict[str, Any]], dict[str, Any]], list[dict[str, Any]]]:
    """A measurement function over a known landscape (the search logic is what is tested)."""
    calls: list[dict[str, Any]] = []

    def measure(point: dict[str, Any]) -> dict[str, Any]:
        calls.append(dict(point))
        t, lat = throughput(point)
        meets = latency_budget is None or lat <= latency_budget
        return {"status": "ok", "throughput": t, "latency_p99_ms": lat, "meets_all": meets}
    return measure, calls


def test_quick_mode_raises_one_knob_at_a_time_and_stops() -> None:
    space = Space([("a", [1, 2, 4, 8]), ("b", [1, 2, 3])])
    # a pays up to 4 (8 gains < 5%); b pays nothing
    measure, calls = _fake_measure(lambda p: ({1: 10, 2: 20, 4: 40, 8: 41}[p["a"]]
                                              - p["b"] * 0.1, 1.0))
    coordinate_descent(space, measure)
    assert calls == [{"a": 1, "b": 1}, {"a": 2, "b": 1}, {"a": 4, "b": 1}, {"a": 8, "b": 1},
                     {"a": 4, "b": 2}]


def test_quick_mode_stops_at_the_latency_budget() -> None:
    space = Space([("a", [1, 2, 4, 8])])
    measure, calls = _fake_measure(lambda p: (p["a"] * 10.0, p["a"] * 10.0),
                                   latency_budget=25.0)
    coordinate_descent(space, measure)
    assert [c["a"] for c in calls] == [1, 2, 4]  # 4 breaks the budget: 8 is never tried


def test_quick_mode_tries_every_layout_of_a_rank_count() -> None:
    """Layouts with as many ranks have no order: the whole tier is measured, its best judged."""
    space = Space([("layout", ["1x1", "2x1", "1x2", "2x2", "4x1", "8x1"]), ("b", [1])],
                  tiers={"layout": lambda lp: int(lp[0]) * int(lp[2])})
    speed = {"1x1": 10, "2x1": 9, "1x2": 15, "2x2": 12, "4x1": 14, "8x1": 99}
    measure, calls = _fake_measure(lambda p: (speed[p["layout"]], 1.0))
    coordinate_descent(space, measure)
    # 1x2 wins the 2-rank tier; the 4-rank tier's best (14) is no gain: 8x1 is never tried
    assert [c["layout"] for c in calls] == ["1x1", "2x1", "1x2", "2x2", "4x1"]


@pytest.mark.parametrize("sizes", [[1, 2], [1, 2, 3]])
def test_full_grid_tries_every_point(sizes: list[int]) -> None:
    space = Space([("a", sizes), ("b", [5, 6])])
    measure, calls = _fake_measure(lambda p: (1.0, 1.0))
    full_grid(space, measure)
    assert calls == [{"a": a, "b": b} for a, b in itertools.product(sizes, [5, 6])]
