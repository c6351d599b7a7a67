"""The python backend: typed PythonModel models, unchanged Triton pb_utils models, decoupled
streaming, config JSON handed to initialize, and load/request errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.backends.python import PythonBackend
from serving.python_model import call_model, model_args
from serving.types import ServingError
from tests.backend_helpers import CollectSink, make_request, parse_config, write_model

ADD_SUB_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: {mbs}
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }},
        {{ name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }},
         {{ name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] }} ]
instance_group [ {{ kind: KIND_CPU }} ]
"""

# Triton's own python_backend example (examples/add_sub/model.py), unchanged apart from layout.
TRITON_ADD_SUB = '''
import json
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = model_config = json.loads(args["model_config"])
        output0_config = pb_utils.get_output_config_by_name(model_config, "OUTPUT0")
        output1_config = pb_utils.get_output_config_by_name(model_config, "OUTPUT1")
        self.output0_dtype = pb_utils.triton_string_to_numpy(output0_config["data_type"])
        self.output1_dtype = pb_utils.triton_string_to_numpy(output1_config["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            in_0 = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            in_1 = pb_utils.get_input_tensor_by_name(request, "INPUT1")
            out_0, out_1 = (in_0.as_numpy() + in_1.as_numpy(),
                            in_0.as_numpy() - in_1.as_numpy())
            out_tensor_0 = pb_utils.Tensor("OUTPUT0", out_0.astype(self.output0_dtype))
            out_tensor_1 = pb_utils.Tensor("OUTPUT1", out_1.astype(self.output1_dtype))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out_tensor_0,
                                                                        out_tensor_1]))
        return responses

    def finalize(self):
        print("Cleaning up...")
'''

TYPED_ADD_SUB = '''
from pathlib import Path

import numpy as np

from serving.python_model import InferenceResponse, PythonModel, Tensor


class AddSub(PythonModel):
    def initialize(self, args: dict[str, str]) -> None:
        super().initialize(args)
        self.marker = Path(args["model_repository"]) / "finalized"

    def execute(self, requests):
        out = []
        for request in requests:
            a, b = (t.as_numpy() for t in request.inputs())
            out.append(InferenceResponse([Tensor("OUTPUT0", a + b), Tensor("OUTPUT1", a - b)]))
        return out

    def finalize(self) -> None:
        self.marker.write_text("done")
'''

# Triton's decoupled "repeat" example pattern: a thread streams one response per element.
TRITON_REPEAT = '''
import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise pb_utils.TritonModelException("repeat needs the decoupled policy")

    def execute(self, requests):
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            sender = request.get_response_sender()
            threading.Thread(target=self.stream, args=(sender, values)).start()
        return None

    def stream(self, sender, values):
        for value in values:
            out = pb_utils.Tensor("OUT", np.array([value], np.int32))
            sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''

REPEAT_CONFIG = """
name: "{name}"
backend: "python"
model_transaction_policy {{ decoupled: true }}
input [ {{ name: "IN" data_type: TYPE_INT32 dims: [ -1 ] }} ]
output [ {{ name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] }} ]
"""


def _load(tmp_path, name, config, source, **fmt):
    model_dir = write_model(tmp_path, name, config.format(name=name, **fmt),
                            {"model.py": source})
    backend = PythonBackend(parse_config(config.format(name=name, **fmt)), model_dir, 1)
    backend.load()
    return backend


@pytest.mark.parametrize("source", [TRITON_ADD_SUB, TYPED_ADD_SUB], ids=["pb_utils", "typed"])
def test_add_sub_through_backend(tmp_path, source):
    backend = _load(tmp_path, "add_sub", ADD_SUB_CONFIG, source, mbs=0)
    a = np.random.rand(4).astype(np.float32)
    b = np.random.rand(4).astype(np.float32)
    sink = CollectSink()
    backend.submit(make_request("add_sub", INPUT0=a, INPUT1=b), sink)
    out = sink.outputs()
    np.testing.assert_allclose(out["OUTPUT0"], a + b)
    np.testing.assert_allclose(out["OUTPUT1"], a - b)
    only = CollectSink()
    backend.submit(make_request("add_sub", outputs=["OUTPUT1"], INPUT0=a, INPUT1=b), only)
    assert list(only.outputs()) == ["OUTPUT1"]
    backend.unload()


def test_typed_model_runs_without_server_and_finalizes(tmp_path):
    backend = _load(tmp_path, "typed", ADD_SUB_CONFIG, TYPED_ADD_SUB, mbs=8)
    backend.unload()
    assert (tmp_path / "typed" / "finalized").read_text() == "done"
    # The same class, driven directly through the lifecycle with no backend at all.
    namespace: dict = {}
    exec(compile(TYPED_ADD_SUB, "model.py", "exec"), namespace)
    model = namespace["AddSub"]()
    config = parse_config(ADD_SUB_CONFIG.format(name="typed", mbs=8))
    model.initialize(model_args(config, tmp_path / "typed", 1))
    a = np.ones((2, 4), np.float32)
    [out] = call_model(model, {"INPUT0": a, "INPUT1": 2 * a})
    np.testing.assert_allclose(out["OUTPUT0"], 3 * a)
    assert model.model_config["max_batch_size"] == 8
    assert model.model_config["input"][0]["dims"] == [4]
    assert model.model_config["input"][0]["data_type"] == "TYPE_FP32"


def test_decoupled_streams_every_response_then_final(tmp_path):
    backend = _load(tmp_path, "repeat", REPEAT_CONFIG, TRITON_REPEAT)
    values = np.array([5, 7, 11], np.int32)
    sink = CollectSink()
    backend.submit(make_request("repeat", IN=values), sink)
    responses = sink.wait()
    assert [int(r.outputs["OUT"][0]) for r in responses] == values.tolist()
    backend.unload()


def test_decoupled_model_refuses_plain_config(tmp_path):
    config = REPEAT_CONFIG.replace("model_transaction_policy {{ decoupled: true }}", "")
    with pytest.raises(ServingError, match="decoupled"):
        _load(tmp_path, "repeat", config, TRITON_REPEAT)


def test_bytes_in_and_out(tmp_path):
    source = '''
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            text = pb_utils.get_input_tensor_by_name(r, "TEXT").as_numpy()
            upper = np.array([t.decode().upper() for t in text.flat], dtype=object)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("UPPER", upper)]))
        return out
