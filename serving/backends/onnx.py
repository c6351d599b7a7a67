"""The onnxruntime backend: `model.onnx` on the CPU execution provider, CUDA when present."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from serving.instances import BatchedInstance, ScheduledBackend
from serving.tensor_config import dims_match, full_dims, type_name
from serving.types import ServingError

_ORT_TYPES = {
    "tensor(bool)": "TYPE_BOOL", "tensor(uint8)": "TYPE_UINT8", "tensor(uint16)": "TYPE_UINT16",
    "tensor(uint32)": "TYPE_UINT32", "tensor(uint64)": "TYPE_UINT64", "tensor(int8)": "TYPE_INT8",
    "tensor(int16)": "TYPE_INT16", "tensor(int32)": "TYPE_INT32", "tensor(int64)": "TYPE_INT64",
    "tensor(float16)": "TYPE_FP16", "tensor(float)": "TYPE_FP32", "tensor(double)": "TYPE_FP64",
    "tensor(string)": "TYPE_STRING", "tensor(bfloat16)": "TYPE_BF16",
}


def _error(field: str, message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", f"{field}: {message}")


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxBackend(ScheduledBackend):
    """Backend "onnxruntime" / platform "onnxruntime_onnx"."""

    def __init__(self, config: mc.ModelConfig, model_dir: Path, version: int) -> None:
        super().__init__(config, model_dir, version)
        self._path: Path | None = None

    def model_path(self) -> Path:
        return Path(self.model_dir) / str(self.version) / (
            self.config.default_model_filename or "model.onnx")

    def cuda_count(self) -> int:
        if not _cuda_available():
            return 0
        try:
            import torch

            return torch.cuda.device_count()
        except ImportError:
            return 1

    def _session(self, device: str) -> Any:
        import onnxruntime as ort

        assert self._path is not None
        options = ort.SessionOptions()
        params = self.config.parameters
        if "intra_op_thread_count" in params:
            options.intra_op_num_threads = int(params["intra_op_thread_count"].string_value)
        options_kw: list[dict] | None = None
        if device.startswith("cuda") and _cuda_available():
            options_kw = [{"device_id": int(device.split(":")[1])}, {}]
        return ort.InferenceSession(str(self._path), options, providers=_providers(device),
                                    provider_options=options_kw)

    def check_config(self) -> None:
        path = self.model_path()
        if not path.is_file():
            raise ServingError("NOT_FOUND", f"model file {path} not found")
        self._path = path
        try:
            session = self._session("cpu")
        except Exception as exc:
            raise ServingError("INVALID_ARGUMENT", f"cannot load {path}: {exc!r}") from exc
        model_inputs = {i.name: i for i in session.get_inputs()}
        model_outputs = {o.name: o for o in session.get_outputs()}
        for spec in self.config.input:
            self._check("input", spec, model_inputs)
        for spec in self.config.output:
            self._check("output", spec, model_outputs)
        names = {spec.name for spec in self.config.input}
        missing = [n for n in model_inputs if n not in names]
        if missing:
            raise _error("input", f"model inputs {missing} have no config input")

    def _check(self, kind: str, spec: Any, model: dict[str, Any]) -> None:
        info = model.get(spec.name)
        if info is None:
            raise _error(f"{kind} '{spec.name}' name",
                         f"the model has no such {kind} (model {kind}s: {list(model)})")
        have = _ORT_TYPES.get(info.type, info.type)
        if have != type_name(spec.data_type):
            raise _error(f"{kind} '{spec.name}' data_type",
                         f"model uses {have}, config says {type_name(spec.data_type)}")
        dims = list(spec.reshape.shape) if spec.HasField("reshape") else list(spec.dims)
        expected = full_dims(self.config, dims)
        shape = list(info.shape)
        if len(shape) != len(expected):
            field = "max_batch_size" if abs(len(shape) - len(expected)) == 1 else "dims"
            raise _error(f"{kind} '{spec.name}' {field}",
                         f"model shape {shape} does not fit config {expected} "
                         f"(max_batch_size {self.config.max_batch_size})")
        if self.config.max_batch_size > 1 and isinstance(shape[0], int) and shape[0] > 0:
            raise _error(f"{kind} '{spec.name}' max_batch_size",
                         f"the model's first dim is fixed to {shape[0]}, so it cannot batch "
                         f"up to {self.config.max_batch_size}")
        if not dims_match(expected, shape):
            raise _error(f"{kind} '{spec.name}' dims",
                         f"model shape {shape} does not fit config {expected}")

    def create_instance(self, index: int, device: str) -> BatchedInstance:
        session = self._session(device)
        names = [spec.name for spec in self.config.output]

        def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            feed = {k: _from_wire(v) for k, v in inputs.items()}
            results = session.run(names, feed)
            return {name: _to_wire(r) for name, r in zip(names, results, strict=True)}

        return BatchedInstance(self.config, run)


def _from_wire(array: np.ndarray) -> np.ndarray:
    """BYTES inputs arrive as object arrays of bytes; onnxruntime wants str objects."""
    if array.dtype != np.object_:
        return array
    flat = [v.decode() if isinstance(v, bytes) else v for v in array.flat]
    return np.array(flat, dtype=np.object_).reshape(array.shape)


def _to_wire(array: Any) -> np.ndarray:
    """onnxruntime returns strings as str objects; the wire wants bytes."""
    array = np.asarray(array)
    if array.dtype == np.object_ or array.dtype.kind == "U":
        flat = [v.encode() if isinstance(v, str) else bytes(v) for v in array.flat]
        return np.array(flat, dtype=np.object_).reshape(array.shape)
    return array
