"""Dynamic batcher and instance groups driven through real backends: preferred sizes, queue
delay, max batch, queue limits, priorities, queue timeouts (REJECT / DELAY), concurrent instances
and batched tensor models split back per request.

No test here reads a clock: each checks which requests ran together (a batch's size and its
members), in which order executions started, and what was still queued when; a held execution
(a gate the test opens) keeps the instance busy for as long as a test needs it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from serving.backends.python import PythonBackend
from serving.backends.pytorch import PytorchBackend
from tests.backend_helpers import CollectSink, make_request, parse_config, write_model
from tests.torch_models import Classifier, save_torchscript

# Reports, per request, the execution it ran in: EXEC numbers executions in the order they
# started (across the model's instances), BATCH is the execution's total batch size, PEAK the
# most executions running at once while it ran. With parameter gate_dir, a request whose X is
# k > 0 holds its execution until the file <gate_dir>/open-k exists (it writes
# <gate_dir>/started-k when it starts waiting); parameter `barrier` N makes every execution
# wait until N of them are inside execute().
WINDOW_MODEL = '''
import json
import os
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

_LOCK = threading.Lock()
_STARTED = [0]
_ACTIVE = {}  # execution number -> most executions running at once while it ran
_BARRIERS = {}
HOLD_DEADLINE_S = 120


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        value = lambda key, default: params.get(key, {}).get("string_value", default)
        self.exec_s = float(value("exec_ms", "0")) / 1000
        self.gate_dir = value("gate_dir", "")
        parties = int(value("barrier", "0"))
        with _LOCK:
            self.barrier = (_BARRIERS.setdefault(parties, threading.Barrier(parties, timeout=60))
                            if parties else None)

    def _hold(self, k):
        open(os.path.join(self.gate_dir, f"started-{k}"), "w").close()
        deadline = time.monotonic() + HOLD_DEADLINE_S
        while not os.path.exists(os.path.join(self.gate_dir, f"open-{k}")):
            if time.monotonic() > deadline:
                raise RuntimeError(f"gate {k} never opened")
            time.sleep(0.002)

    def execute(self, requests):
        xs = [pb_utils.get_input_tensor_by_name(r, "X").as_numpy() for r in requests]
        with _LOCK:
            _STARTED[0] += 1
            number = _STARTED[0]
            _ACTIVE[number] = 0
            for k in _ACTIVE:
                _ACTIVE[k] = max(_ACTIVE[k], len(_ACTIVE))
        try:
            holds = {int(x.ravel()[0]) for x in xs if self.gate_dir and x.ravel()[0] > 0}
            for k in sorted(holds):
                self._hold(k)
            if self.barrier is not None:
                self.barrier.wait()
            time.sleep(self.exec_s)
        finally:
            with _LOCK:
                peak = _ACTIVE.pop(number)
        batch = sum(x.shape[0] for x in xs)
        return [pb_utils.InferenceResponse([
            pb_utils.Tensor("BATCH", np.full((x.shape[0], 1), batch, np.int32)),
            pb_utils.Tensor("EXEC", np.full((x.shape[0], 1), number, np.int32)),
            pb_utils.Tensor("PEAK", np.full((x.shape[0], 1), peak, np.int32))]) for x in xs]
'''
WINDOW_OUTPUTS = """output [ { name: "BATCH" data_type: TYPE_INT32 dims: [ 1 ] },
         { name: "EXEC" data_type: TYPE_INT32 dims: [ 1 ] },
         { name: "PEAK" data_type: TYPE_INT32 dims: [ 1 ] } ]"""
HANG_S = 60.0  # only a hang takes this long
LONG_DELAY_US = 60_000_000  # a queue delay no test waits out: batches go by size


def _window_model(tmp_path: Path, mbs: int = 8, extra: str = "", exec_ms: int = 0,
                  barrier: int = 0) -> PythonBackend:
    config = f"""
    name: "win"
    backend: "python"
    max_batch_size: {mbs}
    input [ {{ name: "X" data_type: TYPE_FP32 dims: [ 1 ] }} ]
    {WINDOW_OUTPUTS}
    parameters {{ key: "exec_ms" value {{ string_value: "{exec_ms}" }} }}
    parameters {{ key: "gate_dir" value {{ string_value: "{tmp_path}" }} }}
    parameters {{ key: "barrier" value {{ string_value: "{barrier}" }} }}
    {extra}
    """
    model_dir = write_model(tmp_path, "win", config, {"model.py": WINDOW_MODEL})
    backend = PythonBackend(parse_config(config), model_dir, 1)
    backend.load()
    return backend


def _send(backend: PythonBackend, n: int = 1, priority: int = 0, timeout_us: int = 0,
          hold: int = 0) -> CollectSink:
    """Submit one request of n rows; hold > 0 keeps its execution until gate `hold` opens."""
    sink = CollectSink()
    shape = (n, 1) if backend.config.max_batch_size else (1,)
    x = np.full(shape, hold, np.float32)
    backend.submit(make_request("win", priority=priority, timeout_us=timeout_us, X=x), sink)
    return sink


def _open(tmp_path: Path, gate: int) -> None:
    (tmp_path / f"open-{gate}").touch()


def _batch(sink: CollectSink) -> int:
    return int(sink.outputs(HANG_S)["BATCH"].ravel()[0])


def _exec(sink: CollectSink) -> int:
    """The number of the execution the request ran in (executions numbered as they start)."""
    return int(sink.outputs(HANG_S)["EXEC"].ravel()[0])


def _runs(sinks: list[CollectSink]) -> list[tuple[int, int]]:
    """(execution number, batch size) of each request."""
    return [(_exec(s), _batch(s)) for s in sinks]


def _wait_pending(backend: PythonBackend, count: int) -> None:
    """Wait until exactly `count` requests are queued (the others were dispatched)."""
    end = time.monotonic() + HANG_S
    while backend.pending_count() != count:
        assert time.monotonic() < end, f"queue holds {backend.pending_count()}, not {count}"
        time.sleep(0.002)


def _wait_started(tmp_path: Path, gate: int) -> None:
    """Wait until the execution held by `gate` is inside execute()."""
    end = time.monotonic() + HANG_S
    while not (tmp_path / f"started-{gate}").exists():
        assert time.monotonic() < end, f"execution held by gate {gate} never started"
        time.sleep(0.002)


def test_preferred_batch_goes_out_at_once_and_rest_waits(tmp_path: Path) -> None:
    backend = _window_model(tmp_path, extra=f"""dynamic_batching {{
        preferred_batch_size: [ 4 ] max_queue_delay_microseconds: {LONG_DELAY_US} }}""")
    sinks = [_send(backend) for _ in range(6)]
    assert _runs(sinks[:4]) == [(1, 4)] * 4  # a preferred size does not wait for the delay
    _wait_pending(backend, 2)  # two are not a preferred size: they wait for more
    assert not sinks[4].done.is_set() and not sinks[5].done.is_set()
    sinks += [_send(backend) for _ in range(2)]
    assert _runs(sinks[4:]) == [(2, 4)] * 4  # the waiting two went out with the next two
    backend.unload()


def test_queue_delay_is_honoured_and_max_batch_caps(tmp_path: Path) -> None:
    backend = _window_model(tmp_path, extra=f"""dynamic_batching {{
        max_queue_delay_microseconds: {LONG_DELAY_US} }}""")
    sinks = [_send(backend)]
    _wait_pending(backend, 1)  # the lone request waits for the delay ...
    sinks += [_send(backend) for _ in range(7)]
    assert _runs(sinks) == [(1, 8)] * 8  # ... so all eight went as one batch of max size
    sinks = [_send(backend, n=2) for _ in range(10)]  # 20 rows: 8 + 8 go, 4 wait
    assert _runs(sinks[:8]) == [(2, 8)] * 4 + [(3, 8)] * 4
    _wait_pending(backend, 2)
    sinks += [_send(backend, n=2) for _ in range(2)]
    assert _runs(sinks[8:]) == [(4, 8)] * 4
    backend.unload()


def test_expired_queue_delay_sends_a_partial_batch(tmp_path: Path) -> None:
    backend = _window_model(tmp_path, extra="""dynamic_batching {
        max_queue_delay_microseconds: 200000 }""")
    assert _runs([_send(backend)]) == [(1, 1)]  # only the delay's end can have released it
    backend.unload()


def test_without_dynamic_batching_each_request_runs_alone(tmp_path: Path) -> None:
    backend = _window_model(tmp_path)
    sinks = [_send(backend) for _ in range(5)]
    assert sorted(_runs(sinks)) == [(k, 1) for k in range(1, 6)]
    backend.unload()


def test_queue_full_is_rejected_with_clear_status(tmp_path: Path) -> None:
    backend = _window_model(tmp_path, mbs=1, extra="""dynamic_batching {
        default_queue_policy { max_queue_size: 2 } }""")
    running = _send(backend, hold=1)
    _wait_pending(backend, 0)
    queued = [_send(backend) for _ in range(2)]
    rejected = _send(backend)
    err = rejected.error(timeout=HANG_S)  # answered while the instance is still held
    assert err.status == "RESOURCE_EXHAUSTED"
    assert err.message == ("Exceeds maximum queue size: model 'win' priority level 1 already "
                           "holds 2 requests (max_queue_size)")
    assert not running.done.is_set() and backend.pending_count() == 2
    _open(tmp_path, 1)
    assert _runs([running, *queued]) == [(1, 1), (2, 1), (3, 1)]
    backend.unload()


def test_priority_levels_order_the_queue(tmp_path: Path) -> None:
    backend = _window_model(tmp_path, mbs=1, extra="""dynamic_batching {
        priority_levels: 2 default_priority_level: 2 }""")
    blocker = _send(backend, hold=1)
    _wait_pending(backend, 0)
    low = [_send(backend, priority=2), _send(backend)]  # explicit and default level
    high = [_send(backend, priority=1) for _ in range(2)]
    _wait_pending(backend, 4)
    _open(tmp_path, 1)
    assert [_exec(s) for s in [blocker, *high, *low]] == [1, 2, 3, 4, 5]
    backend.unload()


def test_queue_timeout_reject_and_override(tmp_path: Path) -> None:
    backend = _window_model(tmp_path, mbs=1, extra="""dynamic_batching {
        default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 100000
                               allow_timeout_override: true } }""")
    blocker = _send(backend, hold=1, timeout_us=LONG_DELAY_US)
    _wait_pending(backend, 0)
    expired = _send(backend)
    patient = _send(backend, timeout_us=LONG_DELAY_US)  # overrides the 100 ms default
    err = expired.error(timeout=HANG_S)  # rejected in the queue, the instance still held
    assert err.status == "UNAVAILABLE"
    assert err.message == "Request timeout expired in the queue of model 'win'"
    assert backend.pending_count() == 1 and not patient.done.is_set()
    _open(tmp_path, 1)
    assert _runs([blocker, patient]) == [(1, 1), (2, 1)]
    backend.unload()


def test_queue_timeout_delay_moves_request_behind_others(tmp_path: Path) -> None:
    """Level 1 DELAYs after 50 ms; level 2 REJECTs after 100 ms unless overridden. A level-2
    witness sent after the level-1 request is rejected at its deadline, so by then the level-1
    request's deadline has passed too: it must run after the level-2 request queued with it."""
    backend = _window_model(tmp_path, mbs=1, extra="""dynamic_batching {
        priority_levels: 2 default_priority_level: 2
        default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 100000
                               allow_timeout_override: true }
        priority_queue_policy { key: 1 value {
            timeout_action: DELAY default_timeout_microseconds: 50000 } } }""")
    blocker = _send(backend, hold=1, timeout_us=LONG_DELAY_US)
    _wait_pending(backend, 0)
    delayed = _send(backend, priority=1)
    regular = _send(backend, priority=2, timeout_us=LONG_DELAY_US)
    witness = _send(backend, priority=2)
    assert witness.error(timeout=HANG_S).status == "UNAVAILABLE"
    assert backend.pending_count() == 2  # the delayed request stays queued (not rejected)
    _open(tmp_path, 1)
    # without the timeout, level 1 would go first
    assert [_exec(s) for s in (blocker, regular, delayed)] == [1, 2, 3]
    backend.unload()


