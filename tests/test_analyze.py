"""`shardserve analyze` end to end on a tiny repository (a python model that batches and a
tiny Llama added with `shardserve repo add`): every point is served by a real server and
driven by the analyzer's tritonclient load generator; the report, charts and the output
repository are checked, and the output repository is served again to confirm the chosen
configurations meet the constraints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from launcher.analyze_load import ServerProcess
from launcher.analyze_run import Constraints, LoadSettings, PointRunner
from launcher.cli import main
from serving.repository import ModelRepository
from tests.backend_helpers import write_model
from tests.test_backends_batching import WINDOW_MODEL, WINDOW_OUTPUTS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# A batch costs 20 ms whatever its size, so batching pays and the search has something to find.
WIN = """
name: "win"
backend: "python"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
{outputs}
parameters { key: "exec_ms" value { string_value: "20" } }
""".replace("{outputs}", WINDOW_OUTPUTS)
# Budgets only a hang or a runaway could miss (no speed is asserted: a point measured at all
# completed requests within its 1.5 s window, i.e. at more than 0.6 per second).
LATENCY_MS, MIN_THROUGHPUT, MAX_MEM_MB = 60000.0, 0.1, 6000.0
CONCURRENCY, MAX_TOKENS = 4, 8
LOAD = ["--duration-s", "1.5", "--warmup-s", "0.5", "--concurrency", str(CONCURRENCY),
        "--max-tokens", str(MAX_TOKENS), "--prompt-len", "8"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, checkpoint_dir) -> Path:
    root = tmp_path_factory.mktemp("analyze") / "repo"
    write_model(root, "win", WIN, {"model.py": WINDOW_MODEL})
    assert main(["repo", "add", str(root), "tiny_llm", "--model",
                 str(checkpoint_dir("llama"))]) == 0
    return root


@pytest.fixture(scope="module")
def analyzed(repo: Path) -> tuple[Path, dict[str, Any]]:
    out = repo.parent / "out"
    rc = main(["analyze", "--model-repository", str(repo), "--out", str(out), "--quick",
               "--latency-p99-ms", str(LATENCY_MS), "--min-throughput", str(MIN_THROUGHPUT),
               "--max-memory-per-rank-mb", str(MAX_MEM_MB),
               "--max-batch-sizes", "1,4", "--queue-delays-us", "0", "--instance-counts", "1",
               "--layouts", "1x1,2x1", "--max-running", "4", "--kv-cache-mb", "16", *LOAD])
    assert rc == 0
    return out, json.loads((out / "report.json").read_text())


def _check_figures(r: dict[str, Any], constraints: Constraints) -> None:
    """A measured point's figures agree with each other and with its constraint verdicts."""
    assert r["requests"] > 0 and r["window_s"] > 0
    assert r["infer_per_s"] == pytest.approx(r["requests"] / r["window_s"])
    assert r["latency_p50_ms"] <= r["latency_p99_ms"]
    assert len(r["mem_mb_per_rank"]) >= 1 and r["mem_mb_max"] == max(r["mem_mb_per_rank"])
    if r["kind"] == "llm":  # ignore_eos: every counted request made exactly MAX_TOKENS tokens
        assert r["output_tokens"] == r["requests"] * MAX_TOKENS
        assert r["throughput"] == pytest.approx(r["output_tokens"] / r["window_s"])
        assert 0 < r["ttft_p50_ms"] <= r["latency_p99_ms"]
        tp, pp = (int(x) for x in r["point"]["layout"].split("x"))
        assert len(r["mem_mb_per_rank"]) == tp * pp  # the server process + spawned ranks
    else:
        assert r["throughput"] == r["infer_per_s"]
    assert r["meets"] == constraints.check(r)
    assert r["meets_all"] == all(r["meets"].values())


