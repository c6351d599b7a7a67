"""Dynamic batching on vs off, and the server's per-request overhead, measured with Triton's
perf_analyzer against a real shardserve server (both baselines measured in the same run).

    python -m benchmarks.bench_batching [--concurrency 16] [--overhead-concurrency 8]

1. Batching: the same TorchScript model served twice, with and without `dynamic_batching`, at
   concurrency 16. The model is a deep, narrow MLP (1000 layers of 32): on a CPU one execution
   costs about the same for 1 or 16 rows (dispatch-bound), which is what makes batching pay off,
   as on an accelerator. Target: >= 3x throughput with batching.
2. Overhead: an identity python model on shardserve vs `benchmarks.bare_server` (a bare grpcio
   KServe v2 servicer echoing the input) for the same request. Target: >= 0.5 of the bare server.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

DEEP_CONFIG = """
name: "{name}"
platform: "pytorch_libtorch"
max_batch_size: 16
input [ {{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ 32 ] }} ]
output [ {{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 32 ] }} ]
parameters {{ key: "INTRA_OP_THREAD_COUNT" value {{ string_value: "1" }} }}
{batching}
"""

# Batches of 16 go at once; a partial batch waits at most 5 ms for the rest of the clients.
BATCHING = "dynamic_batching { preferred_batch_size: [ 16 ] max_queue_delay_microseconds: 5000 }"

IDENTITY_CONFIG = """
name: "identity"
backend: "python"
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
"""

IDENTITY_MODEL = '''
from serving.python_model import InferenceResponse, PythonModel, Tensor


class Identity(PythonModel):
    def execute(self, requests):
        return [InferenceResponse([Tensor("OUTPUT0", r.inputs()[0].as_numpy())])
                for r in requests]
'''


def deep_mlp(depth: int = 1000, width: int = 32) -> torch.nn.Module:
    """A dispatch-bound model: many tiny layers."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers).eval()


def build_repo(repo: Path) -> None:
    model = torch.jit.script(deep_mlp())
    for name, batching in (("deep_plain", ""), ("deep_batched", BATCHING)):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(DEEP_CONFIG.format(name=name,
                                                                     batching=batching))
        model.save(str(repo / name / "1" / "model.pt"))
    (repo / "identity" / "1").mkdir(parents=True)
    (repo / "identity" / "config.pbtxt").write_text(IDENTITY_CONFIG)
    (repo / "identity" / "1" / "model.py").write_text(textwrap.dedent(IDENTITY_MODEL))


def start(cmd: list[str], log: Path, ready: str, timeout_s: float = 120.0
          ) -> tuple[subprocess.Popen, str]:
    """Start a server process and return it with the port its ready line names."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    handle = open(log, "w")  # noqa: SIM115 (the process owns it until the end of the run)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = re.search(ready, log.read_text())
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[2:4]} exited:\n{log.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"{cmd} not ready:\n{log.read_text()}")


def perf_env() -> dict[str, str]:
    """perf_analyzer from the tritonclient 2.41 wheel needs libcudart even on CPU machines."""
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime as cr  # type: ignore[import-not-found]

        lib = str(Path(next(iter(cr.__path__))) / "lib")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [lib, env.get("LD_LIBRARY_PATH")]))
    except ImportError:
        pass
    return env


def perf(url: str, model: str, concurrency: int, out: Path, interval_ms: int) -> float:
    """Throughput (inferences/s) of one perf_analyzer measurement."""
    exe = Path(sys.executable).parent / "perf_analyzer"
    report = out / f"{model}-{url.rsplit(':', 1)[1]}-{concurrency}.csv"
    cmd = [str(exe), "-m", model, "-i", "grpc", "-u", url, "--concurrency-range",
           str(concurrency), "--measurement-interval", str(interval_ms),
           "--stability-percentage", "100", "--max-trials", "8", "-f", str(report)]
    proc = subprocess.run(cmd, env=perf_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not report.is_file():
        raise RuntimeError(f"perf_analyzer failed on {model}:\n{proc.stdout}{proc.stderr}")
    with open(report) as f:
        return float(next(csv.DictReader(f))["Inferences/Second"])


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    build_repo(tmp / "repo")
    py = sys.executable
    server, port = start([py, "-m", "launcher.cli", "serve", "--model-repository",
                          str(tmp / "repo"), "--grpc-port", "0",
                              "--http-port", "0", "--metrics-port", "0"],
                         tmp / "server.log", r"shardserve ready: gRPC on [\w.]+:(\d+)")
    bare, bare_port = start([py, "-m", "benchmarks.bare_server", "--port", "0"],
                            tmp / "bare.log", r"bare ready: (\d+)")
    url, bare_url = f"localhost:{port}", f"localhost:{bare_port}"
    figures: dict[str, float] = {}
    try:
        for _ in range(args.rounds):  # alternate, so machine noise hits both sides alike
            for key, target, model, conc in (
                    ("plain", url, "deep_plain", args.concurrency),
                    ("batched", url, "deep_batched", args.concurrency),
                    ("identity", url, "identity", args.overhead_concurrency),
                    ("bare", bare_url, "identity", args.overhead_concurrency)):
                value = perf(target, model, conc, tmp, args.interval_ms)
                figures[key] = max(figures.get(key, 0.0), value)
        figures["avg_batch"] = average_batch(tmp / "server.log", "deep_batched")
    finally:
        stop(server)
        stop(bare)
    return figures


def average_batch(log: Path, model: str) -> float:
    """Rows per execution of `model`, from the server's Prometheus endpoint."""
    import urllib.request

    port = re.search(r"metrics on http://[\w.]+:(\d+)/metrics", log.read_text()).group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as reply:
        text = reply.read().decode()

    def value(name: str) -> float:
        match = re.search(rf'{name}{{model="{model}",version="1"}} (\S+)', text)
        return float(match.group(1)) if match else 0.0

    return value("nv_inference_count") / max(value("nv_inference_exec_count"), 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--overhead-concurrency", type=int, default=8)
    parser.add_argument("--interval-ms", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2, help="best of N alternating rounds")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        f = run(args, Path(tmp))
    batching, overhead = f["batched"] / f["plain"], f["identity"] / f["bare"]
    print(f"dynamic batching, deep MLP, concurrency {args.concurrency}:")
    print(f"  off {f['plain']:9.1f} infer/s   on {f['batched']:9.1f} infer/s   "
          f"ratio {batching:.2f}x (target >= 3); mean batch {f['avg_batch']:.1f}")
    print(f"server overhead, identity, concurrency {args.overhead_concurrency}:")
    print(f"  shardserve python identity {f['identity']:9.1f} infer/s   bare grpcio "
          f"{f['bare']:9.1f} infer/s   ratio {overhead:.2f} (target >= 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
