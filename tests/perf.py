"""Running Triton's perf_analyzer (from the tritonclient 2.41 wheel) against a test server.

It needs libb64 (apt: libb64-0d) and libcudart from the nvidia-cuda-runtime-cu12 wheel on
LD_LIBRARY_PATH even on a CPU machine; tests skip with that reason when it cannot start."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def _cudart_dir() -> str | None:
    try:
        import nvidia.cuda_runtime as cr  # type: ignore[import-not-found]
    except ImportError:
        return None
    lib = Path(next(iter(cr.__path__))) / "lib"
    return str(lib) if lib.is_dir() else None


def perf_analyzer_env() -> tuple[Path, dict[str, str]]:
    """The perf_analyzer binary next to this Python, and an environment it can start in."""
    exe = Path(sys.executable).parent / "perf_analyzer"
    env = dict(os.environ)
    lib = _cudart_dir()
    if lib:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [lib, env.get("LD_LIBRARY_PATH")]))
    if not exe.is_file():
        pytest.skip(f"perf_analyzer not found at {exe} (tritonclient 2.41 wheel)")
    probe = subprocess.run([str(exe), "--version"], env=env, capture_output=True, text=True)
    if "error while loading shared libraries" in probe.stderr:
        pytest.skip("perf_analyzer cannot start: " + probe.stderr.strip() +
                    " (apt-get install libb64-0d; pip install nvidia-cuda-runtime-cu12)")
    return exe, env


def run_perf_analyzer(url: str, model: str, tmp: Path, extra: list[str],
                      concurrency: str = "1:2", timeout_s: float = 120.0,
                      protocol: str = "grpc") -> dict[str, Any]:
    """Run a short measurement; return errors seen, the CSV rows and the console output."""
    exe, env = perf_analyzer_env()
    report = tmp / f"perf-{model}.csv"
    cmd = [str(exe), "-m", model, "-i", protocol, "-u", url, "--concurrency-range", concurrency,
           "--measurement-interval", "1500", "--stability-percentage", "1000",
           "--max-trials", "3", "-f", str(report), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    output = proc.stdout + proc.stderr
    errors = output.lower().count("error") + (proc.returncode != 0)
    rows = []
    if report.is_file():
        with open(report) as f:
            rows = [{k: float(v) for k, v in r.items() if v and _numeric(v)}
                    for r in csv.DictReader(f)]
    return {"errors": errors, "rows": rows, "output": output, "returncode": proc.returncode}


def _numeric(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False
