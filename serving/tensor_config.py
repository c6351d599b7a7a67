"""Tensor helpers shared by the backends: Triton data types, request validation against the
model config, and splitting/joining of batched tensors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from serving.types import InferRequest, ServingError

_NUMPY_OF_TYPE: dict[str, type | None] = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
    "TYPE_BF16": None,
}


def type_name(data_type: int) -> str:
    """The config name ("TYPE_FP32") of a `DataType` enum value."""
    return mc.DataType.Name(data_type)


def numpy_dtype(data_type: int | str) -> np.dtype:
    """The numpy dtype for a config data type (enum value or "TYPE_..." name)."""
    name = data_type if isinstance(data_type, str) else type_name(data_type)
    if not name.startswith("TYPE_"):
        name = "TYPE_" + name
    np_type = _NUMPY_OF_TYPE.get(name)
    if np_type is None:
        raise ServingError("UNIMPLEMENTED", f"data type {name} has no numpy equivalent")
    return np.dtype(np_type)


def config_type_of(dtype: np.dtype) -> str:
    """The config name of a numpy dtype (object and bytes arrays are TYPE_STRING)."""
    dtype = np.dtype(dtype)
    if dtype.kind in ("O", "S", "U"):
        return "TYPE_STRING"
    for name, np_type in _NUMPY_OF_TYPE.items():
        if np_type is not None and np_type is not np.object_ and np.dtype(np_type) == dtype:
            return name
    raise ServingError("INVALID_ARGUMENT", f"unsupported dtype {dtype}")


def full_dims(config: mc.ModelConfig, dims: Sequence[int]) -> list[int]:
    """Config dims with the implicit batch dimension (-1) prepended when the model batches."""
    return ([-1] if config.max_batch_size > 0 else []) + list(dims)


def dims_match(expected: Sequence[int], actual: Sequence[int]) -> bool:
    """Whether a shape fits config dims, where -1 (or None / a symbol) matches any size."""
    if len(expected) != len(actual):
        return False
    return all(e in (-1, None) or a in (-1, None) or not isinstance(e, int)
               or not isinstance(a, int) or e == a for e, a in zip(expected, actual, strict=True))


def _check_input(config: mc.ModelConfig, spec: mc.ModelInput, array: np.ndarray) -> int:
    """Check one input tensor against its config; return its batch size (1 if not batching)."""
    want = numpy_dtype(spec.data_type)
    got_ok = (array.dtype.kind in ("O", "S", "U")) if want == np.object_ else array.dtype == want
    if not got_ok:
        raise ServingError("INVALID_ARGUMENT",
                           f"input '{spec.name}' of model '{config.name}' expects "
                           f"{type_name(spec.data_type)}, got {config_type_of(array.dtype)}")
    expected = full_dims(config, spec.dims)
    if not dims_match(expected, array.shape):
        raise ServingError("INVALID_ARGUMENT",
                           f"input '{spec.name}' of model '{config.name}' has shape "
                           f"{list(array.shape)}, expected {expected}")
    if config.max_batch_size > 0:
        batch = int(array.shape[0])
        if batch < 1 or batch > config.max_batch_size:
            raise ServingError("INVALID_ARGUMENT",
                               f"input '{spec.name}' batch size {batch} exceeds max_batch_size "
                               f"{config.max_batch_size} of model '{config.name}'")
        return batch
    return 1


def validate_request(config: mc.ModelConfig, request: InferRequest) -> int:
    """Check a request's inputs against the config (names, dtypes, dims, batch size).

    Returns the request's batch size; raises ServingError("INVALID_ARGUMENT") naming the problem.
    """
    specs = {spec.name: spec for spec in config.input}
    for name in request.inputs:
        if name not in specs:
            raise ServingError("INVALID_ARGUMENT",
                               f"unexpected input '{name}' for model '{config.name}'")
    batch = None
    for spec in config.input:
        array = request.inputs.get(spec.name)
        if array is None:
            if spec.optional:
                continue
            raise ServingError("INVALID_ARGUMENT",
                               f"missing input '{spec.name}' for model '{config.name}'")
        size = _check_input(config, spec, array)
        if batch is not None and size != batch:
            raise ServingError("INVALID_ARGUMENT",
                               f"inputs of model '{config.name}' disagree on batch size")
        batch = size
    outputs = {spec.name for spec in config.output}
    for name in request.requested_outputs or []:
        if name not in outputs:
            raise ServingError("INVALID_ARGUMENT",
                               f"unknown output '{name}' requested from model '{config.name}'")
    return batch or 1


def apply_reshape(config: mc.ModelConfig, inputs: dict[str, np.ndarray]) -> dict:
    """Reshape inputs whose config has `reshape { shape }` to the shape the model expects."""
    out = dict(inputs)
    for spec in config.input:
        if spec.HasField("reshape") and spec.name in out:
            lead = list(out[spec.name].shape[:1]) if config.max_batch_size > 0 else []
            out[spec.name] = out[spec.name].reshape(lead + list(spec.reshape.shape))
    return out


def batch_key(request: InferRequest) -> tuple:
    """Requests may share a batch when their inputs agree on names, dtypes and non-batch dims."""
    return tuple(sorted((name, array.dtype.str, array.shape[1:])
                        for name, array in request.inputs.items()))


def concat_inputs(requests: Sequence[InferRequest]) -> dict[str, np.ndarray]:
    """Join the requests' inputs along the batch dimension."""
    if len(requests) == 1:
        return dict(requests[0].inputs)
    names = requests[0].inputs.keys()
    return {name: np.concatenate([r.inputs[name] for r in requests], axis=0) for name in names}


def split_outputs(outputs: dict[str, np.ndarray], sizes: Sequence[int]) -> list[dict]:
    """Split batched outputs back into one dict per request of the given batch sizes."""
    bounds = np.cumsum([0, *sizes])
    return [{name: array[bounds[i]:bounds[i + 1]] for name, array in outputs.items()}
            for i in range(len(sizes))]


def select_outputs(outputs: dict[str, np.ndarray],
                   requested: Sequence[str] | None) -> dict[str, np.ndarray]:
    """Keep only the requested outputs (all of them when none were named)."""
    if not requested:
        return outputs
    return {name: outputs[name] for name in requested if name in outputs}
