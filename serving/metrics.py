"""Prometheus metrics with Triton's metric names, served as text on port 8002.

`MetricsRegistry` holds metric families (counters, gauges, histograms) and scrape-time
collectors; `InferenceMetrics` records per-model inference figures under Triton's names;
`LLMMetrics` adds generation metrics; `MetricsServer` exposes `/metrics` over stdlib http.server.
Every object is created and owned by the server that uses it (no module-level registry).
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from serving.types import InferRequest, InferResponse, ResponseSink, ServingError

Labels = tuple[tuple[str, str], ...]
Sample = tuple[str, Labels, float]


def _labels(**labels: Any) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _fmt_labels(labels: Labels) -> str:
    if not labels:
        return ""
    body = ",".join('{}="{}"'.format(k, v.replace("\\", r"\\").replace('"', r"\"")
                                      .replace("\n", r"\n")) for k, v in labels)
    return "{" + body + "}"


def _fmt_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


@dataclass
class Family:
    """One metric family: a name, a type and its samples keyed by labels."""

    name: str
    help: str
    kind: str
    buckets: tuple[float, ...] = ()
    values: dict[Labels, float] = field(default_factory=dict)
    hist: dict[Labels, list[float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        self.inc_key(_labels(**labels), amount)

    def inc_key(self, key: Labels, amount: float = 1.0) -> None:
        """`inc` with labels already built (hot paths build them once)."""
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def set(self, value: float, **labels: Any) -> None:
        with self.lock:
            self.values[_labels(**labels)] = float(value)

    def observe(self, value: float, **labels: Any) -> None:
        """Histogram observation: per-bucket counts, then sum and count at the end."""
        key = _labels(**labels)
        with self.lock:
            row = self.hist.setdefault(key, [0.0] * (len(self.buckets) + 2))
            row[bisect.bisect_left(self.buckets, value)] += 1
            row[-1] += value

    def get(self, **labels: Any) -> float:
        return self.values.get(_labels(**labels), 0.0)

    def samples(self) -> list[Sample]:
        with self.lock:
            if self.kind != "histogram":
                return [(self.name, k, v) for k, v in self.values.items()]
            out: list[Sample] = []
            for key, row in self.hist.items():
                cumulative = 0.0
                for bound, count in zip((*self.buckets, math.inf), row[:-1], strict=True):
                    cumulative += count
                    out.append((self.name + "_bucket", key + (("le", _fmt_value(bound)),),
                                cumulative))
                out.append((self.name + "_sum", key, row[-1]))
                out.append((self.name + "_count", key, cumulative))
            return out


Collector = Callable[[], Iterable[tuple[str, str, str, Labels, float]]]


class MetricsRegistry:
    """Metric families plus collectors evaluated at scrape time (name, help, kind, labels, v)."""

    def __init__(self) -> None:
        self._families: dict[str, Family] = {}
        self._collectors: list[Collector] = []
        self._lock = threading.Lock()

    def family(self, name: str, help: str, kind: str,
               buckets: Sequence[float] = ()) -> Family:
        with self._lock:
            fam = self._families.get(name)
            if fam is None:
                fam = self._families[name] = Family(name, help, kind, tuple(sorted(buckets)))
            return fam

    def counter(self, name: str, help: str) -> Family:
        return self.family(name, help, "counter")

    def gauge(self, name: str, help: str) -> Family:
        return self.family(name, help, "gauge")

    def histogram(self, name: str, help: str, buckets: Sequence[float]) -> Family:
        return self.family(name, help, "histogram", buckets)

    def add_collector(self, collector: Collector) -> None:
        with self._lock:
            self._collectors.append(collector)

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            collectors = list(self._collectors)
        # collectors first: some refresh gauges held in families
        collected = [row for collector in collectors for row in collector()]
        with self._lock:
            families = list(self._families.values())
        blocks: dict[str, tuple[str, str, list[Sample]]] = {
            f.name: (f.help, f.kind, f.samples()) for f in families}
        for name, help, kind, labels, value in collected:
            blocks.setdefault(name, (help, kind, []))[2].append((name, labels, value))
        lines: list[str] = []
        for name, (help, kind, samples) in blocks.items():
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{n}{_fmt_labels(lb)} {_fmt_value(v)}" for n, lb, v in samples)
        return "\n".join(lines) + "\n"


class ExecutionRecorder(Protocol):
    """What schedulers report per model execution (a batch of `batch_size` rows)."""

    def record_execution(self, model: str, version: int, batch_size: int) -> None: ...


def failure_reason(error: ServingError) -> str:
    """Triton's `reason` label for a failed request."""
    if error.status in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):
        return "REJECTED"
    if error.status == "CANCELLED":
        return "CANCELED"
    if error.status in ("INVALID_ARGUMENT", "NOT_FOUND", "UNIMPLEMENTED"):
        return "OTHER"
    return "BACKEND"


