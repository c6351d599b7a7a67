"""`shardserve bench` inside a torchrun world: the world's layouts are measured on the launched
ranks, the 1x1 baseline by rank 0 afterwards (local spawn); one set of results comes out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_under_torchrun(tmp_path: Path, checkpoint_dir) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "launcher.cli", "bench", "--model", str(checkpoint_dir("llama")),
           "--layouts", "2x1,1x2", "--workloads", "8:4:2", "--kv-cache-mb", "4",
           "--out", str(out), "--timeout", "60"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    by_name = {e["layout"]: e for e in res["layouts"]}
    assert by_name["2x1"]["status"] == "ok" and by_name["2x1"]["backend"] == "gloo"
    assert by_name["1x1"]["status"] == "ok"
    assert by_name["1x2"]["status"] == "ok"  # a second layout on the same world, new groups
    assert by_name["1x2"]["layout_comm_share"] > 0
    for e in by_name.values():
        row = e["workloads"][0]
        assert row["output_tokens"] == 8
        assert row["tokens_per_s"] * row["elapsed_s"] == pytest.approx(8)
    assert by_name["1x1"]["workloads"][0]["speedup"] == 1.0
    assert proc.stdout.count("2x1") == 1  # only rank 0 prints the table
