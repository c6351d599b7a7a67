"""The python, pytorch and onnxruntime backends, dynamic batching, priorities and queue limits
through a real server and `tritonclient.grpc`, plus the Prometheus endpoint."""

from __future__ import annotations

import re
import time
import urllib.request
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.backend_helpers import write_model
from tests.test_backends_batching import HANG_S, WINDOW_MODEL, WINDOW_OUTPUTS
from tests.test_backends_python import ADD_SUB_CONFIG, TRITON_ADD_SUB
from tests.torch_models import Classifier, save_exported, save_onnx, save_torchscript

# These tests drive the serving front (branch `serving`); they skip until it is merged.
serving_helpers = pytest.importorskip("tests.serving_helpers",
                                      reason="needs the serving front (serving branch)")
Server, infer_input = serving_helpers.Server, serving_helpers.infer_input

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CLF = """
name: "{name}"
{kind}
max_batch_size: 16
input [ {{ name: "{inp}" data_type: TYPE_FP32 dims: [ 8 ] }} ]
output [ {{ name: "{o0}" data_type: TYPE_FP32 dims: [ 4 ] }},
         {{ name: "{o1}" data_type: TYPE_FP32 dims: [ 4 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
"""

WINDOW = """
name: "{name}"
backend: "python"
max_batch_size: {mbs}
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ 1 ] }} ]
{outputs}
parameters {{ key: "gate_dir" value {{ string_value: "{gate_dir}" }} }}
dynamic_batching {{ {batching} }}
"""

CLASSIFIERS = {
    "clf_pt": ('platform: "pytorch_libtorch"', "INPUT__0", "OUTPUT__0", "OUTPUT__1"),
    "clf_pt2": ('backend: "pytorch"', "features", "logits", "probs"),
    "clf_onnx": ('platform: "onnxruntime_onnx"', "features", "logits", "probs"),
}


def _build_repo(repo: Path, gates: Path) -> None:
    write_model(repo, "add_sub", ADD_SUB_CONFIG.format(name="add_sub", mbs=0),
                {"model.py": TRITON_ADD_SUB})
    model, example = Classifier(), (torch.randn(2, 8),)
    for name, (kind, inp, o0, o1) in CLASSIFIERS.items():
        write_model(repo, name, CLF.format(name=name, kind=kind, inp=inp, o0=o0, o1=o1), {})
    save_torchscript(model, repo / "clf_pt" / "1" / "model.pt")
    save_exported(model, example, repo / "clf_pt2" / "1" / "model.pt2")
    save_onnx(model, example, repo / "clf_onnx" / "1" / "model.onnx", ["features"],
              ["logits", "probs"])
    windows = {  # a queue delay no test waits out: batches go by size
        "batched": (8, f"preferred_batch_size: [ 4 ] max_queue_delay_microseconds: {60_000_000}"),
        "prio": (1, "priority_levels: 2 default_priority_level: 2"),
        "limited": (1, "default_queue_policy { max_queue_size: 1 }"),
    }
    for name, (mbs, batching) in windows.items():
        write_model(repo, name, WINDOW.format(name=name, mbs=mbs, outputs=WINDOW_OUTPUTS,
                                              gate_dir=gates, batching=batching),
                    {"model.py": WINDOW_MODEL})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("backends-e2e")
    (tmp / "gates").mkdir()
    _build_repo(tmp / "repo", tmp / "gates")
    srv = Server(tmp / "repo", tmp / "server.log", "--metrics-port", "0", module="launcher.cli")
    srv.gates = tmp / "gates"
    yield srv
    assert srv.stop() == 0, srv.text()


