"""KServe v2 REST bodies <-> the front's requests and responses: JSON tensors, Triton's binary
tensor data extension (a JSON header of `Inference-Header-Content-Length` bytes followed by raw
tensors), the classification extension, and protobuf messages as Triton's JSON.

A REST request becomes the same `ModelInferRequest` message the gRPC front decodes (every tensor
as raw contents), so one set of checks (names, datatypes, shapes, missing inputs) serves both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from serving.convert import NP_DTYPES, datatype_of, json_kind_ok, raw_contents, set_param
from serving.types import InferResponse, ServingError

HEADER_LENGTH = "Inference-Header-Content-Length"
REQUEST_KEYS = {"id", "parameters", "inputs", "outputs"}
INPUT_KEYS = {"name", "shape", "datatype", "parameters", "data"}
OUTPUT_KEYS = {"name", "parameters"}
BINARY_ONLY = ("BF16",)  # no JSON form in Triton either: binary data only


def _bad(message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", message)


def parse_json(raw: bytes, what: str = "request") -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(f"failed to parse the {what} JSON: {e}") from None


def _keys(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _bad(f"{where} must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _bad(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    return obj


def _params(obj: Any, where: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise _bad(f"{where}: 'parameters' must be a JSON object")
    for k, v in obj.items():
        if not isinstance(v, (bool, int, float, str)):
            raise _bad(f"{where}: parameter '{k}' must be a bool, number or string")
    return obj


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [x for item in data for x in _flatten(item)]
    return [data]


def json_tensor(data: Any, datatype: str, shape: list[int], name: str) -> bytes:
    """JSON `data` (flat or nested, row-major) as raw little-endian bytes."""
    if datatype in BINARY_ONLY:
        raise _bad(f"input '{name}': {datatype} data must be sent as binary data")
    values = _flatten(data)
    count = math.prod(shape)
    if len(values) != count:
        raise _bad(f"input '{name}': {len(values)} values in 'data' for shape {shape} "
                   f"({count} expected)")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise _bad(f"input '{name}': BYTES data must be JSON strings")
        arr = np.empty(count, dtype=object)
        arr[:] = [v.encode("utf-8") for v in values]
        return raw_contents(arr, "BYTES")
    kind = bool if datatype == "BOOL" else (float if datatype.startswith("FP") else int)
    for v in values:
        if not json_kind_ok(v, kind):
            raise _bad(f"input '{name}': {datatype} data holds {json.dumps(v)}, expected "
                       f"{'true/false' if kind is bool else kind.__name__} values")
    try:
        arr = np.array(values, dtype=NP_DTYPES[datatype])
    except (OverflowError, ValueError):
        raise _bad(f"input '{name}': value out of range for {datatype}") from None
    return raw_contents(arr, datatype)


def _shape(tensor: dict[str, Any], name: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise _bad(f"input '{name}': 'shape' must be a list of integers")
    if any(d < 0 for d in shape):
        raise _bad(f"input '{name}': negative dimension in shape {shape}")
    return shape


def _input(tensor: Any, i: int, blob: memoryview, pos: int,
           msg: pb.ModelInferRequest) -> int:
    """Add input `tensor` to `msg`; binary data is read from blob[pos:]; returns the new pos."""
    _keys(tensor, INPUT_KEYS, f"input {i}")
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(f"input {i}: 'name' must be a non-empty string")
    datatype = tensor.get("datatype")
    if datatype not in NP_DTYPES:
        raise _bad(f"input '{name}': unknown datatype {datatype!r}")
    shape = _shape(tensor, name)
    params = _params(tensor.get("parameters"), f"input '{name}'")
    size = params.pop("binary_data_size", None)
    t = msg.inputs.add(name=name, datatype=datatype, shape=shape)
    for k, v in params.items():
        set_param(t.parameters[k], v)
    if size is not None:
        if "data" in tensor:
            raise _bad(f"input '{name}': both 'data' and 'binary_data_size' given")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _bad(f"input '{name}': 'binary_data_size' must be a non-negative integer")
        if pos + size > len(blob):
            raise _bad(f"input '{name}': binary_data_size {size} but only {len(blob) - pos} "
                       "bytes of binary data remain")
        msg.raw_input_contents.append(bytes(blob[pos:pos + size]))
        return pos + size
    if "data" not in tensor:
        raise _bad(f"input '{name}' has neither 'data' nor a 'binary_data_size' parameter")
    msg.raw_input_contents.append(json_tensor(tensor["data"], datatype, shape, name))
    return pos


class Wanted:
    """What the client asked of the outputs: names, binary or JSON, classification counts."""

    def __init__(self, names: list[str] | None, binary: dict[str, bool], default_binary: bool,
                 classes: dict[str, int]) -> None:
        self.names, self.binary, self.default_binary = names, binary, default_binary
        self.classes = classes

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.default_binary)


def _outputs(raw: Any, msg: pb.ModelInferRequest, default_binary: bool) -> Wanted:
    if raw is None:
        return Wanted(None, {}, default_binary, {})
    if not isinstance(raw, list):
        raise _bad("'outputs' must be a list")
    binary: dict[str, bool] = {}
    classes: dict[str, int] = {}
    for i, out in enumerate(raw):
        _keys(out, OUTPUT_KEYS, f"output {i}")
        name = out.get("name")
        if not isinstance(name, str):
            raise _bad(f"output {i}: 'name' must be a string")
        params = _params(out.get("parameters"), f"output '{name}'")
        if "binary_data" in params:
            if not isinstance(params["binary_data"], bool):
                raise _bad(f"output '{name}': 'binary_data' must be true or false")
            binary[name] = params["binary_data"]
        if "classification" in params:
            k = params["classification"]
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise _bad(f"output '{name}': 'classification' must be an integer >= 1")
            classes[name] = k
        msg.outputs.add(name=name)
    return Wanted([o.name for o in msg.outputs], binary, default_binary, classes)


def parse_infer(body: bytes, header_length: str | None, model: str, version: str
                ) -> tuple[pb.ModelInferRequest, Wanted]:
    """A REST infer body as a ModelInferRequest (all tensors raw) and the output wishes."""
    blob = memoryview(body)
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise _bad(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise _bad(f"{HEADER_LENGTH} {n} is outside the body's {len(body)} bytes")
        head, blob = body[:n], blob[n:]
    else:
        head, blob = body, blob[len(body):]
    obj = _keys(parse_json(head), REQUEST_KEYS, "the request")
    request_id = obj.get("id", "")
    if not isinstance(request_id, str):
        raise _bad("'id' must be a string")
    params = dict(_params(obj.get("parameters"), "the request"))
    default_binary = params.pop("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise _bad("'binary_data_output' must be true or false")
    msg = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for k, v in params.items():
        set_param(msg.parameters[k], v)
    inputs = obj.get("inputs")
    if not isinstance(inputs, list):
        raise _bad("the request needs 'inputs', a list of tensors")
    pos = 0
    for i, tensor in enumerate(inputs):
        pos = _input(tensor, i, blob, pos, msg)
    if pos != len(blob):
        raise _bad(f"{len(blob) - pos} bytes of binary data left over after the inputs")
    return msg, _outputs(obj.get("outputs"), msg, default_binary)


# --- responses --------------------------------------------------------------------------------
def _json_data(array: np.ndarray, datatype: str) -> list[Any]:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [(v if isinstance(v, bytes) else str(v).encode()).decode("utf-8", "replace")
                for v in flat]
    return flat.tolist()


def classify(array: np.ndarray, k: int, labels: list[str] | None,
             batched: bool) -> np.ndarray:
    """Triton's classification: the top k of each batch row as "value:index[:label]"."""
    rows = array.reshape(array.shape[0], -1) if batched and array.ndim > 1 else (
        array.reshape(1, -1))
    out = []
    for row in rows:
        k_row = min(k, row.size)
        order = np.argsort(-row.astype(np.float64), kind="stable")[:k_row]
        out.append([f"{float(row[i]):.6g}:{int(i)}" + (
            f":{labels[i]}" if labels and i < len(labels) else "") for i in order])
    arr = np.array([[s.encode() for s in r] for r in out], dtype=object)
    return arr if batched and array.ndim > 1 else arr.reshape(-1)


