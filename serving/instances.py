"""Instance groups: a model version runs `instance_group { count }` instances, each on its own
thread with its own copy of the model, all pulling batches from one scheduler (the dynamic
batcher, or Triton's default one-request-at-a-time scheduler).

`ScheduledBackend` is the Backend base class the python, pytorch and onnxruntime backends share:
it validates requests, queues them, runs the instance threads and reports executions.
"""

from __future__ import annotations

import threading
import time
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from serving.batcher import DynamicBatcher, Pending
from serving.metrics import ExecutionRecorder
from serving.tensor_config import (
    apply_reshape,
    batch_key,
    concat_inputs,
    select_outputs,
    split_outputs,
    validate_request,
)
from serving.types import Backend, InferRequest, InferResponse, ResponseSink, ServingError


class ModelInstance(Protocol):
    """One copy of a model; `execute` answers every request of the batch through its sink."""

    def execute(self, batch: list[Pending]) -> None: ...

    def close(self) -> None: ...


class BatchedInstance:
    """Joins a batch along dim 0, runs `run(inputs) -> outputs` once, splits outputs back.

    Used by the tensor backends (pytorch, onnxruntime); `reshape` in the config is applied on
    the way in and undone on the way out.
    """

    def __init__(self, config: mc.ModelConfig,
                 run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                 close: Callable[[], None] | None = None) -> None:
        self._config = config
        self._run = run
        self._close = close
        self._out_reshape = {o.name: list(o.dims) for o in config.output if o.HasField("reshape")}

    def execute(self, batch: list[Pending]) -> None:
        inputs = apply_reshape(self._config, concat_inputs([p.request for p in batch]))
        outputs = self._run(inputs)
        lead = 1 if self._config.max_batch_size > 0 else 0
        for name, dims in self._out_reshape.items():
            if name in outputs:
                outputs[name] = outputs[name].reshape(list(outputs[name].shape[:lead]) + dims)
        parts = (split_outputs(outputs, [p.batch_size for p in batch]) if lead
                 else [outputs] * len(batch))
        for pending, out in zip(batch, parts, strict=True):
            response = InferResponse(select_outputs(out, pending.request.requested_outputs))
            pending.sink.send(response, True)

    def close(self) -> None:
        if self._close is not None:
            self._close()


def instance_devices(config: mc.ModelConfig, cuda_count: int = 0) -> list[str]:
    """One device string per instance, from the instance groups (default: one instance).

    KIND_GPU groups get `count` instances on each listed GPU (all GPUs when none are listed);
    without GPUs they fall back to CPU instances.
    """
    if not config.instance_group:
        return ["cuda:0" if cuda_count else "cpu"]
    devices: list[str] = []
    for group in config.instance_group:
        count = group.count or 1
        gpu_kind = group.kind in (mc.ModelInstanceGroup.KIND_GPU, mc.ModelInstanceGroup.KIND_AUTO)
        if gpu_kind and cuda_count:
            for gpu in list(group.gpus) or list(range(cuda_count)):
                devices.extend([f"cuda:{gpu}"] * count)
        else:
            devices.extend(["cpu"] * count)
    return devices


class ScheduledBackend(Backend):
    """A backend whose requests go through a scheduler to `instance_group` instance threads."""

    #: requests with different non-batch shapes may not share a batch (False: python models)
    batch_by_shape = True

    def __init__(self, config: mc.ModelConfig, model_dir: Path, version: int) -> None:
        super().__init__(config, model_dir, version)
        self.recorder: ExecutionRecorder | None = None
        self._scheduler: DynamicBatcher | None = None
        self._threads: list[threading.Thread] = []
        self._instances: list[ModelInstance] = []

    @abstractmethod
    def check_config(self) -> None:
        """Load-time checks of the model file against the config; raise ServingError."""

    @abstractmethod
    def create_instance(self, index: int, device: str) -> ModelInstance:
        """Build one instance (its own copy of the model) for `device`."""

    def cuda_count(self) -> int:
        """How many GPUs this backend could use (0 on CPU-only machines)."""
        return 0

    def load(self) -> None:
        self.check_config()
        devices = instance_devices(self.config, self.cuda_count())
        try:
            for index, device in enumerate(devices):
                self._instances.append(self.create_instance(index, device))
        except Exception:
            self._close_instances()
            raise
        key = batch_key if self.batch_by_shape else None
        self._scheduler = DynamicBatcher(self.config, self.config.HasField("dynamic_batching"),
                                         key)
        for index, instance in enumerate(self._instances):
            thread = threading.Thread(target=self._serve, args=(instance,), daemon=True,
                                      name=f"{self.config.name}-v{self.version}-i{index}")
            thread.start()
            self._threads.append(thread)

    @property
    def instance_count(self) -> int:
        return len(self._instances)

    def pending_count(self) -> int:
        return self._scheduler.pending_count() if self._scheduler else 0

    def ready(self) -> bool:
        return self._scheduler is not None and all(t.is_alive() for t in self._threads)

    def submit(self, request: InferRequest, sink: ResponseSink) -> None:
        pending = Pending(request, sink, enqueue_ns=time.monotonic_ns())
        try:
            if self._scheduler is None:
                raise ServingError("UNAVAILABLE", f"model '{self.config.name}' is not loaded")
            pending.batch_size = validate_request(self.config, request)
            self._scheduler.enqueue(pending)
        except ServingError as err:
            pending.sink.send(InferResponse(error=err), True)

    def _serve(self, instance: ModelInstance) -> None:
        """Instance thread: run batches until the scheduler is closed and drained."""
        assert self._scheduler is not None
        while (batch := self._scheduler.next_batch()) is not None:
            started = time.monotonic_ns()
            for queued in batch:  # the front's statistics split queue and compute time here
                queued.request.compute_start_ns = started
            if self.recorder is not None:
                self.recorder.record_execution(self.config.name, self.version,
                                               sum(p.batch_size for p in batch))
            try:
                instance.execute(batch)
            except Exception as exc:  # a model bug fails its batch, not the server
                err = exc if isinstance(exc, ServingError) else ServingError(
                    "INTERNAL", f"model '{self.config.name}' failed: {exc}")
                for queued in batch:
                    try:
                        queued.sink.send(InferResponse(error=err), True)
                    except Exception:  # the sink may already be closed by a partial answer
                        pass

    def unload(self) -> None:
        """Stop taking requests, let queued and running ones finish, then free the instances."""
        if self._scheduler is not None:
            self._scheduler.close()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        self._close_instances()

    def _close_instances(self) -> None:
        for instance in self._instances:
            instance.close()
        self._instances.clear()
