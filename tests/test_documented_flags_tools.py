"""`shardserve bench` and `shardserve analyze` flags the docs name that other tests leave
untouched, each shown to have its effect: a real bench run (spawned rank, results.json), the
bench job a parsed command line builds driven through a real engine, and real analyze runs
against real servers (python models; the giant model's layout is refused before any start)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.cli import build_parser, main
from tests.backend_helpers import write_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# --- bench -------------------------------------------------------------------------------------
def _param_bytes(model: Path, element_size: int) -> float:
    """MiB of the checkpoint's parameters at `element_size` bytes each."""
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "pt") as f:
        numel = sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys())
    return numel * element_size / 2**20


def test_bench_dtype_kv_cache_mb_and_no_comm_stats(checkpoint_dir, tmp_path: Path) -> None:
    """A real 1x1 bench run: `--dtype fp16` halves the weights (2 bytes per parameter of the
    fp32 checkpoint; fp16, because CPU bf16 runs pack their linear weights outside the
    parameters the figure counts), `--kv-cache-mb 1` allocates 1 MiB of KV cache instead of 256, and
    `--no-comm-stats` leaves every communication share empty."""
    ck = checkpoint_dir("llama")
    out = tmp_path / "out"
    rc = main(["bench", "--model", str(ck), "--layouts", "1x1", "--workloads", "8:4:3",
               "--dtype", "fp16", "--kv-cache-mb", "1", "--no-comm-stats", "--backend", "gloo",
               "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    (one,) = res["layouts"]
    assert one["status"] == "ok" and one["backend"] == "gloo"
    assert res["meta"]["dtype"] == "fp16"
    assert one["weights_mb_per_rank"] == [pytest.approx(_param_bytes(ck, 2))]
    assert one["kv_mb_per_rank"] == [pytest.approx(1.0)]
    assert one["layout_comm_share"] is None
    (row,) = one["workloads"]
    assert row["comm_share"] is None and row["output_tokens"] == 12


def test_bench_backend_nccl(checkpoint_dir, tmp_path: Path) -> None:
    """`--backend nccl` is what the ranks use: without CUDA the layout fails naming it."""
    out = tmp_path / "out"
    rc = main(["bench", "--model", str(checkpoint_dir("llama")), "--layouts", "1x1",
               "--workloads", "4:2:1", "--backend", "nccl", "--out", str(out)])
    (one,) = json.loads((out / "results.json").read_text())["layouts"]
    if torch.cuda.is_available():
        assert rc == 0 and one["backend"] == "nccl"
    else:
        assert rc == 1 and one["status"] == "failed"
        assert "nccl" in one["error"] and "CUDA" in one["error"], one["error"]


def _drive(argv: list[str]) -> tuple[Any, list[tuple[str, list[int]]], int]:
    """The bench job `shardserve bench ARGV` builds for layout 1x1, driven through a real
    engine built from its spec: the job, every request submitted (id, prompt) and the most
    requests that ran at once."""
    from launcher.bench_cmd import make_job, parse_workloads
    from launcher.bench_run import drive_all
    from launcher.local import start_local_engine

    args = build_parser().parse_args(["bench", *argv])
    job = make_job(args, parse_workloads(args.workloads), 1, 1)
    local = start_local_engine(job.spec)
    engine = local.engine
    submitted: list[tuple[str, list[int]]] = []
    most = [0]
    add, step = engine.add_request, engine.step

    def add_spy(request_id: str, prompt: list[int], params: Any) -> None:
        submitted.append((request_id, list(prompt)))
        add(request_id, prompt, params)

    def step_spy() -> Any:
        outputs = step()
        most[0] = max(most[0], engine.stats()["running"])
        return outputs

    engine.add_request, engine.step = add_spy, step_spy
    try:
        drive_all(engine, job, None, None)
    finally:
        local.close()
    return job, submitted, most[0]


def test_bench_job_flags(checkpoint_dir) -> None:
    """`--no-warmup` drops the warm-up request, `--seed` changes the random prompts (the same
    seed gives the same ones), `--max-running 1` runs one request at a time;
    `--threads-per-rank` and `--timeout` reach the job each rank is started with."""
    from launcher.bench_run import Workload, make_prompts

    base = ["--model", str(checkpoint_dir("llama")), "--workloads", "8:3:3", "--kv-cache-mb",
            "2"]
    job, submitted, most = _drive([*base, "--no-warmup", "--seed", "3", "--max-running", "1",
                                   "--threads-per-rank", "1", "--timeout", "45"])
    assert [rid for rid, _ in submitted] == ["w0-0", "w0-1", "w0-2"]
    assert most == 1
    assert (job.threads, job.spec.timeout_s, job.spec.engine.max_running) == (1, 45.0, 1)
    seeded = [p for _, p in submitted]
    w = Workload(8, 3, 3)
    vocab = json.loads((checkpoint_dir("llama") / "config.json").read_text())["vocab_size"]
    assert seeded == make_prompts(w, vocab, 3)
    job, submitted, most = _drive(base)  # defaults: warm-up first, seed 0, 64 running
    assert submitted[0][0] == "warmup-0" and [r for r, _ in submitted[1:]] == [
        "w0-0", "w0-1", "w0-2"]
    assert most == 3
    assert [p for _, p in submitted[1:]] != seeded
    assert (job.threads, job.spec.timeout_s, job.spec.engine.max_running) == (0, 600.0, 64)


# --- analyze -----------------------------------------------------------------------------------
# Input X of any length; a request whose X does not hold exactly 5 values is an error.
SHAPED = """
name: "{name}"
backend: "python"
max_batch_size: 4
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "N" data_type: TYPE_INT32 dims: [ 1 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 1000 }}
"""
SHAPED_MODEL = '''
import numpy as np

from serving.python_model import (InferenceResponse, PythonModel, Tensor, TritonError,
                                  get_input_tensor_by_name)


class Shaped(PythonModel):
    def execute(self, requests):
        out = []
        for r in requests:
            x = get_input_tensor_by_name(r, "X").as_numpy()
            if x.shape[-1] != 5:
                out.append(InferenceResponse(error=TritonError(f"X has shape {x.shape}")))
                continue
            out.append(InferenceResponse([Tensor("N", np.full((x.shape[0], 1), 5, np.int32))]))
        return out
'''
QUICK_LOAD = ["--concurrency", "2", "--duration-s", "1", "--warmup-s", "0.3"]


@pytest.fixture(scope="module")
def analyze_repo(checkpoint_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("analyze-flags") / "repo"
    for name in ("shaped", "other"):
        write_model(root, name, SHAPED.format(name=name), {"model.py": SHAPED_MODEL})
    assert main(["repo", "add", str(root), "tiny_llm", "--model",
                 str(checkpoint_dir("llama"))]) == 0
    return root


def _report(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text())


def test_analyze_shape_preferred_batch_sizes_and_models(analyze_repo: Path) -> None:
    """`--models shaped` analyzes that model only; `--preferred-batch-sizes 0,2` searches both
    values and writes the chosen one into OUTREPO; `--shape X:5` sends X of 5 values, which
    the model answers without an error."""
    from serving.repository import ModelRepository

    out = analyze_repo.parent / "out-shaped"
    rc = main(["analyze", "--model-repository", str(analyze_repo), "--out", str(out),
               "--models", "shaped", "--shape", "X:5", "--max-batch-sizes", "4",
               "--queue-delays-us", "1000", "--instance-counts", "1",
               "--preferred-batch-sizes", "0,2", *QUICK_LOAD])
    assert rc == 0
    report = _report(out)
    assert set(report["models"]) == {"shaped"}
    entry = report["models"]["shaped"]
    results = entry["results"]
    assert sorted(r["point"]["preferred_batch_size"] for r in results) == [0, 2]
    for r in results:
        assert r["status"] == "ok" and r["requests"] > 0 and r["errors"] == 0, r
        assert (r["window_s"], r["concurrency"]) == (1.0, 2)  # --duration-s, --concurrency
    chosen = results[entry["chosen_index"]]["point"]["preferred_batch_size"]
    written = ModelRepository(out).config("shaped").dynamic_batching.preferred_batch_size
    assert list(written) == ([chosen] if chosen else [])


def test_analyze_max_ranks(analyze_repo: Path) -> None:
    """`--max-ranks 1` refuses the 2x1 layout (2 ranks) before starting anything; the giant
    model's running-request grid follows `--concurrency 8` (N/4, N/2, N)."""
    out = analyze_repo.parent / "out-ranks"
    rc = main(["analyze", "--model-repository", str(analyze_repo), "--out", str(out),
               "--models", "tiny_llm", "--layouts", "2x1", "--max-ranks", "1",
               "--kv-cache-mb", "16", "--concurrency", "8", "--duration-s", "1"])
    assert rc == 1
    entry = _report(out)["models"]["tiny_llm"]
    assert entry["knobs"]["max_running"] == [2, 4, 8]
    (result,) = entry["results"]
    assert result["status"] == "skipped" and result["point"]["layout"] == "2x1"
    assert "2 ranks exceed the machine's limit of 1" in result["error"]
    assert not list((out / ".analyze").glob("tiny_llm-*.log"))


def test_analyze_start_timeout(analyze_repo: Path) -> None:
    """`--start-timeout 0.01`: no server is ready that fast, so the point fails saying so."""
    out = analyze_repo.parent / "out-timeout"
    rc = main(["analyze", "--model-repository", str(analyze_repo), "--out", str(out),
               "--models", "shaped", "--shape", "X:5", "--max-batch-sizes", "1",
               "--queue-delays-us", "0", "--instance-counts", "1", "--start-timeout", "0.01",
               *QUICK_LOAD])
    assert rc == 1
    (result,) = _report(out)["models"]["shaped"]["results"]
    assert result["status"] == "failed" and "server not ready after 0s" in result["error"]


def test_analyze_throughput_and_memory_constraints(analyze_repo: Path, capsys) -> None:
    """`--min-throughput` and `--max-memory-per-rank-mb` are judged on every point: budgets no
    point can meet fail the model naming both."""
    out = analyze_repo.parent / "out-budgets"
    rc = main(["analyze", "--model-repository", str(analyze_repo), "--out", str(out),
               "--models", "shaped", "--shape", "X:5", "--max-batch-sizes", "1",
               "--queue-delays-us", "0", "--instance-counts", "1", "--min-throughput", "1e9",
               "--max-memory-per-rank-mb", "1", *QUICK_LOAD])
    assert rc == 1
    (result,) = _report(out)["models"]["shaped"]["results"]
    assert result["status"] == "ok" and result["errors"] == 0
    assert result["meets"] == {"no_errors": True, "min_throughput": False,
                               "max_memory_per_rank_mb": False}
    err = capsys.readouterr().err
    assert "no configuration meets throughput >= 1e+09 and memory per rank <= 1 MB" in err, err