'''
    config = """
name: "{name}"
backend: "python"
input [ {{ name: "TEXT" data_type: TYPE_STRING dims: [ -1 ] }} ]
output [ {{ name: "UPPER" data_type: TYPE_STRING dims: [ -1 ] }} ]
"""
    backend = _load(tmp_path, "upper", config, source)
    sink = CollectSink()
    backend.submit(make_request("upper", TEXT=np.array([b"ab", b"cd"], dtype=object)), sink)
    assert sink.outputs()["UPPER"].tolist() == [b"AB", b"CD"]
    backend.unload()


def test_errors_are_reported(tmp_path):
    source = '''
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            if x.sum() < 0:
                raise ValueError("negative input")
            out.append(pb_utils.InferenceResponse(
                error=pb_utils.TritonError("bad input", pb_utils.TritonError.INVALID_ARG)))
        return out
'''
    backend = _load(tmp_path, "err", ADD_SUB_CONFIG, source, mbs=4)
    x = np.ones((1, 4), np.float32)
    sink = CollectSink()
    backend.submit(make_request("err", INPUT0=x, INPUT1=x), sink)
    err = sink.error()
    assert (err.status, err.message) == ("INVALID_ARGUMENT", "bad input")
    sink = CollectSink()
    backend.submit(make_request("err", INPUT0=-x, INPUT1=x), sink)
    assert "negative input" in sink.error().message
    sink = CollectSink()
    backend.submit(make_request("err", INPUT0=x.astype(np.int32), INPUT1=x), sink)
    assert sink.error().status == "INVALID_ARGUMENT" and "TYPE_FP32" in sink.error().message
    sink = CollectSink()
    backend.submit(make_request("err", INPUT0=np.ones((5, 4), np.float32),
                                INPUT1=np.ones((5, 4), np.float32)), sink)
    assert "max_batch_size" in sink.error().message
    backend.unload()


def test_load_errors(tmp_path):
    config = ADD_SUB_CONFIG.format(name="missing", mbs=0)
    backend = PythonBackend(parse_config(config), tmp_path / "missing", 1)
    with pytest.raises(ServingError, match="not found"):
        backend.load()
    broken = "class TritonPythonModel:\n    def initialize(self, args):\n        1 / 0\n"
    with pytest.raises(ServingError, match="ZeroDivisionError"):
        _load(tmp_path, "broken", ADD_SUB_CONFIG, broken, mbs=0)
    args = model_args(parse_config(config), tmp_path, 3)
    assert json.loads(args["model_config"])["name"] == "missing"
    assert args["model_version"] == "3"