class InferenceMetrics:
    """Triton's per-model inference metrics (counters in microseconds, like Triton's)."""

    def __init__(self, registry: MetricsRegistry) -> None:
        r = registry
        self.success = r.counter("nv_inference_request_success",
                                 "Number of successful inference requests, all batch sizes")
        self.failure = r.counter("nv_inference_request_failure",
                                 "Number of failed inference requests, all batch sizes")
        self.count = r.counter("nv_inference_count",
                               "Number of inferences performed (a batch of n counts n)")
        self.exec_count = r.counter("nv_inference_exec_count",
                                    "Number of model executions performed")
        self.request_us = r.counter("nv_inference_request_duration_us",
                                    "Cumulative inference request duration in microseconds")
        self.queue_us = r.counter("nv_inference_queue_duration_us",
                                  "Cumulative inference queuing duration in microseconds")
        self.compute_us = r.counter("nv_inference_compute_infer_duration_us",
                                    "Cumulative compute inference duration in microseconds")
        self._keys: dict[tuple[str, int], Labels] = {}
        self._pending: dict[Labels, Callable[[], int]] = {}
        self._lock = threading.Lock()
        r.add_collector(self._collect_pending)

    def record_request(self, model: str, version: int, ok: bool, request_ns: int,
                       queue_ns: int, compute_ns: int, batch_size: int = 1,
                       reason: str = "") -> None:
        key = self._key(model, version)
        if ok:
            self.success.inc_key(key)
            self.count.inc_key(key, batch_size)
        else:
            self.failure.inc(reason=reason or "BACKEND", model=model, version=str(version))
        self.request_us.inc_key(key, request_ns // 1000)
        self.queue_us.inc_key(key, queue_ns // 1000)
        self.compute_us.inc_key(key, compute_ns // 1000)

    def _key(self, model: str, version: int) -> Labels:
        key = self._keys.get((model, version))
        if key is None:
            key = self._keys[(model, version)] = _labels(model=model, version=str(version))
        return key

    def record_execution(self, model: str, version: int, batch_size: int) -> None:
        self.exec_count.inc_key(self._key(model, version))

    def track_pending(self, model: str, version: int, count: Callable[[], int] | None) -> None:
        """Report a scheduler's queue length at each scrape (None stops reporting it)."""
        key = _labels(model=model, version=str(version))
        with self._lock:
            if count is None:
                self._pending.pop(key, None)
            else:
                self._pending[key] = count

    def _collect_pending(self) -> Iterable[tuple[str, str, str, Labels, float]]:
        with self._lock:
            sources = list(self._pending.items())
        for key, count in sources:
            yield ("nv_inference_pending_request_count",
                   "Instantaneous number of pending requests awaiting execution", "gauge",
                   key, float(count()))


_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0)


class LLMMetrics:
    """Generation metrics: TTFT and inter-token latency histograms, token counters, and the
    engine's running/waiting requests and KV-cache usage sampled at scrape time."""

    def __init__(self, registry: MetricsRegistry) -> None:
        r = registry
        self.ttft = r.histogram("nv_llm_time_to_first_token_seconds",
                                "Time to first token in seconds", _LATENCY_BUCKETS)
        self.itl = r.histogram("nv_llm_inter_token_latency_seconds",
                               "Latency between consecutive generated tokens in seconds",
                               _LATENCY_BUCKETS)
        self.generated = r.counter("nv_llm_generation_tokens_total", "Generated tokens")
        self.prompt = r.counter("nv_llm_prompt_tokens_total", "Prompt tokens processed")
        self.running = r.gauge("nv_llm_num_requests_running", "Requests in the running batch")
        self.waiting = r.gauge("nv_llm_num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = r.gauge("nv_llm_kv_cache_usage_ratio",
                                "Fraction of KV-cache blocks in use (0..1)")

    def observe_engine(self, model: str, stats: dict[str, Any]) -> None:
        """Update the gauges from `LLMEngine.stats()` (running, waiting, free/total blocks)."""
        self.running.set(stats.get("running", 0), model=model)
        self.waiting.set(stats.get("waiting", 0), model=model)
        total = stats.get("total_blocks", 0)
        if total:
            self.kv_usage.set(1.0 - stats.get("free_blocks", 0) / total, model=model)


class MetricsSink:
    """Wraps a request's sink: records the outcome at the final response and, for generative
    models, TTFT, inter-token latency and token counts from the streamed responses."""

    def __init__(self, inner: ResponseSink, request: InferRequest, model: str, version: int,
                 batch_size: int, inference: InferenceMetrics,
                 llm: LLMMetrics | None = None) -> None:
        self._inner, self._request = inner, request
        self._model, self._version, self._batch = model, version, batch_size
        self._inference, self._llm = inference, llm
        self._arrival = getattr(request, "arrival_ns", 0) or time.monotonic_ns()
        self._last_token_ns = 0
        self._error: ServingError | None = None

    def send(self, response: InferResponse | None, final: bool) -> None:
        now = time.monotonic_ns()
        if response is not None and response.error is not None:
            self._error = self._error or response.error
        elif response is not None and self._llm is not None:
            self._observe_tokens(response, now, final)
        self._inner.send(response, final)
        if final:
            start = getattr(self._request, "compute_start_ns", 0) or self._arrival
            ok = self._error is None
            self._inference.record_request(
                self._model, self._version, ok, now - self._arrival,
                max(start - self._arrival, 0), now - start, self._batch,
                "" if ok else failure_reason(self._error))

    def _observe_tokens(self, response: InferResponse, now: int, final: bool) -> None:
        llm, labels = self._llm, {"model": self._model}
        assert llm is not None
        ids = response.outputs.get("output_ids")
        count = int(ids.size) if ids is not None else 0
        if count and (not final or self._last_token_ns):  # streamed chunks only
            if not self._last_token_ns:
                llm.ttft.observe((now - self._arrival) / 1e9, **labels)
            else:
                gap = (now - self._last_token_ns) / 1e9 / count
                for _ in range(count):
                    llm.itl.observe(gap, **labels)
            self._last_token_ns = now
        if "completion_tokens" in response.parameters:
            llm.generated.inc(int(response.parameters["completion_tokens"]), **labels)
            llm.prompt.inc(int(response.parameters.get("prompt_tokens", 0)), **labels)


class ServerMetrics:
    """Everything one server exports: inference and LLM metrics, CPU and (if any) GPU gauges,
    and scrape-time figures from the loaded backends."""

    def __init__(self, cpu: bool = True, gpu: bool = True) -> None:
        self.registry = MetricsRegistry()
        self.inference = InferenceMetrics(self.registry)
        self.llm = LLMMetrics(self.registry)
        self._backends: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()
        if cpu:
            self.registry.add_collector(cpu_collector())
        gpus = gpu_collector() if gpu else None
        if gpus is not None:
            self.registry.add_collector(gpus)
        self.registry.add_collector(self._collect_backends)

    def wrap(self, sink: ResponseSink, request: InferRequest, model: str, version: int,
             max_batch_size: int, generative: bool) -> ResponseSink:
        """The sink to hand the backend so this request is counted."""
        batch = 1
        if max_batch_size > 0 and request.inputs:
            first = next(iter(request.inputs.values()))
            batch = int(first.shape[0]) if first.ndim else 1
        return MetricsSink(sink, request, model, version, batch, self.inference,
                           self.llm if generative else None)

    def track(self, model: str, version: int, backend: Any | None) -> None:
        """Follow a loaded backend (None forgets it): executions, queue length, engine stats."""
        with self._lock:
            if backend is None:
                self._backends.pop((model, version), None)
                self.inference.track_pending(model, version, None)
                return
            self._backends[(model, version)] = backend
        if hasattr(backend, "recorder"):
            backend.recorder = self.inference
        if hasattr(backend, "pending_count"):
            self.inference.track_pending(model, version, backend.pending_count)

    def _collect_backends(self) -> Iterable[tuple[str, str, str, Labels, float]]:
        with self._lock:
            backends = list(self._backends.items())
        for (model, _), backend in backends:
            stats = backend.stats() if hasattr(backend, "stats") else {}
            if "total_blocks" in stats or "running" in stats:
                self.llm.observe_engine(model, stats)
        return ()


def cpu_collector() -> Collector:
    """Triton's CPU metrics through psutil."""
    import psutil

    def collect() -> Iterable[tuple[str, str, str, Labels, float]]:
        mem = psutil.virtual_memory()
        yield ("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]", "gauge", (),
               psutil.cpu_percent(interval=None) / 100.0)
        yield ("nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes", "gauge", (),
               float(mem.total))
        yield ("nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes", "gauge", (),
               float(mem.total - mem.available))

    return collect


def gpu_collector() -> Collector | None:
    """Triton's GPU metrics through pynvml, or None when pynvml or GPUs are missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception:  # no driver, no library or no device: no GPU metrics
        return None
    if count == 0:
        return None
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]

    def collect() -> Iterable[tuple[str, str, str, Labels, float]]:
        for handle in handles:
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            labels = _labels(gpu_uuid=uuid.decode() if isinstance(uuid, bytes) else uuid)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            yield ("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", "gauge", labels,
                   util.gpu / 100.0)
            yield ("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", "gauge", labels,
                   float(mem.total))
            yield ("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", "gauge", labels,
                   float(mem.used))
            yield ("nv_gpu_power_usage", "GPU power usage in watts", "gauge", labels,
                   pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)

    return collect


class MetricsServer:
    """Serves `registry.render()` at /metrics on a background thread (stdlib http.server)."""

    def __init__(self, registry: MetricsRegistry, host: str = "127.0.0.1",
                 port: int = 8002) -> None:
        registry_ref = registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = registry_ref.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