def labels_of(config: mc.ModelConfig, model_dir: Path, output: str) -> list[str] | None:
    for o in config.output:
        if o.name == output and o.label_filename:
            path = model_dir / o.label_filename
            if path.is_file():
                return path.read_text(encoding="utf-8").splitlines()
    return None


def encode_infer(resp: InferResponse, model: str, version: str, request_id: str,
                 wanted: Wanted, config: mc.ModelConfig, model_dir: Path,
                 extra: dict[str, Any] | None = None) -> tuple[bytes, int | None]:
    """A response body and, when any output is binary, the JSON header's length."""
    outputs, blobs = [], []
    bf16 = {o.name for o in config.output if o.data_type == mc.TYPE_BF16}
    for name, array in resp.outputs.items():
        if wanted.names is not None and name not in wanted.names:
            continue
        array = np.asarray(array)
        if name in wanted.classes:
            array = classify(array, wanted.classes[name], labels_of(config, model_dir, name),
                             config.max_batch_size > 0)
        datatype = "BF16" if name in bf16 and array.dtype == np.float32 else datatype_of(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if wanted.is_binary(name):
            raw = raw_contents(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_data(array, datatype)
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id:
        body["id"] = request_id
    params = {**resp.parameters, **(extra or {})}
    if params:
        body["parameters"] = params
    body["outputs"] = outputs
    head = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def proto_json(msg: Message) -> dict[str, Any]:
    """A protobuf message as Triton writes it in JSON: field names as declared, enums by name,
    64-bit integers as numbers, empty fields left out."""
    out: dict[str, Any] = {}
    for field, value in msg.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            vf = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _value(vf, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value(field, v) for v in value]
        else:
            out[field.name] = _value(field, value)
    return out


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return proto_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    if field.type == FieldDescriptor.TYPE_BYTES:
        return value.decode("utf-8", "replace")
    return value
