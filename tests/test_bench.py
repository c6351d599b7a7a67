"""`shardserve bench` end to end on a tiny llama: real spawned gloo ranks (1, 2 ranks), real files.

One run (module fixture) measures 1x1, 2x1 and 1x2 on two workloads, plus a layout that cannot
fit (pp 8 > 4 layers); the tests check that every figure is there and consistent.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import pytest

from launcher.cli import main
from parallel.collectives import CommStats

WORKLOADS = "8:5:1,8:5:3"


@pytest.fixture(scope="module")
def bench_out(checkpoint_dir, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    rc = main(["bench", "--model", str(checkpoint_dir("llama")), "--layouts", "2x1,1x2,1x8",
               "--workloads", WORKLOADS, "--kv-cache-mb", "4", "--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def layout(results: dict, name: str) -> dict[str, Any]:
    return next(e for e in results["layouts"] if e["layout"] == name)


def test_every_layout_reported_and_unfit_one_skipped(bench_out) -> None:
    _, res = bench_out
    assert [e["layout"] for e in res["layouts"]] == ["1x1", "2x1", "1x2", "1x8"]
    assert [e["status"] for e in res["layouts"]] == ["ok", "ok", "ok", "skipped"]
    assert "pp=8" in layout(res, "1x8")["error"] or "8" in layout(res, "1x8")["error"]
    assert res["meta"]["workloads"] == WORKLOADS.split(",")


def test_figures_present_and_consistent(bench_out) -> None:
    _, res = bench_out
    for e in res["layouts"][:3]:
        assert e["load_s"] > 0 and e["startup_s"] >= e["load_s"]
        assert len(e["mem_mb_per_rank"]) == e["ranks"] and min(e["mem_mb_per_rank"]) > 0
        assert e["mem_mb_max"] == max(e["mem_mb_per_rank"])
        assert [r["workload"] for r in e["workloads"]] == WORKLOADS.split(",")
        for r in e["workloads"]:
            assert r["error"] is None
            assert r["output_tokens"] == r["batch"] * r["output_len"]
            assert r["tokens_per_s"] == pytest.approx(r["output_tokens"] / r["elapsed_s"],
                                                      rel=1e-9)
            assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] <= r["elapsed_s"] * 1e3
            assert 0 < r["itl_p50_ms"] <= r["itl_p99_ms"]
            assert 0.0 <= r["comm_share"] < 1.0


def test_speedup_against_1x1_of_the_same_run(bench_out) -> None:
    _, res = bench_out
    base = {r["workload"]: r["tokens_per_s"] for r in layout(res, "1x1")["workloads"]}
    for e in res["layouts"][:3]:
        for r in e["workloads"]:
            assert r["speedup"] == pytest.approx(r["tokens_per_s"] / base[r["workload"]])
    assert all(r["speedup"] == 1.0 for r in layout(res, "1x1")["workloads"])


def test_communication_share_and_memory_split(bench_out) -> None:
    _, res = bench_out
    one, tp2, pp2 = layout(res, "1x1"), layout(res, "2x1"), layout(res, "1x2")
    assert one["layout_comm_share"] == 0.0
    assert tp2["layout_comm_share"] > 0.0 and pp2["layout_comm_share"] > 0.0
    # untied llama: pipeline stages hold disjoint parameters, tp ranks at least a share each
    assert sum(pp2["weights_mb_per_rank"]) == pytest.approx(one["weights_mb_per_rank"][0])
    assert max(tp2["weights_mb_per_rank"]) < one["weights_mb_per_rank"][0]
    assert sum(tp2["weights_mb_per_rank"]) >= one["weights_mb_per_rank"][0]


def test_csv_and_markdown_match_json(bench_out) -> None:
    out, res = bench_out
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 + 1  # ok layouts x workloads, plus the skipped layout
    ok = [r for r in rows if r["status"] == "ok"]
    want = [r["tokens_per_s"] for e in res["layouts"][:3] for r in e["workloads"]]
    assert [float(r["tokens_per_s"]) for r in ok] == pytest.approx(want)
    md = (out / "summary.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 3 * 2 + 1
    assert all(f"| {e['layout']} |" in md for e in res["layouts"])


def test_plots_are_valid_pngs(bench_out) -> None:
    import matplotlib.image

    out, _ = bench_out
    for name in ("throughput_latency.png", "scaling.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_failed_layout_is_reported_not_hung(tmp_path: Path, checkpoint_dir) -> None:
    """A checkpoint whose weights are missing: every layout fails with the rank's error."""
    src = checkpoint_dir("llama")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((src / "config.json").read_text())
    t0 = time.monotonic()
    rc = main(["bench", "--model", str(broken), "--layouts", "1x1", "--workloads", "4:2:1",
               "--out", str(tmp_path / "out")])
    assert rc == 1 and time.monotonic() - t0 < 60
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["layouts"][0]["status"] == "failed"
    assert "rank 0" in res["layouts"][0]["error"]


def test_bad_arguments_are_command_errors(tmp_path: Path, checkpoint_dir, capsys) -> None:
    model = str(checkpoint_dir("llama"))
    assert main(["bench", "--model", model, "--layouts", "2y1", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--model", model, "--workloads", "8:0:1", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--model", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "2y1" in err and "8:0:1" in err and "not a directory" in err


def test_comm_stats_accumulates_per_step() -> None:
    import torch

    stats = CommStats()
    cpu = torch.device("cpu")
    for wait in (0.0, 0.02):
        stats.begin_step()
        with stats.timed(cpu):
            time.sleep(wait)
        stats.end_step(cpu)
    assert len(stats.steps) == 2
    (s0, c0), (s1, c1) = stats.steps
    assert c0 <= s0 and 0.02 <= c1 <= s1