def test_three_instances_execute_concurrently(tmp_path: Path) -> None:
    """Every execution waits until three are inside execute() at once: only three instances
    running side by side get through."""
    backend = _window_model(tmp_path, mbs=0, barrier=3,
                            extra="instance_group [ { count: 3 kind: KIND_CPU } ]")
    assert backend.instance_count == 3
    sinks = [_send(backend) for _ in range(3)]
    assert sorted(_exec(s) for s in sinks) == [1, 2, 3]
    assert [int(s.outputs()["PEAK"].ravel()[0]) for s in sinks] == [3, 3, 3]
    backend.unload()


def test_one_instance_executes_one_at_a_time(tmp_path: Path) -> None:
    backend = _window_model(tmp_path, mbs=0,
                            extra="instance_group [ { count: 1 kind: KIND_CPU } ]")
    assert backend.instance_count == 1
    sinks = [_send(backend, hold=1), _send(backend), _send(backend)]
    _wait_started(tmp_path, 1)
    assert backend.pending_count() == 2  # the only instance is busy: the others queue
    _open(tmp_path, 1)
    assert [_exec(s) for s in sinks] == [1, 2, 3]
    assert [int(s.outputs()["PEAK"].ravel()[0]) for s in sinks] == [1, 1, 1]
    backend.unload()


def test_batched_torch_model_splits_results_per_request(tmp_path: Path) -> None:
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
