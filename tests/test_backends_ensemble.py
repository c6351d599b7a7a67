"""Ensembles over real python backends: dataflow through input_map/output_map, concurrent
independent steps, a decoupled middle step streaming through in order, and error reporting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.backends.python import PythonBackend
from serving.ensemble import EnsembleBackend
from serving.types import ServingError
from tests.backend_helpers import CollectSink, make_request, parse_config, write_model

# With parameter meet_dir, an execution marks its arrival there and waits until
# meet_count models have arrived: steps that are not run side by side never get through.
ARITH = '''
import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.name = args["model_name"]
        self.op = params["op"]["string_value"]
        self.meet_dir = params.get("meet_dir", {}).get("string_value", "")
        self.meet_count = int(params.get("meet_count", {}).get("string_value", "0"))

    def meet(self):
        open(os.path.join(self.meet_dir, self.name), "w").close()
        deadline = time.monotonic() + 60
        while len(os.listdir(self.meet_dir)) < self.meet_count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} ran alone: " + str(os.listdir(self.meet_dir)))
            time.sleep(0.002)

    def execute(self, requests):
        out = []
        for r in requests:
            a = pb_utils.get_input_tensor_by_name(r, "A").as_numpy()
            b = pb_utils.get_input_tensor_by_name(r, "B")
            if self.meet_dir:
                self.meet()
            if self.op == "fail":
                raise RuntimeError("step exploded")
            y = {"inc": a + 1, "double": a * 2, "fail": a}.get(self.op)
            if self.op == "add":
                y = a + b.as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", y)]))
        return out
'''


def _arith(repo: Path, name: str, op: str, meet: Path | None = None, two_inputs: bool = False,
           count: int = 1) -> PythonBackend:
    b_input = '{ name: "B" data_type: TYPE_FP32 dims: [ -1 ] }' if two_inputs else ""
    config = f"""
    name: "{name}"
    backend: "python"
    input [ {{ name: "A" data_type: TYPE_FP32 dims: [ -1 ] }} {"," if b_input else ""} {b_input} ]
    output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ -1 ] }} ]
    parameters {{ key: "op" value {{ string_value: "{op}" }} }}
    parameters {{ key: "meet_dir" value {{ string_value: "{meet or ''}" }} }}
    parameters {{ key: "meet_count" value {{ string_value: "2" }} }}
    instance_group [ {{ count: {count} kind: KIND_CPU }} ]
    """
    backend = PythonBackend(parse_config(config), write_model(repo, name, config,
                                                              {"model.py": ARITH}), 1)
    backend.load()
    return backend


DIAMOND = """
name: "diamond"
platform: "ensemble"
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] } ]
ensemble_scheduling { step [
  { model_name: "inc" model_version: -1 input_map { key: "A" value: "X" }
    output_map { key: "Y" value: "x_inc" } },
  { model_name: "double" model_version: -1 input_map { key: "A" value: "X" }
    output_map { key: "Y" value: "x_double" } },
  { model_name: "add" model_version: -1 input_map { key: "A" value: "x_inc" }
    input_map { key: "B" value: "x_double" } output_map { key: "Y" value: "OUT" } }
] }
"""


def _ensemble(text: str, models: dict) -> EnsembleBackend:
    def resolve(name: str, version: int):
        if name not in models:
            raise ServingError("NOT_FOUND", f"model '{name}' is not loaded")
        return models[name]

    backend = EnsembleBackend(parse_config(text), None, 1, resolve)
    backend.load()
    return backend


def test_diamond_dataflow_runs_independent_steps_concurrently(tmp_path: Path) -> None:
    """inc and double each wait inside execute() until the other has arrived too: the
    ensemble only answers when it runs them side by side."""
    meet = tmp_path / "meet"
    meet.mkdir()
    models = {"inc": _arith(tmp_path, "inc", "inc", meet),
              "double": _arith(tmp_path, "double", "double", meet),
              "add": _arith(tmp_path, "add", "add", two_inputs=True)}
    ens = _ensemble(DIAMOND, models)
    assert not ens.decoupled
    x = np.array([1.0, 2.5], np.float32)
    sink = CollectSink()
    ens.submit(make_request("diamond", X=x), sink)
    np.testing.assert_allclose(sink.outputs(timeout=90)["OUT"], (x + 1) + 2 * x)
    assert sorted(p.name for p in meet.iterdir()) == ["double", "inc"]
    for backend in [ens, *models.values()]:
        backend.unload()


def test_step_error_names_the_step(tmp_path):
    models = {"inc": _arith(tmp_path, "inc", "fail"),
              "double": _arith(tmp_path, "double", "double"),
              "add": _arith(tmp_path, "add", "add", two_inputs=True)}
    ens = _ensemble(DIAMOND, models)
    sink = CollectSink()
    ens.submit(make_request("diamond", X=np.ones(2, np.float32)), sink)
    err = sink.error()
    assert "step 'inc'" in err.message and "step exploded" in err.message
    for backend in [ens, *models.values()]:
        backend.unload()


@pytest.mark.parametrize(("change", "message"), [
    (("key: \"B\" value: \"x_double\"", "key: \"B\" value: \"nowhere\""),
     "input tensor 'nowhere' is never produced"),
    (("key: \"A\" value: \"X\" }\n    output_map { key: \"Y\" value: \"x_inc\"",
      "key: \"A\" value: \"OUT\" }\n    output_map { key: \"Y\" value: \"x_inc\""), "cycle"),
    (("key: \"B\" value", "key: \"C\" value"), "input_map key 'C'"),
    (("model_name: \"double\"", "model_name: \"triple\""), "'triple' is not loaded"),
])
def test_bad_graphs_fail_at_load(tmp_path, change, message):
    models = {"inc": _arith(tmp_path, "inc", "inc"), "double": _arith(tmp_path, "double", "double"),
              "add": _arith(tmp_path, "add", "add", two_inputs=True)}
    text = DIAMOND.replace(*change)
    assert text != DIAMOND
    with pytest.raises(ServingError, match=message):
        _ensemble(text, models)
    for backend in models.values():
        backend.unload()


# A stand-in for a streaming generator: one response per "token" after a small delay.
STREAMER = '''
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for r in requests:
            ids = pb_utils.get_input_tensor_by_name(r, "IDS").as_numpy()
            threading.Thread(target=self.stream, args=(r.get_response_sender(), ids)).start()

    def stream(self, sender, ids):
        for token in ids:
            time.sleep(0.01)
            sender.send(pb_utils.InferenceResponse(
                [pb_utils.Tensor("TOKEN", np.array([token], np.int32))]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''

TEXT_MODELS = '''
import random
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.name = args["model_name"]

    def execute(self, requests):
        out = []
        for r in requests:
            if self.name == "pre":
                text = pb_utils.get_input_tensor_by_name(r, "TEXT").as_numpy()[0].decode()
                y = pb_utils.Tensor("IDS", np.array([ord(c) for c in text], np.int32))
            else:
                time.sleep(random.uniform(0, 0.03))  # scramble completion order
                token = pb_utils.get_input_tensor_by_name(r, "TOKEN").as_numpy()
                y = pb_utils.Tensor("PIECE", np.array([chr(token[0]).upper().encode()], object))
            out.append(pb_utils.InferenceResponse([y]))
        return out
'''

PIPELINE = """
name: "pipeline"
platform: "ensemble"
input [ { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] } ]
ensemble_scheduling { step [
  { model_name: "pre" model_version: -1 input_map { key: "TEXT" value: "text_input" }
    output_map { key: "IDS" value: "ids" } },
  { model_name: "gen" model_version: -1 input_map { key: "IDS" value: "ids" }
    output_map { key: "TOKEN" value: "token" } },
  { model_name: "post" model_version: -1 input_map { key: "TOKEN" value: "token" }
    output_map { key: "PIECE" value: "text_output" } }
] }
"""


def _model(repo, name: str, io: tuple[str, str, str, str], source: str, extra: str = ""):
    config = f"""
    name: "{name}"
    backend: "python"
    input [ {{ name: "{io[0]}" data_type: {io[1]} dims: [ -1 ] }} ]
    output [ {{ name: "{io[2]}" data_type: {io[3]} dims: [ -1 ] }} ]
    {extra}
    """
    backend = PythonBackend(parse_config(config),
                            write_model(repo, name, config, {"model.py": source}), 1)
    backend.load()
    return backend


def test_decoupled_step_streams_through_in_order(tmp_path):
    models = {
        "pre": _model(tmp_path, "pre", ("TEXT", "TYPE_STRING", "IDS", "TYPE_INT32"), TEXT_MODELS),
        "gen": _model(tmp_path, "gen", ("IDS", "TYPE_INT32", "TOKEN", "TYPE_INT32"), STREAMER,
                      "model_transaction_policy { decoupled: true }"),
        "post": _model(tmp_path, "post", ("TOKEN", "TYPE_INT32", "PIECE", "TYPE_STRING"),
                       TEXT_MODELS, "instance_group [ { count: 3 kind: KIND_CPU } ]"),
    }
    ens = _ensemble(PIPELINE, models)
    assert ens.decoupled and ens.config.model_transaction_policy.decoupled
    sink = CollectSink()
    ens.submit(make_request("pipeline", text_input=np.array([b"streaming"], object)), sink)
    pieces = [r.outputs["text_output"][0].decode() for r in sink.wait()]
    assert "".join(pieces) == "STREAMING"
    for backend in [ens, *models.values()]:
        backend.unload()
