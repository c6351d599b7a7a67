"""Triton's REST API over HTTP, driven by the real `tritonclient.http` (sync and aio) and by
plain HTTP: health, metadata, config, statistics, repository control, infer with JSON and
binary tensors (BYTES, FP16, BF16), classification, an ensemble, the generate extension with
SSE, errors as JSON with the right status while the server keeps serving, and perf_analyzer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests.backend_helpers import write_model
from tests.perf import run_perf_analyzer
from tests.serving_helpers import Server
from tests.test_backends_python import ADD_SUB_CONFIG, TRITON_ADD_SUB

IDENTITY = """
backend: "test_identity"
max_batch_size: 8
input { name: "INPUT0" data_type: TYPE_FP32 dims: [ 5 ] }
output { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 5 ] label_filename: "labels.txt" }
"""
BYTES_MODEL = """
backend: "test_identity"
input { name: "INPUT0" data_type: TYPE_STRING dims: [ -1 ] }
output { name: "OUTPUT0" data_type: TYPE_STRING dims: [ -1 ] }
"""
HALF = """
backend: "test_identity"
input { name: "A" data_type: TYPE_FP16 dims: [ 3 ] }
input { name: "B" data_type: TYPE_BF16 dims: [ 2 ] }
output { name: "X" data_type: TYPE_FP16 dims: [ 3 ] }
output { name: "Y" data_type: TYPE_BF16 dims: [ 2 ] }
"""
REPEAT = """
backend: "test_repeat"
model_transaction_policy { decoupled: true }
input { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] }
output { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] }
"""
ENSEMBLE = """
platform: "ensemble"
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] },
        { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "SUM" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling { step [
  { model_name: "add_sub" model_version: -1 input_map { key: "INPUT0" value: "X" }
    input_map { key: "INPUT1" value: "Y" } output_map { key: "OUTPUT0" value: "SUM" } }
] }
"""
LABELS = ["zero", "one", "two", "three", "four"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("http-repo")
    write_model(repo, "add_sub", ADD_SUB_CONFIG.format(name="add_sub", mbs=0),
                {"model.py": TRITON_ADD_SUB})
    write_model(repo, "identity", IDENTITY, {})
    (repo / "identity" / "labels.txt").write_text("\n".join(LABELS) + "\n")
    write_model(repo, "bytes", BYTES_MODEL, {})
    write_model(repo, "half", HALF, {})
    write_model(repo, "repeat", REPEAT, {})
    write_model(repo, "pipe", ENSEMBLE, {})
    srv = Server(repo, repo.parent / "server.log", "--model-control-mode", "explicit",
                 "--load-model", "*")
    assert srv.http_port, srv.text()
    yield srv
    assert srv.stop() == 0, srv.text()


@pytest.fixture
def http(server) -> httpclient.InferenceServerClient:
    c = httpclient.InferenceServerClient(f"localhost:{server.http_port}")
    yield c
    c.close()


def _add_sub_inputs(binary: bool) -> tuple[list, np.ndarray, np.ndarray]:
    a = np.arange(4, dtype=np.float32)
    b = np.full(4, 0.5, dtype=np.float32)
    inputs = [httpclient.InferInput("INPUT0", [4], "FP32"),
              httpclient.InferInput("INPUT1", [4], "FP32")]
    inputs[0].set_data_from_numpy(a, binary_data=binary)
    inputs[1].set_data_from_numpy(b, binary_data=binary)
    return inputs, a, b


def test_health_and_metadata(http) -> None:
    assert http.is_server_live() and http.is_server_ready()
    meta = http.get_server_metadata()
    assert meta["name"] == "shardserve" and "binary_tensor_data" in meta["extensions"]
    assert http.is_model_ready("add_sub") and http.is_model_ready("add_sub", "1")
    assert not http.is_model_ready("add_sub", "7")
    m = http.get_model_metadata("identity")
    assert m["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 5]}]
    assert m["versions"] == ["1"] and m["platform"] == "test_identity"
    cfg = http.get_model_config("identity")
    assert cfg["max_batch_size"] == 8 and cfg["input"][0]["data_type"] == "TYPE_FP32"
    assert cfg["input"][0]["dims"] == [5]  # 64-bit integers as numbers, as Triton writes them


@pytest.mark.parametrize("binary", [True, False])
def test_infer_json_and_binary(http, binary: bool) -> None:
    inputs, a, b = _add_sub_inputs(binary)
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary),
               httpclient.InferRequestedOutput("OUTPUT1", binary_data=binary)]
    result = http.infer("add_sub", inputs, outputs=outputs, request_id="r-7")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    resp = result.get_response()
    assert resp["id"] == "r-7" and resp["model_name"] == "add_sub"
    for out in resp["outputs"]:
        assert ("data" in out) != binary, out  # binary outputs travel after the JSON


def test_requested_outputs_only(http) -> None:
    inputs, a, b = _add_sub_inputs(True)
    result = http.infer("add_sub", inputs,
                        outputs=[httpclient.InferRequestedOutput("OUTPUT1")])
    assert result.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_tensors(http, binary: bool) -> None:
    data = np.array(["grüß".encode(), b"", b"x" * 300], dtype=object)
    t = httpclient.InferInput("INPUT0", [3], "BYTES")
    t.set_data_from_numpy(data, binary_data=binary)
    result = http.infer("bytes", [t], outputs=[
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)])
    got = result.as_numpy("OUTPUT0").tolist()
    # binary BYTES come back as bytes; JSON ones as the strings Triton writes
    assert got == (data.tolist() if binary else [b.decode() for b in data])


def test_fp16_and_bf16_binary(http) -> None:
    a = np.array([1.5, -2.25, 65504.0], dtype=np.float16)
    b = np.array([1.0, -3.5], dtype=np.float32)  # exactly representable in bf16
    ta = httpclient.InferInput("A", [3], "FP16")
    ta.set_data_from_numpy(a)
    tb = httpclient.InferInput("B", [2], "BF16")
    tb.set_data_from_numpy(b)
    result = http.infer("half", [ta, tb])
    np.testing.assert_array_equal(result.as_numpy("X"), a)
    assert result.as_numpy("X").dtype == np.float16
    out = {o["name"]: o for o in result.get_response()["outputs"]}
    assert out["Y"]["parameters"]["binary_data_size"] == 2 * 2  # bf16 on the wire


def test_classification_with_labels(http) -> None:
    x = np.array([[0.1, 0.9, 0.3, 0.7, 0.0]], dtype=np.float32)
    t = httpclient.InferInput("INPUT0", [1, 5], "FP32")
    t.set_data_from_numpy(x)
    result = http.infer("identity", [t], outputs=[
        httpclient.InferRequestedOutput("OUTPUT0", class_count=2)])
    got = [v.decode() for v in result.as_numpy("OUTPUT0").reshape(-1)]
    assert got == ["0.9:1:one", "0.7:3:three"]


def test_ensemble_over_http(http) -> None:
    x = np.arange(4, dtype=np.float32)
    tx, ty = httpclient.InferInput("X", [4], "FP32"), httpclient.InferInput("Y", [4], "FP32")
    tx.set_data_from_numpy(x)
    ty.set_data_from_numpy(x * 10)
    np.testing.assert_array_equal(http.infer("pipe", [tx, ty]).as_numpy("SUM"), x * 11)


def test_statistics_count_http_requests(http) -> None:
    before = http.get_inference_statistics("add_sub")["model_stats"][0]
    for _ in range(3):
        http.infer("add_sub", _add_sub_inputs(True)[0])
    after = http.get_inference_statistics("add_sub")["model_stats"][0]
    assert after["inference_count"] == before.get("inference_count", 0) + 3
    assert after["inference_stats"]["success"]["count"] == (
        before["inference_stats"]["success"].get("count", 0) + 3)
    everything = http.get_inference_statistics()["model_stats"]
    assert {s["name"] for s in everything} >= {"add_sub", "identity", "pipe"}


def test_repository_index_load_unload(http) -> None:
    index = {m["name"]: m for m in http.get_model_repository_index()}
    assert index["add_sub"]["state"] == "READY" and index["add_sub"]["version"] == "1"
    http.unload_model("bytes")
    assert not http.is_model_ready("bytes")
    index = {m["name"]: m for m in http.get_model_repository_index()}
    assert index["bytes"]["state"] == "UNAVAILABLE"
    override = json.dumps({"backend": "test_identity", "input": [
        {"name": "INPUT0", "data_type": "TYPE_STRING", "dims": [-1]}], "output": [
        {"name": "OUTPUT0", "data_type": "TYPE_STRING", "dims": [-1]}],
        "parameters": {"marker": {"string_value": "override"}}})
    http.load_model("bytes", config=override)
    assert http.is_model_ready("bytes")
    assert http.get_model_config("bytes")["parameters"]["marker"]["string_value"] == "override"
    with pytest.raises(InferenceServerException, match="model 'nope' is not in the repository"):
        http.load_model("nope")


def test_aio_client(server) -> None:
    async def run() -> np.ndarray:
        c = aioclient.InferenceServerClient(f"localhost:{server.http_port}")
        try:
            assert await c.is_server_ready()
            inputs, _, _ = _add_sub_inputs(True)
            results = await asyncio.gather(*[c.infer("add_sub", inputs) for _ in range(8)])
            return np.stack([r.as_numpy("OUTPUT0") for r in results])
        finally:
            await c.close()

    got = asyncio.run(run())
    np.testing.assert_array_equal(got, np.tile(np.arange(4) + 0.5, (8, 1)))


def _post(server, path: str, body: bytes | str, headers: dict | None = None
          ) -> tuple[int, dict, dict | str]:
    async def run() -> tuple[int, dict, dict | str]:
        async with aiohttp.ClientSession() as s, s.post(
                f"http://localhost:{server.http_port}{path}", data=body,
                headers=headers or {}) as r:
            text = await r.text()
            try:
                return r.status, dict(r.headers), json.loads(text)
            except json.JSONDecodeError:
                return r.status, dict(r.headers), text

    return asyncio.run(run())


GOOD = {"inputs": [{"name": "INPUT0", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                   {"name": "INPUT1", "shape": [4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}


@pytest.mark.parametrize(("path", "body", "status", "fragment"), [
    ("/v2/models/add_sub/infer", "{not json", 400, "failed to parse the request JSON"),
    ("/v2/models/add_sub/infer", json.dumps({**GOOD, "extra": 1}), 400, "unknown field"),
    ("/v2/models/add_sub/infer", json.dumps({"inputs": [{**GOOD["inputs"][0], "data": ["a"] * 4},
                                                        GOOD["inputs"][1]]}), 400,
     "FP32 data holds"),
    ("/v2/models/add_sub/infer", json.dumps({"inputs": [{**GOOD["inputs"][0], "shape": [5]},
                                                        GOOD["inputs"][1]]}), 400,
     "4 values in 'data' for shape [5]"),
    ("/v2/models/add_sub/infer", json.dumps({"inputs": GOOD["inputs"][:1]}), 400,
     "expects input(s) ['INPUT1']"),
    ("/v2/models/add_sub/infer", json.dumps({"inputs": [{**GOOD["inputs"][0],
                                                         "datatype": "INT32",
                                                         "data": [1, 2, 3, 4]},
                                                        GOOD["inputs"][1]]}), 400,
     "has datatype INT32, expected FP32"),
    ("/v2/models/nope/infer", json.dumps(GOOD), 404, "unknown model 'nope'"),
    ("/v2/models/add_sub/versions/9/infer", json.dumps(GOOD), 404, "no loaded version '9'"),
    ("/v2/models/add_sub/nothing", "{}", 404, "Not Found"),
])
def test_bad_requests_get_json_errors(server, http, path: str, body: str, status: int,
                                      fragment: str) -> None:
    code, headers, got = _post(server, path, body)
    assert code == status, got
    assert headers["Content-Type"].startswith("application/json")
    assert isinstance(got, dict) and fragment in got["error"], got
    np.testing.assert_array_equal(  # and the server keeps serving
        http.infer("add_sub", _add_sub_inputs(True)[0]).as_numpy("OUTPUT0"),
        np.arange(4) + 0.5)


def test_binary_header_errors(server) -> None:
    head = json.dumps({"inputs": [{"name": "INPUT0", "shape": [4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 16}},
                                  GOOD["inputs"][1]]}).encode()
    raw = np.arange(4, dtype=np.float32).tobytes()
    code, _, got = _post(server, "/v2/models/add_sub/infer", head + raw[:8],
                         {"Inference-Header-Content-Length": str(len(head))})
    assert code == 400 and "only 8 bytes of binary data remain" in got["error"]
    code, _, got = _post(server, "/v2/models/add_sub/infer", head + raw,
                         {"Inference-Header-Content-Length": str(len(head))})
    assert code == 200, got


def test_generate_and_generate_stream(server) -> None:
    code, _, got = _post(server, "/v2/models/add_sub/generate", json.dumps(
        {"INPUT0": [1, 2, 3, 4], "INPUT1": [1, 1, 1, 1]}))
    assert code == 200 and got["OUTPUT0"] == [2, 3, 4, 5] and got["model_name"] == "add_sub"

    async def stream() -> tuple[int, list[str]]:
        async with aiohttp.ClientSession() as s, s.post(
                f"http://localhost:{server.http_port}/v2/models/repeat/generate_stream",
                json={"IN": 4}) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            return r.status, [line.decode() async for line in r.content]

    status, lines = asyncio.run(stream())
    events = [json.loads(x[len("data:"):]) for x in lines if x.startswith("data:")]
    assert status == 200 and [e["OUT"] for e in events] == [0, 1, 2, 3]
    code, _, got = _post(server, "/v2/models/repeat/generate", json.dumps({"IN": 3}))
    assert code == 400 and "sent 3 responses; use generate_stream" in got["error"]
    code, _, got = _post(server, "/v2/models/add_sub/generate", json.dumps({"BAD": 1}))
    assert code == 400 and "unexpected key 'BAD'" in got["error"]


def test_generate_stream_error_event(server) -> None:
    async def stream() -> list[dict]:
        async with aiohttp.ClientSession() as s, s.post(
                f"http://localhost:{server.http_port}/v2/models/repeat/generate_stream",
                json={"IN": -1}) as r:
            return [json.loads(x[5:]) for x in [ln.decode() async for ln in r.content]
                    if x.startswith("data:")]

    events = asyncio.run(stream())
    assert events == [{"error": "IN must be >= 0, got -1", "status": 400}]


def test_perf_analyzer_http(server, tmp_path: Path) -> None:
    report = run_perf_analyzer(f"localhost:{server.http_port}", "add_sub", tmp_path, [],
                               protocol="http")
    assert report["errors"] == 0, report["output"]
    assert report["rows"] and all(r["Inferences/Second"] > 0 for r in report["rows"])
