"""The Python model API: Triton's python-backend lifecycle as an importable, typed base class.

A model subclasses `PythonModel` (or, unchanged from Triton, defines `TritonPythonModel` with
`import triton_python_backend_utils as pb_utils`), gets `initialize(args)` once per instance,
`execute(requests)` per batch of requests, and `finalize()` at unload. Decoupled (streaming)
models answer through `request.get_response_sender()` instead of returning responses.
`call_model` runs a model without any server, for tests.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import descriptor, json_format
from tritonclient.grpc import model_config_pb2 as mc

from serving.tensor_config import numpy_dtype

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2

_LOG = logging.getLogger("shardserve.python_model")


class TritonError(Exception):
    """An error a model puts in a response; `code` maps to a gRPC status."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    _STATUS = {UNKNOWN: "UNKNOWN", INTERNAL: "INTERNAL", NOT_FOUND: "NOT_FOUND",
               INVALID_ARG: "INVALID_ARGUMENT", UNAVAILABLE: "UNAVAILABLE",
               UNSUPPORTED: "UNIMPLEMENTED", ALREADY_EXISTS: "ALREADY_EXISTS",
               CANCELLED: "CANCELLED"}

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        super().__init__(message)
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def status(self) -> str:
        """The gRPC status name of this error's code."""
        return self._STATUS.get(self._code, "INTERNAL")


class TritonModelException(Exception):
    """Raised by the API when a model misuses it (e.g. sends after the final response)."""


class Tensor:
    """A named tensor held as a numpy array (BYTES tensors as object arrays)."""

    def __init__(self, name: str, array: np.ndarray) -> None:
        if not isinstance(array, np.ndarray):
            raise TritonModelException(f"tensor '{name}' must be a numpy array")
        self._name = name
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self) -> Any:
        return self._array.__dlpack__()

    @classmethod
    def from_dlpack(cls, name: str, tensor: Any) -> Tensor:
        """Wrap any DLPack-capable CPU tensor (e.g. a torch tensor) without copying."""
        return cls(name, np.from_dlpack(tensor))


class InferenceResponse:
    """A model's response: output tensors or an error."""

    def __init__(self, output_tensors: Sequence[Tensor] | None = None,
                 error: TritonError | None = None,
                 parameters: dict[str, Any] | None = None) -> None:
        self._outputs = list(output_tensors or [])
        self._error = error
        self._parameters = dict(parameters or {})

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> dict[str, Any]:
        return self._parameters


SendFn = Callable[[InferenceResponse | None, bool], None]


