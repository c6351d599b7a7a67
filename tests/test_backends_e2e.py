"""The python, pytorch and onnxruntime backends, dynamic batching, priorities and queue limits
through a real server and `tritonclient.grpc`, plus the Prometheus endpoint."""

from __future__ import annotations

import re
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.backend_helpers import write_model
from tests.test_backends_batching import WINDOW_MODEL
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
output [ {{ name: "BATCH" data_type: TYPE_INT32 dims: [ 1 ] }},
         {{ name: "WINDOW" data_type: TYPE_FP64 dims: [ 2 ] }} ]
parameters {{ key: "exec_ms" value {{ string_value: "{exec_ms}" }} }}
dynamic_batching {{ {batching} }}
"""

CLASSIFIERS = {
    "clf_pt": ('platform: "pytorch_libtorch"', "INPUT__0", "OUTPUT__0", "OUTPUT__1"),
    "clf_pt2": ('backend: "pytorch"', "features", "logits", "probs"),
    "clf_onnx": ('platform: "onnxruntime_onnx"', "features", "logits", "probs"),
}


def _build_repo(repo: Path) -> None:
    write_model(repo, "add_sub", ADD_SUB_CONFIG.format(name="add_sub", mbs=0),
                {"model.py": TRITON_ADD_SUB})
    model, example = Classifier(), (torch.randn(2, 8),)
    for name, (kind, inp, o0, o1) in CLASSIFIERS.items():
        write_model(repo, name, CLF.format(name=name, kind=kind, inp=inp, o0=o0, o1=o1), {})
    save_torchscript(model, repo / "clf_pt" / "1" / "model.pt")
    save_exported(model, example, repo / "clf_pt2" / "1" / "model.pt2")
    save_onnx(model, example, repo / "clf_onnx" / "1" / "model.onnx", ["features"],
              ["logits", "probs"])
    windows = {
        "batched": (8, 10, "preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 500000"),
        "prio": (1, 400, "priority_levels: 2 default_priority_level: 2"),
        "limited": (1, 400, "default_queue_policy { max_queue_size: 1 }"),
    }
    for name, (mbs, exec_ms, batching) in windows.items():
        write_model(repo, name, WINDOW.format(name=name, mbs=mbs, exec_ms=exec_ms,
                                              batching=batching), {"model.py": WINDOW_MODEL})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("backends-e2e")
    _build_repo(tmp / "repo")
    srv = Server(tmp / "repo", tmp / "server.log", "--metrics-port", "0", module="launcher.cli")
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


def _window(url: str, model: str, priority: int = 0) -> tuple[int, float]:
    c = grpcclient.InferenceServerClient(url)
    try:
        shape = (1, 1)
        result = c.infer(model, [infer_input("X", np.zeros(shape, np.float32), "FP32")],
                         priority=priority)
        return int(result.as_numpy("BATCH").ravel()[0]), float(result.as_numpy("WINDOW")[0, 0])
    finally:
        c.close()


def test_dynamic_batching_forms_preferred_batches(server) -> None:
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: _window(server.url, "batched"), range(8)))
    assert sorted(b for b, _ in got) == [4] * 8
    assert len({start for _, start in got}) == 2


def test_priorities_order_the_queue(server) -> None:
    with ThreadPoolExecutor(5) as pool:
        blocker = pool.submit(_window, server.url, "prio")
        _wait_pending(server, "prio", 0)
        low = [pool.submit(_window, server.url, "prio", 2) for _ in range(2)]
        _wait_pending(server, "prio", 2)
        high = [pool.submit(_window, server.url, "prio", 1) for _ in range(2)]
        starts = {f: f.result()[1] for f in [blocker, *low, *high]}
    assert max(starts[f] for f in high) < min(starts[f] for f in low)


def _metrics(server: Server) -> str:
    port = re.search(r"metrics on http://[\w.]+:(\d+)/metrics", server.text()).group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as reply:
        return reply.read().decode()


def _wait_pending(server: Server, model: str, count: int, timeout_s: float = 10.0) -> None:
    """Wait until the model's queue holds `count` requests (read from /metrics)."""
    import time

    pattern = re.compile(rf'nv_inference_pending_request_count{{model="{model}",'
                         rf'version="1"}} (\d+)')
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = pattern.search(_metrics(server))
        if match and int(match.group(1)) == count:
            time.sleep(0.05)  # a dispatched request's execute may still be starting
            return
        time.sleep(0.01)
    raise AssertionError(f"queue of {model} never held {count} requests")


def test_queue_limit_rejects_with_resource_exhausted(server) -> None:
    errors: list[str] = []
    lock = threading.Lock()

    def one(_: int) -> None:
        try:
            _window(server.url, "limited")
        except InferenceServerException as e:
            with lock:
                errors.append(f"{e.status()} {e.message()}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(4)))
    assert len(errors) == 2, errors  # one runs, one waits, two find the queue full
    assert all("RESOURCE_EXHAUSTED" in e and "max_queue_size" in e for e in errors), errors


def test_metrics_follow_triton_names(server, client) -> None:
    x = np.zeros((2, 8), np.float32)
    for _ in range(3):
        client.infer("clf_onnx", [infer_input("features", x, "FP32")])
    text = _metrics(server)
    labels = '{model="clf_onnx",version="1"}'
    success = float(re.search(rf"nv_inference_request_success{re.escape(labels)} (\S+)",
                              text).group(1))
    count = float(re.search(rf"nv_inference_count{re.escape(labels)} (\S+)", text).group(1))
    assert success >= 3 and count >= 6
    assert "nv_inference_compute_infer_duration_us" in text
    assert "nv_cpu_memory_total_bytes" in text
    stats = client.get_inference_statistics("clf_onnx").model_stats[0]
    assert stats.inference_stats.success.count == success
