"""An ensemble with the giant model inside, through the server: python preprocess (prompt
template) -> the LLM at tp=2 (two ranks) streaming -> python postprocess (uppercase), streamed to
a tritonclient; its text equals the LLM's own streamed text for the same prompt, uppercased."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from configs.demo import build_demo_model
from tests.backend_helpers import write_model

# These tests drive the serving front (branch `serving`); they skip until it is merged.
serving_helpers = pytest.importorskip("tests.serving_helpers",
                                      reason="needs the serving front (serving branch)")
Server, infer_input = serving_helpers.Server, serving_helpers.infer_input
add_llm_model = pytest.importorskip("serving.cli").add_llm_model

PRE = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            text = pb_utils.get_input_tensor_by_name(r, "TEXT").as_numpy()[0].decode()
            prompt = f"Q: {text} A:".encode()
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("PROMPT", np.array([prompt], dtype=object)),
                pb_utils.Tensor("STREAM", np.array([True])),
                pb_utils.Tensor("IGNORE_EOS", np.array([True]))]))
        return out
'''

POST = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            chunk = pb_utils.get_input_tensor_by_name(r, "CHUNK").as_numpy()
            text = b"".join(chunk.ravel().tolist()).decode().upper()
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("UPPER", np.array([text.encode()], dtype=object))]))
        return out
'''

PRE_CONFIG = """
name: "pre"
backend: "python"
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "PROMPT" data_type: TYPE_STRING dims: [ 1 ] },
         { name: "STREAM" data_type: TYPE_BOOL dims: [ 1 ] },
         { name: "IGNORE_EOS" data_type: TYPE_BOOL dims: [ 1 ] } ]
"""

POST_CONFIG = """
name: "post"
backend: "python"
input [ { name: "CHUNK" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "UPPER" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
"""

ENSEMBLE = """
name: "chat"
platform: "ensemble"
input [ { name: "text" data_type: TYPE_STRING dims: [ 1 ] },
        { name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "answer" data_type: TYPE_STRING dims: [ 1 ] } ]
ensemble_scheduling { step [
  { model_name: "pre" model_version: -1 input_map { key: "TEXT" value: "text" }
    output_map { key: "PROMPT" value: "prompt" } output_map { key: "STREAM" value: "stream" }
    output_map { key: "IGNORE_EOS" value: "ignore_eos" } },
  { model_name: "llm" model_version: -1 input_map { key: "text_input" value: "prompt" }
    input_map { key: "max_tokens" value: "max_tokens" } input_map { key: "stream" value: "stream" }
    input_map { key: "ignore_eos" value: "ignore_eos" }
    output_map { key: "text_output" value: "chunk" } },
  { model_name: "post" model_version: -1 input_map { key: "CHUNK" value: "chunk" }
    output_map { key: "UPPER" value: "answer" } }
] }
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ensemble-llm")
    repo = tmp / "repo"
    demo = build_demo_model(tmp / "tiny-llama")
    add_llm_model(repo, "llm", demo, tp=2, pp=1, dtype="fp32")
    write_model(repo, "pre", PRE_CONFIG, {"model.py": PRE})
    write_model(repo, "post", POST_CONFIG, {"model.py": POST})
    (repo / "chat" / "1").mkdir(parents=True)
    (repo / "chat" / "config.pbtxt").write_text(ENSEMBLE)
    srv = Server(repo, tmp / "server.log", "--metrics-port", "0", module="launcher.cli")
    yield srv
    assert srv.stop() == 0, srv.text()


def _stream(url: str, model: str, inputs: list, output: str) -> list[str]:
    """Every non-empty streamed text piece of one request, in arrival order."""
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(lambda result, error: got.put((result, error)))
    client.async_stream_infer(model, inputs, enable_empty_final_response=True)
    pieces = []
    while True:
        result, error = got.get(timeout=60)
        assert error is None, error
        text = result.as_numpy(output)
        if text is not None and text.size:
            pieces.append(b"".join(text.ravel().tolist()).decode())
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    return pieces


def test_ensemble_streams_the_giant_models_tokens_through(server: Server) -> None:
    max_tokens = 12
    ensemble = _stream(server.url, "chat", [
        infer_input("text", np.array([b"who serves giant models"], dtype=object), "BYTES"),
        infer_input("max_tokens", np.array([max_tokens], np.int32), "INT32")], "answer")
    direct = _stream(server.url, "llm", [
        infer_input("text_input", np.array([b"Q: who serves giant models A:"], dtype=object),
                    "BYTES"),
        infer_input("max_tokens", np.array([max_tokens], np.int32), "INT32"),
        infer_input("stream", np.array([True]), "BOOL"),
        infer_input("ignore_eos", np.array([True]), "BOOL")], "text_output")
    assert len(ensemble) >= 3, ensemble  # streamed, not one final answer
    assert "".join(ensemble) == "".join(direct).upper()
    assert "".join(direct).strip()
    client = grpcclient.InferenceServerClient(server.url)
    config = client.get_model_config("chat").config
    stats = {s.name: s.inference_stats.success.count
             for s in client.get_inference_statistics().model_stats}
    client.close()
    assert config.model_transaction_policy.decoupled
    assert stats["pre"] >= 1 and stats["llm"] >= 2 and stats["post"] >= len(ensemble)
