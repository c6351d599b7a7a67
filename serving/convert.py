"""KServe v2 tensors <-> numpy: request decoding (typed contents or raw bytes, BYTES as 4-byte
little-endian length-prefixed elements), checks against the model config, response encoding."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from serving.types import InferRequest, InferResponse, ServingError

# KServe datatype -> numpy dtype (BF16 travels as float32 on our side)
NP_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object), "BF16": np.dtype(np.float32),
}
# where typed (non-raw) contents live in InferTensorContents
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
    "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def config_datatype(data_type: int) -> str:
    """model_config DataType enum -> KServe datatype string (TYPE_STRING -> BYTES)."""
    name = mc.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def datatype_of(array: np.ndarray) -> str:
    """The KServe datatype of a numpy array (object/bytes/str arrays are BYTES)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    for name, dt in NP_DTYPES.items():
        if dt == array.dtype and name not in ("BF16", "BYTES"):
            return name
    raise ServingError("INTERNAL", f"no KServe datatype for numpy dtype {array.dtype}")


# --- BYTES ------------------------------------------------------------------------------------
def deserialize_bytes(raw: bytes, count: int, name: str) -> np.ndarray:
    """Split length-prefixed BYTES data into `count` elements; error on any malformed length."""
    if count * 4 > len(raw):  # checked before allocating: a huge shape must not cost memory
        raise ServingError("INVALID_ARGUMENT", f"input '{name}': {len(raw)} bytes cannot hold "
                           f"{count} length-prefixed BYTES elements")
    out = np.empty(count, dtype=object)
    pos, view = 0, memoryview(raw)
    for i in range(count):
        if pos + 4 > len(raw):
            raise ServingError("INVALID_ARGUMENT", f"input '{name}': BYTES data ends inside the "
                               f"length prefix of element {i} (expected {count} elements)")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ServingError("INVALID_ARGUMENT", f"input '{name}': BYTES element {i} claims "
                               f"{n} bytes but only {len(raw) - pos} remain")
        out[i] = bytes(view[pos:pos + n])
        pos += n
    if pos != len(raw):
        raise ServingError("INVALID_ARGUMENT", f"input '{name}': {len(raw) - pos} bytes left "
                           f"over after {count} BYTES elements")
    return out


def serialize_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


# --- requests ---------------------------------------------------------------------------------
def _count(shape: Iterable[int], name: str) -> int:
    shape = list(shape)
    if any(d < 0 for d in shape):
        raise ServingError("INVALID_ARGUMENT", f"input '{name}': negative dimension in shape "
                           f"{shape}")
    return math.prod(shape)  # Python ints: a huge shape cannot overflow into a small count


def _from_raw(raw: bytes, datatype: str, shape: list[int], name: str) -> np.ndarray:
    count = _count(shape, name)
    if datatype == "BYTES":
        return deserialize_bytes(raw, count, name).reshape(shape)
    wire = np.dtype(np.uint16) if datatype == "BF16" else NP_DTYPES[datatype]
    if len(raw) != count * wire.itemsize:
        raise ServingError("INVALID_ARGUMENT", f"input '{name}': {len(raw)} bytes of raw data "
                           f"for shape {shape} of {datatype} (expected {count * wire.itemsize})")
    arr = np.frombuffer(raw, dtype=wire.newbyteorder("<"))
    if datatype == "BF16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(NP_DTYPES[datatype]).reshape(shape)


def _from_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> np.ndarray:
    name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise ServingError("INVALID_ARGUMENT", f"input '{name}': {datatype} data must be sent "
                           "as raw_input_contents")
    values = list(getattr(tensor.contents, field))
    count = _count(shape, name)
    if len(values) != count:
        raise ServingError("INVALID_ARGUMENT", f"input '{name}': {len(values)} values in "
                           f"contents for shape {shape} ({count} expected)")
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = [bytes(v) for v in values]
        return arr.reshape(shape)
    try:
        return np.array(values, dtype=NP_DTYPES[datatype]).reshape(shape)
    except OverflowError as e:
        raise ServingError("INVALID_ARGUMENT", f"input '{name}': value out of range for "
                           f"{datatype}") from e


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Every input tensor of `request` as a numpy array (no config checks yet)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ServingError("INVALID_ARGUMENT", f"{len(raw)} raw_input_contents for "
                           f"{len(request.inputs)} inputs; send raw data for every input or none")
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in out:
            raise ServingError("INVALID_ARGUMENT", f"input '{tensor.name}' appears twice")
        if tensor.datatype not in NP_DTYPES:
            raise ServingError("INVALID_ARGUMENT", f"input '{tensor.name}': unknown datatype "
                               f"'{tensor.datatype}'")
        if raw:
            out[tensor.name] = _from_raw(raw[i], tensor.datatype, list(tensor.shape), tensor.name)
        else:
            out[tensor.name] = _from_contents(tensor)
    return out