def test_report_and_choice(analyzed: tuple[Path, dict[str, Any]]) -> None:
    out, report = analyzed
    constraints = Constraints(**report["constraints"])
    assert set(report["models"]) == {"win", "tiny_llm"}
    for name, entry in report["models"].items():
        results = entry["results"]
        measured = [r for r in results if r["status"] == "ok"]
        assert len(measured) >= 2, f"{name}: quick mode measured {results}"
        for r in measured:
            _check_figures(r, constraints)
        feasible = [r for r in measured if r["meets_all"]]
        best = max(r["throughput"] for r in feasible)
        chosen = results[entry["chosen_index"]]
        assert chosen["meets_all"] and chosen["throughput"] == best
        md = (out / "report.md").read_text()
        assert f"## {name}" in md and all(r["label"] in md for r in results)
        png = out / entry["chart"]
        assert png.read_bytes()[:8] == PNG_MAGIC
        import matplotlib.image as mpimg

        assert mpimg.imread(png).ndim == 3
    assert "**chosen**" in (out / "report.md").read_text()
    # quick mode tried batching for the python model (the next value of a knob is always
    # measured); which size wins is the measurement's call, checked above as the best feasible
    win = report["models"]["win"]["results"]
    assert sorted(r["point"]["max_batch_size"] for r in win if r["status"] == "ok") == [1, 4]


def test_output_repository_meets_constraints(analyzed: tuple[Path, dict[str, Any]]) -> None:
    """Serve OUTREPO as written and measure each model again with the analyzer's load."""
    out, report = analyzed
    constraints = Constraints(**report["constraints"])
    repo = ModelRepository(out)
    assert repo.names() == ["tiny_llm", "win"]
    for name, entry in report["models"].items():
        chosen = entry["results"][entry["chosen_index"]]
        config = repo.config(name)
        if name == "win":
            assert config.max_batch_size == chosen["point"]["max_batch_size"]
        else:
            layout = f"{config.parameters['tp'].string_value}x" \
                     f"{config.parameters['pp'].string_value}"
            assert layout == chosen["point"]["layout"]
            assert config.parameters["max_running"].string_value == "4"
        server = ServerProcess(out, out / f"verify-{name}.log",
                               extra=["--model-control-mode", "explicit", "--load-model", name])
        runner = PointRunner(name, out / name, config, out, LoadSettings(
            CONCURRENCY, 1.5, 0.5, 8, MAX_TOKENS), constraints)
        try:
            load = runner.drive(server.url)
        finally:
            mem = server.stop()
        figures = {**load.figures(), "status": "ok", "mem_mb_max": max(mem),
                   "throughput": load.figures()["tokens_per_s" if runner.llm
                                                else "infer_per_s"]}
        verdict = constraints.check(figures)
        assert all(verdict.values()), (name, verdict, figures)


def test_impossible_constraint_fails_with_report(repo: Path, capsys) -> None:
    out = repo.parent / "impossible"
    rc = main(["analyze", "--model-repository", str(repo), "--out", str(out), "--models", "win",
               "--latency-p99-ms", "0.001", "--max-batch-sizes", "1", "--queue-delays-us", "0",
               "--instance-counts", "1", *LOAD])
    err = capsys.readouterr().err
    assert rc == 1
    assert "model 'win': no configuration meets latency p99 <= 0.001 ms" in err
    report = json.loads((out / "report.json").read_text())
    entry = report["models"]["win"]
    assert entry["chosen_index"] is None and entry["results"][0]["status"] == "ok"
    assert entry["results"][0]["meets"]["latency_p99_ms"] is False
    assert "Nothing chosen" in (out / "report.md").read_text()
    assert (out / "win_throughput_latency.png").read_bytes()[:8] == PNG_MAGIC
    # the output repository is still complete, with the original config kept
    assert (out / "win" / "config.pbtxt").read_text() == (repo / "win" / "config.pbtxt"
                                                          ).read_text()
    src_files = sorted(p.relative_to(repo) for p in (repo / "tiny_llm").rglob("*") if p.is_file())
    for rel in src_files:  # the output mirrors the original (hard links where possible)
        assert (out / rel).read_bytes() == (repo / rel).read_bytes(), rel
    assert not any(p.is_symlink() for p in (out / "tiny_llm").rglob("*"))
    assert np.isfinite(entry["results"][0]["latency_p99_ms"])
