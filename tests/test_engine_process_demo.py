"""The serving demo end to end (`python -m configs.demo_repo run`, what scripts/serve_demo.sh
runs after set-up): the demo repository's giant model (tp=2, pp=2, in its engine process) and
its ensemble stream real text, the ensemble's equal to the giant model's uppercased by the
postprocess step, and the server stops with exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.engine_helpers import rank_pids
from tests.serving_helpers import ROOT


def test_serving_demo_streams_through_the_ensemble(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "configs.demo_repo", "run", str(repo),
                          "--max-tokens", "12"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    log = (tmp_path / "demo-server.log").read_text()
    assert run.returncode == 0, run.stdout + run.stderr + log[-3000:]
    lines = {line.split(">", 1)[0].strip(): line.split(">", 1)[1].strip()
             for line in run.stdout.splitlines() if ">" in line}
    assert lines["demo_llm"] and lines["demo_chat (ensemble)"], run.stdout
    assert lines["demo_chat (ensemble)"] == lines["demo_llm"].upper(), run.stdout
    assert "matches the giant model's" in run.stdout and "exit 0" in run.stdout, run.stdout
    assert len(rank_pids(log, "demo_llm")) == 4  # tp=2 x pp=2, rank 0 its engine process
    assert sorted(p.name for p in repo.iterdir()) == ["demo_chat", "demo_llm", "postprocess",
                                                       "preprocess"]
