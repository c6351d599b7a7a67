"""Prometheus metrics: Triton metric names recorded by a real batched backend, histogram
exposition, scrape-time gauges and the /metrics HTTP endpoint."""

from __future__ import annotations

import re
import urllib.request

import numpy as np
import torch

from serving.backends.python import PythonBackend
from serving.metrics import (
    LLMMetrics,
    MetricsRegistry,
    MetricsServer,
    ServerMetrics,
    cpu_collector,
    gpu_collector,
)
from serving.types import InferResponse
from tests.backend_helpers import CollectSink, make_request, parse_config, write_model

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (-?[0-9.e+-]+|\+Inf|-Inf|NaN)$')

IDENTITY = '''
import time
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        time.sleep(0.05)
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "X").as_numpy()
            if x.sum() < 0:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("negative")))
            else:
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x)]))
        return out
'''


def parse(text: str) -> dict[str, float]:
    """Exposition text -> {"name{labels}": value}, checking every line's syntax."""
    values = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+$", line), line
            continue
        match = SAMPLE.match(line)
        assert match, f"bad sample line: {line!r}"
        values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return values


def test_backend_records_triton_metrics_and_http_serves_them(tmp_path):
    config = """
    name: "ident"
    backend: "python"
    max_batch_size: 8
    input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
    output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] } ]
    dynamic_batching { max_queue_delay_microseconds: 100000 }
    """
    backend = PythonBackend(parse_config(config),
                            write_model(tmp_path, "ident", config, {"model.py": IDENTITY}), 1)
    metrics = ServerMetrics(gpu=False)
    backend.load()
    metrics.track("ident", 1, backend)
    sinks = []
    for value in (1, 1, 1, -1):
        sinks.append(CollectSink())
        request = make_request("ident", X=np.full((1, 2), value, np.float32))
        backend.submit(request, metrics.wrap(sinks[-1], request, "ident", 1, 8, False))
    for sink in sinks:
        sink.wait()
    server = MetricsServer(metrics.registry, port=0).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as reply:
            assert reply.headers["Content-Type"].startswith("text/plain")
            values = parse(reply.read().decode())
    finally:
        server.stop()
    backend.unload()
    labels = '{model="ident",version="1"}'
    assert values["nv_inference_request_success" + labels] == 3
    assert values['nv_inference_request_failure{model="ident",reason="BACKEND",version="1"}'] == 1
    assert values["nv_inference_count" + labels] == 3
    assert values["nv_inference_exec_count" + labels] == 1  # all four ran as one batch
    assert values["nv_inference_pending_request_count" + labels] == 0
    assert values["nv_inference_queue_duration_us" + labels] >= 4 * 50_000 * 0.5
    assert values["nv_inference_compute_infer_duration_us" + labels] >= 4 * 50_000
    assert (values["nv_inference_request_duration_us" + labels]
            >= values["nv_inference_compute_infer_duration_us" + labels])


def test_invalid_requests_count_as_failures(tmp_path):
    config = """
    name: "ident"
    backend: "python"
    input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
    output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] } ]
    """
    backend = PythonBackend(parse_config(config),
                            write_model(tmp_path, "ident", config, {"model.py": IDENTITY}), 1)
    metrics = ServerMetrics(cpu=False, gpu=False)
    backend.load()
    metrics.track("ident", 1, backend)
    sink = CollectSink()
    request = make_request("ident", X=np.ones(3, np.float32))
    backend.submit(request, metrics.wrap(sink, request, "ident", 1, 0, False))
    assert sink.error().status == "INVALID_ARGUMENT"
    backend.unload()
    inference = metrics.inference
    assert inference.failure.get(model="ident", version="1", reason="OTHER") == 1
    assert inference.success.get(model="ident", version="1") == 0
    assert inference.exec_count.get(model="ident", version="1") == 0


class _FakeEngineBackend:
    """Stands in for the LLM backend's scrape-time figures."""

    def stats(self) -> dict:
        return {"running": 3, "waiting": 2, "free_blocks": 30, "total_blocks": 40}


def test_streamed_tokens_give_ttft_itl_and_counts():
    metrics = ServerMetrics(cpu=False, gpu=False)
    metrics.track("llm", 1, _FakeEngineBackend())
    request = make_request("llm", text_input=np.array([b"hi"], object))
    sink = CollectSink()
    wrapped = metrics.wrap(sink, request, "llm", 1, 0, True)
    for chunk in ([5], [6, 7], [8]):
        wrapped.send(InferResponse({"output_ids": np.array(chunk, np.int32)}), False)
    wrapped.send(InferResponse({"output_ids": np.array([], np.int32)},
                               parameters={"completion_tokens": 4, "prompt_tokens": 2}), True)
    assert len(sink.wait()) == 4
    values = parse(metrics.registry.render())
    assert values['nv_llm_time_to_first_token_seconds_count{model="llm"}'] == 1
    assert values['nv_llm_inter_token_latency_seconds_count{model="llm"}'] == 3
    assert values['nv_llm_generation_tokens_total{model="llm"}'] == 4
    assert values['nv_llm_prompt_tokens_total{model="llm"}'] == 2
    assert values['nv_llm_num_requests_running{model="llm"}'] == 3
    assert values['nv_llm_kv_cache_usage_ratio{model="llm"}'] == 0.25
    assert values['nv_inference_request_success{model="llm",version="1"}'] == 1


def test_llm_histograms_and_engine_gauges():
    registry = MetricsRegistry()
    llm = LLMMetrics(registry)
    observations = [0.003, 0.03, 0.3, 3.0, 30.0]
    for value in observations:
        llm.ttft.observe(value, model="llm")
    llm.generated.inc(17, model="llm")
    llm.observe_engine("llm", {"running": 3, "waiting": 2, "free_blocks": 30,
                               "total_blocks": 40})
    values = parse(registry.render())
    bucket = 'nv_llm_time_to_first_token_seconds_bucket{{model="llm",le="{}"}}'
    for bound in ("0.005", "0.04", "0.5", "5", "+Inf"):
        want = sum(v <= float(bound) for v in observations)
        assert values[bucket.format(bound)] == want
    assert values['nv_llm_time_to_first_token_seconds_count{model="llm"}'] == 5
    assert abs(values['nv_llm_time_to_first_token_seconds_sum{model="llm"}']
               - sum(observations)) < 1e-9
    assert values['nv_llm_generation_tokens_total{model="llm"}'] == 17
    assert values['nv_llm_num_requests_running{model="llm"}'] == 3
    assert values['nv_llm_num_requests_waiting{model="llm"}'] == 2
    assert values['nv_llm_kv_cache_usage_ratio{model="llm"}'] == 0.25


def test_cpu_metrics_and_gpu_metrics_only_with_gpus():
    registry = MetricsRegistry()
    registry.add_collector(cpu_collector())
    gpus = gpu_collector()
    if gpus is not None:
        registry.add_collector(gpus)
    values = parse(registry.render())
    assert values["nv_cpu_memory_total_bytes"] > values["nv_cpu_memory_used_bytes"] > 0
    assert 0.0 <= values["nv_cpu_utilization"] <= 1.0
    has_gpu_metrics = any(k.startswith("nv_gpu_memory_total_bytes") for k in values)
    assert has_gpu_metrics == (gpus is not None)
    if not torch.cuda.is_available():
        assert gpus is None


def test_label_values_are_escaped():
    registry = MetricsRegistry()
    registry.counter("nv_inference_count", "n").inc(model='we"ird\\name', version="1")
    text = registry.render()
    assert 'model="we\\"ird\\\\name"' in text
    parse(text)
