"""Dynamic batcher and instance groups driven through real backends: preferred sizes, queue
delay, max batch, queue limits, priorities, queue timeouts (REJECT / DELAY), concurrent instances
and batched tensor models split back per request."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from serving.backends.python import PythonBackend
from serving.backends.pytorch import PytorchBackend
from tests.backend_helpers import CollectSink, make_request, parse_config, write_model
from tests.torch_models import Classifier, save_torchscript

# Reports, per request, the total batch size of the execution it ran in and when that ran.
WINDOW_MODEL = '''
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.exec_s = float(params["exec_ms"]["string_value"]) / 1000

    def execute(self, requests):
        start = time.monotonic()
        batch = sum(pb_utils.get_input_tensor_by_name(r, "X").as_numpy().shape[0]
                    for r in requests)
        time.sleep(self.exec_s)
        end = time.monotonic()
        out = []
        for r in requests:
            n = pb_utils.get_input_tensor_by_name(r, "X").as_numpy().shape[0]
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("BATCH", np.full((n, 1), batch, np.int32)),
                pb_utils.Tensor("WINDOW", np.tile(np.array([start, end]), (n, 1)))]))
        return out
'''


def _window_model(tmp_path, exec_ms: int, mbs: int = 8, extra: str = "") -> PythonBackend:
    config = f"""
    name: "win"
    backend: "python"
    max_batch_size: {mbs}
    input [ {{ name: "X" data_type: TYPE_FP32 dims: [ 1 ] }} ]
    output [ {{ name: "BATCH" data_type: TYPE_INT32 dims: [ 1 ] }},
             {{ name: "WINDOW" data_type: TYPE_FP64 dims: [ 2 ] }} ]
    parameters {{ key: "exec_ms" value {{ string_value: "{exec_ms}" }} }}
    {extra}
    """
    model_dir = write_model(tmp_path, "win", config, {"model.py": WINDOW_MODEL})
    backend = PythonBackend(parse_config(config), model_dir, 1)
    backend.load()
    return backend


def _send(backend, n: int = 1, priority: int = 0, timeout_us: int = 0) -> CollectSink:
    sink = CollectSink()
    x = np.zeros((n, 1), np.float32) if backend.config.max_batch_size else np.zeros(1, np.float32)
    backend.submit(make_request("win", priority=priority, timeout_us=timeout_us, X=x), sink)
    return sink


def _batch(sink: CollectSink) -> int:
    return int(sink.outputs()["BATCH"].ravel()[0])


def _start(sink: CollectSink) -> float:
    return float(sink.outputs()["WINDOW"].ravel()[0])


def _wait_running(backend, deadline_s: float = 5.0) -> None:
    """Wait until the queue is empty, i.e. what was submitted has been dispatched."""
    end = time.monotonic() + deadline_s
    while backend.pending_count() and time.monotonic() < end:
        time.sleep(0.002)


def test_preferred_batch_goes_out_at_once_and_rest_waits_for_delay(tmp_path):
    backend = _window_model(tmp_path, 10, extra="""dynamic_batching {
        preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 300000 }""")
    t0 = time.monotonic()
    sinks = [_send(backend) for _ in range(6)]
    first = [_batch(s) for s in sinks[:4]]
    assert first == [4, 4, 4, 4]
    assert sinks[3].final_at - t0 < 0.25
    assert [_batch(s) for s in sinks[4:]] == [2, 2]
    assert sinks[5].final_at - t0 >= 0.3
    backend.unload()


def test_queue_delay_is_honoured_and_max_batch_caps(tmp_path):
    backend = _window_model(tmp_path, 20, extra="""dynamic_batching {
        max_queue_delay_microseconds: 200000 }""")
    t0 = time.monotonic()
    lone = _send(backend)
    assert _batch(lone) == 1 and lone.final_at - t0 >= 0.2
    sinks = [_send(backend, n=2) for _ in range(10)]
    sizes = sorted({(_start(s), _batch(s)) for s in sinks})
    assert [b for _, b in sizes] == [8, 8, 4]
    backend.unload()


def test_without_dynamic_batching_each_request_runs_alone(tmp_path):
    backend = _window_model(tmp_path, 5)
    sinks = [_send(backend) for _ in range(5)]
    assert [_batch(s) for s in sinks] == [1] * 5
    backend.unload()


def test_queue_full_is_rejected_with_clear_status(tmp_path):
    backend = _window_model(tmp_path, 300, mbs=1, extra="""dynamic_batching {
        default_queue_policy { max_queue_size: 2 } }""")
    running = _send(backend)
    _wait_running(backend)
    queued = [_send(backend) for _ in range(2)]
    rejected = _send(backend)
    err = rejected.error(timeout=1)
    assert err.status == "RESOURCE_EXHAUSTED" and "max_queue_size" in err.message
    assert _batch(running) == 1 and all(_batch(s) == 1 for s in queued)
    backend.unload()


def test_priority_levels_order_the_queue(tmp_path):
    backend = _window_model(tmp_path, 60, mbs=1, extra="""dynamic_batching {
        priority_levels: 2 default_priority_level: 2 }""")
    blocker = _send(backend)
    _wait_running(backend)
    low = [_send(backend, priority=2), _send(backend)]  # explicit and default level
    high = [_send(backend, priority=1) for _ in range(2)]
    order = sorted(low + high, key=_start)
    assert order == high + low
    assert _start(blocker) < _start(high[0])
    backend.unload()


def test_queue_timeout_reject_and_override(tmp_path):
    backend = _window_model(tmp_path, 400, mbs=1, extra="""dynamic_batching {
        default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 100000
                               allow_timeout_override: true } }""")
    blocker = _send(backend)
    _wait_running(backend)
    t0 = time.monotonic()
    expired = _send(backend)
    patient = _send(backend, timeout_us=5_000_000)  # overrides the 100 ms default
    err = expired.error(timeout=2)
    assert err.status == "UNAVAILABLE" and "timeout" in err.message.lower()
    assert 0.09 <= expired.final_at - t0 < 0.35
    assert _batch(blocker) == 1 and _batch(patient) == 1
    backend.unload()


def test_queue_timeout_delay_moves_request_behind_others(tmp_path):
    backend = _window_model(tmp_path, 300, mbs=1, extra="""dynamic_batching {
        priority_levels: 2 default_priority_level: 2
        priority_queue_policy { key: 1 value {
            timeout_action: DELAY default_timeout_microseconds: 50000 } } }""")
    blocker = _send(backend)
    _wait_running(backend)
    delayed = _send(backend, priority=1)
    time.sleep(0.12)
    regular = _send(backend, priority=2)
    assert _start(regular) < _start(delayed)  # without the timeout, level 1 would go first
    assert _batch(delayed) == 1 and _batch(blocker) == 1
    backend.unload()


@pytest.mark.parametrize("count", [1, 3])
def test_instance_group_count_executes_concurrently(tmp_path, count):
    backend = _window_model(tmp_path, 300, mbs=0,
                            extra=f"instance_group [ {{ count: {count} kind: KIND_CPU }} ]")
    assert backend.instance_count == count
    sinks = [_send(backend) for _ in range(3)]
    windows = sorted(tuple(s.outputs()["WINDOW"].ravel()) for s in sinks)
    overlap = max(w[0] for w in windows) < min(w[1] for w in windows)
    assert overlap == (count == 3)
    if count == 1:  # one instance: strictly one after another
        assert all(a[1] <= b[0] for a, b in zip(windows, windows[1:], strict=False))
    backend.unload()


def test_batched_torch_model_splits_results_per_request(tmp_path):
    save_torchscript(Classifier(), tmp_path / "clf" / "1" / "model.pt")
    config = parse_config("""
    name: "clf"
    backend: "pytorch"
    max_batch_size: 16
    input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 8 ] } ]
    output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4 ] },
             { name: "OUTPUT__1" data_type: TYPE_FP32 dims: [ 4 ] } ]
    dynamic_batching { max_queue_delay_microseconds: 50000 }
    """)
    backend = PytorchBackend(config, tmp_path / "clf", 1)
    backend.load()
    inputs = [np.random.randn(n, 8).astype(np.float32) for n in (1, 2, 3, 1, 4)]
    sinks = []
    for x in inputs:
        sinks.append(CollectSink())
        backend.submit(make_request("clf", INPUT__0=x), sinks[-1])
    reference = Classifier()
    for x, sink in zip(inputs, sinks, strict=True):
        with torch.no_grad():
            want = reference(torch.from_numpy(x))[1].numpy()
        np.testing.assert_allclose(sink.outputs()["OUTPUT__1"], want, rtol=1e-5, atol=1e-6)
    backend.unload()