def _shape_ok(shape: list[int], dims: list[int]) -> bool:
    if len(shape) != len(dims):
        return False
    return all(d == -1 or d == s for s, d in zip(shape, dims, strict=True))


def check_inputs(config: mc.ModelConfig, request: pb.ModelInferRequest) -> None:
    """Names, datatypes and shapes of the request's inputs against the model config."""
    spec = {i.name: i for i in config.input}
    model = config.name
    for tensor in request.inputs:
        cfg = spec.get(tensor.name)
        if cfg is None:
            raise ServingError("INVALID_ARGUMENT", f"unexpected inference input '{tensor.name}' "
                               f"for model '{model}'; it has {sorted(spec)}")
        want = config_datatype(cfg.data_type)
        if tensor.datatype != want:
            raise ServingError("INVALID_ARGUMENT", f"input '{tensor.name}' of model '{model}' "
                               f"has datatype {tensor.datatype}, expected {want}")
        shape, dims = list(tensor.shape), list(cfg.dims)
        if config.max_batch_size > 0:
            if not shape or not 1 <= shape[0] <= config.max_batch_size:
                raise ServingError("INVALID_ARGUMENT", f"input '{tensor.name}' of model "
                                   f"'{model}': batch size {shape[:1]} must be in 1.."
                                   f"{config.max_batch_size}")
            shape = shape[1:]
        if not _shape_ok(shape, dims):
            expected = _expected(config, dims)
            raise ServingError("INVALID_ARGUMENT", f"input '{tensor.name}' of model '{model}' "
                               f"has shape {list(tensor.shape)}, expected {expected}")
    given = {t.name for t in request.inputs}
    missing = [i.name for i in config.input if not i.optional and i.name not in given]
    if missing:
        raise ServingError("INVALID_ARGUMENT", f"model '{model}' expects input(s) {missing}, "
                           "which the request lacks")


def _expected(config: mc.ModelConfig, dims: list[int]) -> list[int]:
    return ([-1] if config.max_batch_size > 0 else []) + dims


def check_outputs(config: mc.ModelConfig, request: pb.ModelInferRequest) -> list[str] | None:
    """The requested output names (None: all), each checked against the config."""
    if not request.outputs:
        return None
    known = {o.name for o in config.output}
    names = [o.name for o in request.outputs]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ServingError("INVALID_ARGUMENT", f"unknown requested output(s) {unknown} for model "
                           f"'{config.name}'; it has {sorted(known)}")
    return names


def json_kind_ok(value: Any, kind: type) -> bool:
    """Whether a decoded JSON value has the kind a typed input needs: bool only for bool, an
    int (not a bool) for int, any number (not a bool) for float."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if kind is float else isinstance(value, int)


def param_value(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def set_param(p: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def to_infer_request(request: pb.ModelInferRequest, config: mc.ModelConfig, version: str,
                     unary: bool) -> InferRequest:
    """A checked, decoded InferRequest for the backend."""
    check_inputs(config, request)
    outputs = check_outputs(config, request)
    params = {k: param_value(v) for k, v in request.parameters.items()}
    return InferRequest(model_name=config.name, model_version=version,
                        inputs=decode_inputs(request), id=request.id, requested_outputs=outputs,
                        parameters=params, priority=_int_param(params, "priority"),
                        timeout_us=_int_param(params, "timeout"), unary=unary)


def _int_param(params: Mapping[str, Any], key: str) -> int:
    """A non-negative integer request parameter (0 when absent)."""
    value = params.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ServingError("INVALID_ARGUMENT", f"request parameter '{key}' must be a "
                           f"non-negative integer, got {value!r}")
    return value


# --- responses --------------------------------------------------------------------------------
def raw_contents(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes(array)
    if datatype == "BF16":
        return (np.ascontiguousarray(array, dtype=np.float32).view(np.uint32) >> 16).astype(
            "<u2").tobytes()
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()


def to_infer_response(resp: InferResponse, model: str, version: str, request_id: str,
                      wanted: list[str] | None, params: Mapping[str, Any] | None = None
                      ) -> pb.ModelInferResponse:
    """Encode a backend response (outputs as raw little-endian contents, like Triton)."""
    out = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for name, array in resp.outputs.items():
        if wanted is not None and name not in wanted:
            continue
        array = np.asarray(array)
        datatype = datatype_of(array)
        # name, datatype and shape here; the data goes to raw_output_contents, in order
        out.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        out.raw_output_contents.append(raw_contents(array, datatype))
    for key, value in {**resp.parameters, **(params or {})}.items():
        set_param(out.parameters[key], value)
    return out