def test_python_model_unchanged_from_triton(client) -> None:
    a, b = np.random.rand(4).astype(np.float32), np.random.rand(4).astype(np.float32)
    result = client.infer("add_sub", [infer_input("INPUT0", a, "FP32"),
                                      infer_input("INPUT1", b, "FP32")])
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b)


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_tensor_backends_match_eager(client, name: str) -> None:
    _, inp, o0, o1 = CLASSIFIERS[name]
    assert client.is_model_ready(name)
    x = np.random.randn(3, 8).astype(np.float32)
    result = client.infer(name, [infer_input(inp, x, "FP32")])
    with torch.no_grad():
        logits, probs = Classifier()(torch.from_numpy(x))
    np.testing.assert_allclose(result.as_numpy(o0), logits.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy(o1), probs.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(InferenceServerException, match="FP32"):
        client.infer(name, [infer_input(inp, x.astype(np.float64), "FP64")])


def _window(url: str, model: str, priority: int = 0, hold: int = 0) -> tuple[int, int]:
    """(execution number, batch size) of one request; hold > 0 keeps its execution until
    gate `hold` opens."""
    c = grpcclient.InferenceServerClient(url)
    try:
        x = np.full((1, 1), hold, np.float32)
        result = c.infer(model, [infer_input("X", x, "FP32")], priority=priority,
                         client_timeout=HANG_S)
        return int(result.as_numpy("EXEC").ravel()[0]), int(result.as_numpy("BATCH").ravel()[0])
    finally:
        c.close()


def _wait_for(what: str, check) -> None:
    deadline = time.monotonic() + HANG_S
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def _metric(server: Server, name: str, model: str) -> float:
    match = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', _metrics(server), re.M)
    return float(match.group(1)) if match else 0.0


def _wait_pending(server: Server, model: str, count: int) -> None:
    """Wait until the model's queue holds `count` requests (read from /metrics)."""
    _wait_for(f"{count} requests queued for {model}",
              lambda: _metric(server, "nv_inference_pending_request_count", model) == count)


def _hold(server: Server, pool: ThreadPoolExecutor, model: str, gate: int) -> Future:
    """A request that occupies the model's only instance until gate `gate` opens."""
    blocker = pool.submit(_window, server.url, model, 0, gate)
    _wait_for(f"{model} executing the held request",
              lambda: (server.gates / f"started-{gate}").exists())
    return blocker


def test_dynamic_batching_forms_preferred_batches(server) -> None:
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: _window(server.url, "batched"), range(8)))
    runs = Counter(got)  # (execution, batch size) -> requests in it
    assert sorted(runs.values()) == [4, 4] and {b for _, b in runs} == {4}, got
    assert _metric(server, "nv_inference_exec_count", "batched") == 2
    assert _metric(server, "nv_inference_count", "batched") == 8


def test_priorities_order_the_queue(server) -> None:
    with ThreadPoolExecutor(5) as pool:
        blocker = _hold(server, pool, "prio", 1)
        low = [pool.submit(_window, server.url, "prio", 2) for _ in range(2)]
        _wait_pending(server, "prio", 2)
        high = [pool.submit(_window, server.url, "prio", 1) for _ in range(2)]
        _wait_pending(server, "prio", 4)
        (server.gates / "open-1").touch()
        order = {f: f.result(HANG_S)[0] for f in [blocker, *low, *high]}
    assert order[blocker] < min(order[f] for f in high)
    assert max(order[f] for f in high) < min(order[f] for f in low)


def _metrics(server: Server) -> str:
    port = re.search(r"metrics on http://[\w.]+:(\d+)/metrics", server.text()).group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as reply:
        return reply.read().decode()


def test_queue_limit_rejects_with_resource_exhausted(server) -> None:
    with ThreadPoolExecutor(2) as pool:
        blocker = _hold(server, pool, "limited", 2)
        queued = pool.submit(_window, server.url, "limited")
        _wait_pending(server, "limited", 1)
        for _ in range(2):  # the queue is full: refused while the held request still runs
            with pytest.raises(InferenceServerException) as info:
                _window(server.url, "limited")
            assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert info.value.message() == (
                "Exceeds maximum queue size: model 'limited' priority level 1 already holds 1 "
                "requests (max_queue_size)")
        assert not blocker.done() and not queued.done()
        (server.gates / "open-2").touch()
        assert [blocker.result(HANG_S), queued.result(HANG_S)] == [(1, 1), (2, 1)]


def test_metrics_follow_triton_names(server, client) -> None:
    x = np.zeros((2, 8), np.float32)
    before = {n: _metric(server, n, "clf_onnx") for n in (
        "nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count")}
    for _ in range(3):  # one after another: three executions of batch 2
        client.infer("clf_onnx", [infer_input("features", x, "FP32")])
    text = _metrics(server)
    after = {n: _metric(server, n, "clf_onnx") for n in before}
    assert {n: after[n] - before[n] for n in before} == {
        "nv_inference_request_success": 3, "nv_inference_count": 6,
        "nv_inference_exec_count": 3}
    assert "nv_inference_compute_infer_duration_us" in text
    assert "nv_cpu_memory_total_bytes" in text
    stats = client.get_inference_statistics("clf_onnx").model_stats[0]
    assert stats.inference_stats.success.count == after["nv_inference_request_success"]
