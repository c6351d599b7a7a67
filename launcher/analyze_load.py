"""The analyzer's measuring side: a `shardserve serve` subprocess on a model repository, the
peak memory of its ranks (psutil over the process tree), and a tritonclient load generator
(threads at a fixed concurrency for a duration; streaming for giant models)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
READY_RE = re.compile(r"shardserve ready: gRPC on ([\w.:\-\[\]]+):(\d+)")


class ServerError(RuntimeError):
    """The server did not start (its log tail is in the message)."""


def _rank_processes(root: Any) -> list[Any]:
    """The server process and the rank processes it spawned (helpers such as multiprocessing's
    resource tracker are not ranks)."""
    import psutil

    procs = [root]
    try:
        children = root.children(recursive=True)
    except psutil.Error:
        return procs
    for p in children:
        try:
            if "resource_tracker" not in " ".join(p.cmdline()):
                procs.append(p)
        except psutil.Error:
            continue
    return procs


def _hwm_mb(pid: int) -> float:
    """Peak resident set of a process (VmHWM), MB; 0 when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class MemorySampler:
    """Samples the RSS of every rank process of a server every `period_s`; keeps per-pid peaks
    (VmHWM read at the end as well, so a short spike between samples still counts)."""

    def __init__(self, pid: int, period_s: float = 0.1) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.period_s = period_s
        self.peak_mb: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mem-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        for p in _rank_processes(self.root):
            try:
                mb = p.memory_info().rss / 2**20
            except psutil.Error:
                continue
            self.peak_mb[p.pid] = max(self.peak_mb.get(p.pid, 0.0), mb)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def finish(self) -> list[float]:
        """Stop sampling; peak MB per process of the server tree, the server process first."""
        self._stop.set()
        self._thread.join()
        self._sample()
        for pid in list(self.peak_mb):
            self.peak_mb[pid] = max(self.peak_mb[pid], _hwm_mb(pid))
        root = self.peak_mb.get(self.root.pid, 0.0)
        return [root] + [mb for pid, mb in self.peak_mb.items() if pid != self.root.pid]


# What torchrun / MPI / Slurm export for a rank: the server the analyzer starts runs alone on
# this node and spawns its own ranks, so it must not believe it is part of a launched world.
_LAUNCH_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "SLURM_PROCID",
                "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NPROCS"}
_LAUNCH_PREFIXES = ("OMPI_COMM_WORLD_", "PMI_", "PMIX_", "MPI_LOCAL", "SLURM_STEP_")


def local_env() -> dict[str, str]:
    """This process's environment without any outer launcher's rank variables."""
    return {k: v for k, v in os.environ.items()
            if k not in _LAUNCH_VARS and not k.startswith(_LAUNCH_PREFIXES)}


class ServerProcess:
    """`python -m launcher.cli serve --model-repository REPO --grpc-port 0` with its log in a
    file; `url` once ready; `stop()` returns the peak memory per rank process (MB)."""

    def __init__(self, repo: Path, log: Path, timeout_s: float = 300.0,
                 extra: list[str] | None = None) -> None:
        env = {**local_env(), "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        cmd = [sys.executable, "-m", "launcher.cli", "serve", "--model-repository", str(repo),
               "--grpc-port", "0", "--http-port", "0", "--no-metrics", *(extra or [])]
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.memory = MemorySampler(self.proc.pid)
        self.started_at = time.perf_counter()
        try:
            self.url = self._wait_ready(timeout_s)
        except ServerError:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - self.started_at

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = READY_RE.search(self.log.read_text(errors="replace"))
            if m:
                return f"{m.group(1)}:{m.group(2)}"
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with status {self.proc.returncode}:\n"
                                  f"{self.tail()}")
            time.sleep(0.1)
        raise ServerError(f"server not ready after {timeout_s:.0f}s:\n{self.tail()}")

    def stop(self, timeout_s: float = 30.0) -> list[float]:
        """SIGTERM (then SIGKILL to the whole process group); peak MB per rank process."""
        mem = self.memory.finish()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_file.close()
        return mem


# --- load generation -------------------------------------------------------------------------
@dataclass
class LoadResult:
    """What one measurement window saw."""

    window_s: float
    latencies_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    output_tokens: int = 0
    errors: int = 0
    first_error: str | None = None

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    def figures(self) -> dict[str, Any]:
        def pct(v: list[float], q: float) -> float | None:
            return float(np.percentile(v, q)) if v else None

        return {"requests": self.requests, "window_s": self.window_s, "errors": self.errors,
                "first_error": self.first_error,
                "infer_per_s": self.requests / self.window_s if self.window_s > 0 else None,
                "output_tokens": self.output_tokens,
                "tokens_per_s": self.output_tokens / self.window_s if self.window_s > 0 else None,
                "latency_p50_ms": pct(self.latencies_ms, 50),
                "latency_p99_ms": pct(self.latencies_ms, 99),
                "ttft_p50_ms": pct(self.ttft_ms, 50), "ttft_p99_ms": pct(self.ttft_ms, 99)}


class _Window:
    """The measuring window shared by the load threads: requests that complete inside it
    count; warm-up requests before it and stragglers after it do not."""

    def __init__(self, warmup_s: float, duration_s: float) -> None:
        self.start = time.monotonic() + warmup_s
        self.end = self.start + duration_s
        self.result = LoadResult(window_s=duration_s)
        self.lock = threading.Lock()

    def record(self, t0: float, t1: float, ttft: float | None = None, tokens: int = 0) -> None:
        if not self.start <= t1 <= self.end:
            return
        with self.lock:
            self.result.latencies_ms.append((t1 - t0) * 1000)
            if ttft is not None:
                self.result.ttft_ms.append((ttft - t0) * 1000)
            self.result.output_tokens += tokens

    def error(self, message: str) -> None:
        with self.lock:
            self.result.errors += 1
            self.result.first_error = self.result.first_error or message[:300]


