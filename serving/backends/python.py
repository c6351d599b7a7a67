"""The python backend: runs a user `model.py` (a `PythonModel` subclass, or Triton's
`TritonPythonModel` written against `triton_python_backend_utils`) with Triton's lifecycle."""

from __future__ import annotations

import importlib.util
import inspect
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from serving.batcher import Pending
from serving.instances import ScheduledBackend
from serving.python_model import (
    InferenceRequest,
    InferenceResponse,
    PythonModel,
    ResponseSender,
    Tensor,
    TritonError,
    model_args,
)
from serving.tensor_config import numpy_dtype, select_outputs
from serving.types import InferRequest, InferResponse, ServingError

_IMPORT_LOCK = threading.Lock()


def _as_wire_array(array: np.ndarray) -> np.ndarray:
    """BYTES tensors travel as object arrays of bytes; encode str / fixed-width strings."""
    if array.dtype.kind in ("U", "S") or (array.dtype == np.object_ and any(
            isinstance(v, str) for v in array.flat)):
        flat = [v.encode() if isinstance(v, str) else bytes(v) for v in array.flat]
        return np.array(flat, dtype=np.object_).reshape(array.shape)
    return array


def to_infer_response(response: InferenceResponse, request: InferRequest) -> InferResponse:
    """Convert a model's response to the serving contract's response."""
    if response.has_error():
        err = response.error()
        assert err is not None
        status = err.status() if isinstance(err, TritonError) else "INTERNAL"
        message = err.message() if isinstance(err, TritonError) else str(err)
        return InferResponse(error=ServingError(status, message))
    outputs = {t.name(): _as_wire_array(t.as_numpy()) for t in response.output_tensors()}
    return InferResponse(outputs=select_outputs(outputs, request.requested_outputs),
                         parameters=response.parameters())


def load_module(path: Path, unique_name: str) -> ModuleType:
    """Import a model file as a fresh module, with its folder importable while it loads."""
    spec = importlib.util.spec_from_file_location(unique_name, path)
    if spec is None or spec.loader is None:
        raise ServingError("INVALID_ARGUMENT", f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    with _IMPORT_LOCK:
        sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ServingError("INVALID_ARGUMENT", f"importing {path} failed: {exc!r}") from exc
        finally:
            sys.path.remove(str(path.parent))
    return module


def model_class(module: ModuleType, path: Path) -> type:
    """`TritonPythonModel`, else the one `PythonModel` subclass the file defines."""
    cls = getattr(module, "TritonPythonModel", None)
    if cls is not None:
        return cls
    found = [obj for obj in vars(module).values() if inspect.isclass(obj)
             and issubclass(obj, PythonModel) and obj is not PythonModel
             and obj.__module__ == module.__name__]
    if len(found) != 1:
        raise ServingError("INVALID_ARGUMENT",
                           f"{path} must define TritonPythonModel or exactly one PythonModel "
                           f"subclass (found {len(found)})")
    return found[0]


class PythonInstance:
    """One instance of the user's model class."""

    def __init__(self, model: Any, config: mc.ModelConfig) -> None:
        self._model = model
        self._config = config
        self._decoupled = config.model_transaction_policy.decoupled

    def _request(self, pending: Pending) -> tuple[InferenceRequest, ResponseSender]:
        request, sink = pending.request, pending.sink

        def send(response: InferenceResponse | None, final: bool) -> None:
            sink.send(None if response is None else to_infer_response(response, request), final)

        sender = ResponseSender(send, request.cancelled)
        requested = request.requested_outputs or [o.name for o in self._config.output]
        return InferenceRequest([Tensor(k, v) for k, v in request.inputs.items()], requested,
                                request_id=request.id, parameters=request.parameters,
                                model_name=request.model_name,
                                model_version=int(request.model_version or -1),
                                timeout=request.timeout_us, response_sender=sender), sender

    def execute(self, batch: list[Pending]) -> None:
        converted = [self._request(p) for p in batch]
        try:
            responses = self._model.execute([r for r, _ in converted])
        except Exception as exc:
            self._fail_open(batch, converted, f"execute() raised {exc!r}")
            return
        if self._decoupled:
            return
        if responses is None:
            self._fail_open(batch, converted, "execute() returned None for a non-decoupled model")
            return
        if len(responses) != len(batch):
            self._fail_open(batch, converted, f"execute() returned {len(responses)} responses "
                                              f"for {len(batch)} requests")
            return
        for pending, response in zip(batch, responses, strict=True):
            pending.sink.send(to_infer_response(response, pending.request), True)

    def _fail_open(self, batch: list[Pending],
                   converted: list[tuple[InferenceRequest, ResponseSender]], why: str) -> None:
        err = ServingError("INTERNAL", f"model '{self._config.name}': {why}")
        for pending, (_, sender) in zip(batch, converted, strict=True):
            if not sender.closed:
                pending.sink.send(InferResponse(error=err), True)

    def close(self) -> None:
        finalize = getattr(self._model, "finalize", None)
        if finalize is not None:
            finalize()


class PythonBackend(ScheduledBackend):
    """Backend "python": `<model_dir>/<version>/model.py` (or `default_model_filename`)."""

    batch_by_shape = False

    def __init__(self, config: mc.ModelConfig, model_dir: Path, version: int) -> None:
        super().__init__(config, model_dir, version)
        self._cls: type | None = None

    def model_path(self) -> Path:
        return Path(self.model_dir) / str(self.version) / (
            self.config.default_model_filename or "model.py")

    def check_config(self) -> None:
        for kind, specs in (("input", self.config.input), ("output", self.config.output)):
            for spec in specs:
                try:
                    numpy_dtype(spec.data_type)
                except ServingError as err:
                    raise ServingError("INVALID_ARGUMENT",
                                       f"{kind} '{spec.name}' data_type: {err.message}") from err
        path = self.model_path()
        if not path.is_file():
            raise ServingError("NOT_FOUND", f"model file {path} not found")
        unique = f"shardserve_model_{self.config.name}_{self.version}_{id(self)}"
        self._cls = model_class(load_module(path, unique), path)

    def create_instance(self, index: int, device: str) -> PythonInstance:
        assert self._cls is not None
        model = self._cls()
        kind = "GPU" if device.startswith("cuda") else "CPU"
        initialize = getattr(model, "initialize", None)
        try:
            if initialize is not None:
                initialize(model_args(self.config, Path(self.model_dir), self.version,
                                      index, kind))
        except Exception as exc:
            raise ServingError("INTERNAL", f"initialize() of model '{self.config.name}' "
                                           f"failed: {exc!r}") from exc
        return PythonInstance(model, self.config)