class ResponseSender:
    """Streams a decoupled request's responses; the last send carries the FINAL flag."""

    def __init__(self, send: SendFn, cancelled: threading.Event | None = None) -> None:
        self._send = send
        self._cancelled = cancelled or threading.Event()
        self._closed = False
        self._lock = threading.Lock()

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        final = bool(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        with self._lock:
            if self._closed:
                raise TritonModelException("response sender already sent its final response")
            if response is None and not final:
                raise TritonModelException("send() needs a response or the FINAL flag")
            self._closed = final
        self._send(response, final)

    def is_cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def closed(self) -> bool:
        return self._closed


class InferenceRequest:
    """One request as a model sees it."""

    def __init__(self, inputs: Sequence[Tensor] = (), requested_output_names: Sequence[str] = (),
                 request_id: str = "", correlation_id: int = 0, flags: int = 0,
                 parameters: dict[str, Any] | str | None = None, model_name: str = "",
                 model_version: int = -1, timeout: int = 0,
                 response_sender: ResponseSender | None = None) -> None:
        self._inputs = list(inputs)
        self._requested = list(requested_output_names)
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._flags = flags
        if isinstance(parameters, str):
            parameters = json.loads(parameters) if parameters else {}
        self._parameters = dict(parameters or {})
        self.model_name = model_name
        self.model_version = model_version
        self._timeout = timeout
        self._sender = response_sender

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def requested_output_names(self) -> list[str]:
        return self._requested

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int:
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def timeout(self) -> int:
        return self._timeout

    def parameters(self) -> str:
        """The request parameters as a JSON string (Triton's convention)."""
        return json.dumps(self._parameters)

    def get_response_sender(self) -> ResponseSender:
        if self._sender is None:
            raise TritonModelException("this request has no response sender")
        return self._sender

    def is_cancelled(self) -> bool:
        return self._sender is not None and self._sender.is_cancelled()

    def exec(self, decoupled: bool = False) -> InferenceResponse:
        raise TritonModelException("BLS requests (InferenceRequest.exec) are not supported")


class PythonModel:
    """Base class of a python-backend model: override `execute`, optionally the others."""

    model_config: dict[str, Any]
    args: dict[str, str]

    def initialize(self, args: dict[str, str]) -> None:
        """Called once per instance; `args["model_config"]` is the config as JSON."""
        self.args = args
        self.model_config = json.loads(args["model_config"])

    def execute(self, requests: list[InferenceRequest]) -> list[InferenceResponse] | None:
        """Answer a batch: one response per request, or None for decoupled models."""
        raise NotImplementedError

    def finalize(self) -> None:
        """Called once at unload, after the last execute."""


# --- config helpers (also exported by triton_python_backend_utils) ----------------------------

_INT64 = {descriptor.FieldDescriptor.TYPE_INT64, descriptor.FieldDescriptor.TYPE_UINT64,
          descriptor.FieldDescriptor.TYPE_SINT64, descriptor.FieldDescriptor.TYPE_FIXED64,
          descriptor.FieldDescriptor.TYPE_SFIXED64}


def _fix_int64(value: Any, desc: descriptor.Descriptor) -> Any:
    """Turn protobuf-JSON's int64 strings back into numbers, as Triton's config JSON has them."""
    for key, item in value.items():
        field = desc.fields_by_name.get(key)
        if field is None:
            continue
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                inner = field.message_type.fields_by_name["value"].message_type
                if inner is not None:
                    for sub in item.values():
                        _fix_int64(sub, inner)
            elif isinstance(item, list):
                for sub in item:
                    _fix_int64(sub, field.message_type)
            else:
                _fix_int64(item, field.message_type)
        elif field.type in _INT64:
            value[key] = [int(v) for v in item] if isinstance(item, list) else int(item)
    return value


def config_to_dict(config: mc.ModelConfig) -> dict[str, Any]:
    """The model config as Triton hands it to python models (proto field names, defaults)."""
    raw = json_format.MessageToDict(config, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    return _fix_int64(raw, mc.ModelConfig.DESCRIPTOR)


def model_args(config: mc.ModelConfig, model_dir: Path, version: int,
               instance: int = 0, kind: str = "CPU") -> dict[str, str]:
    """The `args` dict `initialize` receives, with Triton's keys."""
    return {"model_config": json.dumps(config_to_dict(config)),
            "model_instance_kind": kind,
            "model_instance_name": f"{config.name}_{instance}",
            "model_instance_device_id": "0",
            "model_repository": str(model_dir),
            "model_version": str(version),
            "model_name": config.name}


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return next((t for t in request.inputs() if t.name() == name), None)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors() if t.name() == name), None)


def get_input_config_by_name(model_config: dict[str, Any], name: str) -> dict | None:
    return next((c for c in model_config.get("input", []) if c["name"] == name), None)


def get_output_config_by_name(model_config: dict[str, Any], name: str) -> dict | None:
    return next((c for c in model_config.get("output", []) if c["name"] == name), None)


def triton_string_to_numpy(triton_type: str) -> type:
    """"TYPE_FP32" (or "FP32") -> numpy.float32; strings map to numpy.object_."""
    return numpy_dtype(triton_type).type


def using_decoupled_model_transaction_policy(model_config: dict[str, Any]) -> bool:
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


class Logger:
    """Triton's pb_utils.Logger, writing to the standard logging module."""

    @staticmethod
    def log_info(message: str) -> None:
        _LOG.info(message)

    @staticmethod
    def log_warn(message: str) -> None:
        _LOG.warning(message)

    @staticmethod
    def log_error(message: str) -> None:
        _LOG.error(message)

    @staticmethod
    def log_verbose(message: str) -> None:
        _LOG.debug(message)

    @staticmethod
    def log(message: str, level: int = 0) -> None:
        _LOG.info(message)


# --- running a model without a server ----------------------------------------------------------

def call_model(model: Any, inputs: dict[str, np.ndarray],
               requested_outputs: Sequence[str] = (),
               parameters: dict[str, Any] | None = None,
               timeout_s: float = 60.0) -> list[dict[str, np.ndarray]]:
    """Run one request through `model.execute` and return its responses' outputs in order.

    Works for ordinary and decoupled models; a response with an error raises it.
    """
    collected: list[InferenceResponse] = []
    done = threading.Event()

    def send(response: InferenceResponse | None, final: bool) -> None:
        if response is not None:
            collected.append(response)
        if final:
            done.set()

    sender = ResponseSender(send)
    request = InferenceRequest([Tensor(k, v) for k, v in inputs.items()], requested_outputs,
                               parameters=parameters, response_sender=sender)
    returned = model.execute([request])
    if returned is not None:
        collected.extend(returned)
    elif not done.wait(timeout_s):
        raise TimeoutError(f"decoupled model sent no final response within {timeout_s}s")
    for response in collected:
        if response.has_error():
            raise response.error()
    return [{t.name(): t.as_numpy() for t in r.output_tensors()} for r in collected]