def _drive(concurrency: int, window: _Window, worker: Callable[[_Window], None]) -> LoadResult:
    threads = [threading.Thread(target=worker, args=(window,), daemon=True)
               for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, window.end - time.monotonic()) + 120)
    return window.result


def _ordinary_worker(url: str, model: str, inputs: Callable[[], list[Any]]
                     ) -> Callable[[_Window], None]:
    def run(window: _Window) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url)
        request = inputs()
        try:
            while time.monotonic() < window.end:
                t0 = time.monotonic()
                try:
                    client.infer(model, request, client_timeout=60)
                except Exception as e:  # noqa: BLE001 (counted and reported, not raised)
                    window.error(str(e))
                    time.sleep(0.01)
                    continue
                window.record(t0, time.monotonic())
        finally:
            client.close()
    return run


def run_ordinary_load(url: str, model: str, inputs: Callable[[], list[Any]], concurrency: int,
                      duration_s: float, warmup_s: float = 1.0) -> LoadResult:
    """`concurrency` threads, each with its own client, sending `infer` back to back."""
    return _drive(concurrency, _Window(warmup_s, duration_s), _ordinary_worker(url, model, inputs))


class _StreamState:
    """One thread's stream: responses of the one request in flight land here."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.first: float | None = None
        self.tokens = 0
        self.error: str | None = None

    def reset(self) -> None:
        self.done.clear()
        self.first, self.tokens, self.error = None, 0, None

    def callback(self, result: Any, error: Any) -> None:
        if error is not None:
            self.error = str(error)
            self.done.set()
            return
        resp = result.get_response()
        params = resp.parameters
        ids = result.as_numpy("output_ids")
        if self.first is None and ids is not None and ids.size:
            self.first = time.monotonic()
        if "completion_tokens" in params:
            self.tokens = int(params["completion_tokens"].int64_param)
        if "triton_final_response" in params and params["triton_final_response"].bool_param:
            self.done.set()


def _llm_worker(url: str, model: str, inputs: Callable[[], list[Any]]
                ) -> Callable[[_Window], None]:
    def run(window: _Window) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url)
        state = _StreamState()
        client.start_stream(callback=state.callback)
        try:
            while time.monotonic() < window.end:
                state.reset()
                t0 = time.monotonic()
                client.async_stream_infer(model, inputs(), enable_empty_final_response=True)
                if not state.done.wait(300):
                    window.error("no final response within 300 s")
                    break
                if state.error is not None:
                    window.error(state.error)
                    time.sleep(0.01)
                    continue
                window.record(t0, time.monotonic(), state.first, state.tokens)
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()
    return run


def run_llm_load(url: str, model: str, inputs: Callable[[], list[Any]], concurrency: int,
                 duration_s: float, warmup_s: float = 1.0) -> LoadResult:
    """`concurrency` threads, each with its own stream, one generation request at a time."""
    return _drive(concurrency, _Window(warmup_s, duration_s), _llm_worker(url, model, inputs))


# --- request inputs --------------------------------------------------------------------------
def _datatype(t: int) -> str:
    from tritonclient.grpc import model_config_pb2 as mc

    name = mc.DataType.Name(t)[len("TYPE_"):]
    return "BYTES" if name == "STRING" else name


def _random_array(datatype: str, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    from tritonclient.utils import triton_to_np_dtype

    if datatype == "BYTES":
        return np.full(shape, b"shardserve", dtype=object)
    dtype = np.dtype(triton_to_np_dtype(datatype))
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        return rng.integers(0, 8, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def ordinary_inputs(config: Any, shapes: dict[str, list[int]] | None = None,
                    seed: int = 0) -> Callable[[], list[Any]]:
    """Inputs for one request of batch 1 to an ordinary model, from its config: every
    non-optional input, -1 dims as 1 unless `shapes` names the input's dims."""
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(seed)
    arrays = []
    for t in config.input:
        if t.optional and t.name not in (shapes or {}):
            continue
        dims = list((shapes or {}).get(t.name) or [d if d > 0 else 1 for d in t.dims])
        if config.max_batch_size > 0:
            dims = [1, *dims]
        datatype = _datatype(t.data_type)
        arrays.append((t.name, datatype, _random_array(datatype, dims, rng)))

    def make() -> list[Any]:
        out = []
        for name, datatype, array in arrays:
            x = grpcclient.InferInput(name, list(array.shape), datatype)
            x.set_data_from_numpy(array)
            out.append(x)
        return out
    return make


def llm_inputs(prompt_len: int, max_tokens: int, vocab_size: int, seed: int = 0
               ) -> Callable[[], list[Any]]:
    """Streaming generation requests in the LLM convention: random token ids (so models
    without a tokenizer work too), exactly `max_tokens` new tokens each (`ignore_eos`)."""
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(seed)
    low = min(3, vocab_size - 1)

    def make() -> list[Any]:
        values = {"input_ids": rng.integers(low, vocab_size, prompt_len).astype(np.int32),
                  "max_tokens": np.array([max_tokens], np.int32),
                  "ignore_eos": np.array([True]), "stream": np.array([True])}
        out = []
        for name, array in values.items():
            x = grpcclient.InferInput(name, list(array.shape),
                                      "INT32" if array.dtype == np.int32 else "BOOL")
            x.set_data_from_numpy(array)
            out.append(x)
        return out
    return make
