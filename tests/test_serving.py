"""The gRPC front end to end with tritonclient against a real server subprocess: health,
metadata, config, inference (raw and typed contents, BYTES), decoupled streaming, errors,
statistics, repository index/load/unload, versions, path safety, perf_analyzer."""

from __future__ import annotations

import json
import queue
import struct
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.perf import run_perf_analyzer
from tests.serving_helpers import Server, infer_input

IDENTITY = """
backend: "test_identity"
max_batch_size: 8
input { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }
output { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }
"""
BYTES_MODEL = """
backend: "test_identity"
input { name: "INPUT0" data_type: TYPE_STRING dims: [ -1 ] }
input { name: "INPUT1" data_type: TYPE_INT64 dims: [ 2 ] optional: true }
output { name: "OUTPUT0" data_type: TYPE_STRING dims: [ -1 ] }
output { name: "OUTPUT1" data_type: TYPE_INT64 dims: [ 2 ] }
"""
REPEAT = """
backend: "test_repeat"
model_transaction_policy { decoupled: true }
input { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] }
output { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] }
"""
BROKEN = 'backend: "test_fail_load"\n'
VERSIONED = IDENTITY + "version_policy { latest { num_versions: 2 } }\n"
MODELS = {"identity": IDENTITY, "bytes": BYTES_MODEL, "repeat": REPEAT, "broken": BROKEN,
          "versioned": VERSIONED}
STARTUP = ["identity", "bytes", "repeat", "versioned"]


def make_repo(root: Path) -> Path:
    for name, text in MODELS.items():
        (root / name).mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(text)
        for v in ([1, 2, 3] if name == "versioned" else [1]):
            (root / name / str(v)).mkdir()
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("serving")
    args = ["--model-control-mode", "explicit"]
    for name in STARTUP:
        args += ["--load-model", name]
    srv = Server(make_repo(tmp / "repo"), tmp / "server.log", *args)
    yield srv
    assert srv.stop() == 0, srv.text()


def expect_error(fn, code: str, *fragments: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        fn()
    assert info.value.status() == f"StatusCode.{code}", info.value
    for f in fragments:
        assert f in info.value.message(), info.value.message()


def fp32_inputs(batch: int = 2) -> tuple[np.ndarray, list]:
    x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
    return x, [infer_input("INPUT0", x, "FP32")]


def test_health_and_metadata(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("identity") and not client.is_model_ready("broken")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "shardserve" and "model_repository" in meta["extensions"]
    md = client.get_model_metadata("identity", as_json=True)
    assert md["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert md["outputs"][0]["name"] == "OUTPUT0" and md["versions"] == ["1"]
    cfg = client.get_model_config("repeat", as_json=True)["config"]
    assert cfg["name"] == "repeat" and cfg["model_transaction_policy"]["decoupled"] is True
    assert client.get_model_metadata("versioned", as_json=True)["versions"] == ["2", "3"]


def test_infer_batched_fp32(client) -> None:
    x, inputs = fp32_inputs(3)
    result = client.infer("identity", inputs, request_id="r1")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
    assert result.get_response().id == "r1"


def test_infer_bytes_and_requested_outputs(client) -> None:
    data = np.array([b"", b"hello", b"\xff\x00binary", "ünï".encode()], dtype=object)
    ids = np.array([7, -2**40], dtype=np.int64)
    inputs = [infer_input("INPUT0", data, "BYTES"), infer_input("INPUT1", ids, "INT64")]
    result = client.infer("bytes", inputs)
    assert list(result.as_numpy("OUTPUT0")) == list(data)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), ids)
    only = client.infer("bytes", inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    assert only.as_numpy("OUTPUT0") is None and only.as_numpy("OUTPUT1") is not None


def raw_stub(server: Server) -> service_pb2_grpc.GRPCInferenceServiceStub:
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.url))


def test_typed_contents_and_bad_bytes(server) -> None:
    stub = raw_stub(server)
    req = pb.ModelInferRequest(model_name="bytes")
    t = req.inputs.add(name="INPUT0", datatype="BYTES", shape=[2])
    t.contents.bytes_contents.extend([b"a", b"bc"])
    t1 = req.inputs.add(name="INPUT1", datatype="INT64", shape=[2])
    t1.contents.int64_contents.extend([5, 6])
    resp = stub.ModelInfer(req)
    assert [o.name for o in resp.outputs] == ["OUTPUT0", "OUTPUT1"]
    assert resp.raw_output_contents[0] == b"\x01\x00\x00\x00a\x02\x00\x00\x00bc"
    assert np.frombuffer(resp.raw_output_contents[1], "<i8").tolist() == [5, 6]
    bad = pb.ModelInferRequest(model_name="bytes")
    bad.inputs.add(name="INPUT0", datatype="BYTES", shape=[2])
    bad.raw_input_contents.append(struct.pack("<I", 1) + b"a" + struct.pack("<I", 9) + b"xy")
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "BYTES element 1 claims 9 bytes" in info.value.details()


@pytest.mark.parametrize("case", ["unknown model", "missing input", "wrong dtype", "wrong shape",
                                  "batch too big", "unknown input", "unknown output",
                                  "unknown version"])
def test_errors_name_the_problem(client, case: str) -> None:
    x = np.zeros((2, 4), np.float32)
    good = [infer_input("INPUT0", x, "FP32")]
    calls = {
        "unknown model": (lambda: client.infer("nope", good), "NOT_FOUND", "nope"),
        "missing input": (lambda: client.infer("bytes", [infer_input(
            "INPUT1", np.zeros(2, np.int64), "INT64")]), "INVALID_ARGUMENT", "INPUT0"),
        "wrong dtype": (lambda: client.infer("identity", [infer_input(
            "INPUT0", x.astype(np.float64), "FP64")]), "INVALID_ARGUMENT", "FP64", "FP32"),
        "wrong shape": (lambda: client.infer("identity", [infer_input(
            "INPUT0", np.zeros((2, 5), np.float32), "FP32")]), "INVALID_ARGUMENT", "[2, 5]"),
        "batch too big": (lambda: client.infer("identity", [infer_input(
            "INPUT0", np.zeros((9, 4), np.float32), "FP32")]), "INVALID_ARGUMENT", "1..8"),
        "unknown input": (lambda: client.infer("identity", good + [infer_input(
            "EXTRA", x, "FP32")]), "INVALID_ARGUMENT", "EXTRA"),
        "unknown output": (lambda: client.infer("identity", good, outputs=[
            grpcclient.InferRequestedOutput("NOPE")]), "INVALID_ARGUMENT", "NOPE"),
        "unknown version": (lambda: client.infer("versioned", good, model_version="1"),
                            "NOT_FOUND", "version '1'"),
    }
    fn, code, *fragments = calls[case]
    expect_error(fn, code, *fragments)
    assert client.infer("identity", good).as_numpy("OUTPUT0").shape == (2, 4)


def stream_collect(url: str, requests: list[tuple[str, int]], empty_final: bool = True
                   ) -> dict[str, list]:
    """Send (request id, n) to the repeat model on one stream; return responses per id."""
    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(lambda result, error: q.put((result, error)))
    for rid, n in requests:
        c.async_stream_infer("repeat", [infer_input("IN", np.array([n], np.int32), "INT32")],
                             request_id=rid, enable_empty_final_response=empty_final)
    got: dict[str, list] = {rid: [] for rid, _ in requests}
    done = 0
    while done < len(requests):
        result, error = q.get(timeout=30)
        assert error is None, error
        resp = result.get_response()
        final = resp.parameters["triton_final_response"].bool_param
        out = result.as_numpy("OUT")
        got[resp.id].append((None if out is None else int(out[0]), final))
        done += final
    c.stop_stream()
    c.close()
    return got


def test_stream_decoupled_many_responses(server) -> None:
    got = stream_collect(server.url, [("a", 5), ("b", 0), ("c", 3)])
    assert got["a"] == [(k, False) for k in range(5)] + [(None, True)]
    assert got["b"] == [(None, True)]
    assert got["c"] == [(0, False), (1, False), (2, False), (None, True)]


def test_stream_error_keeps_stream_open(server) -> None:
    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(server.url)
    c.start_stream(lambda result, error: q.put((result, error)))
    c.async_stream_infer("nope", [infer_input("IN", np.array([1], np.int32), "INT32")])
    c.async_stream_infer("repeat", [infer_input("IN", np.array([-1], np.int32), "INT32")])
    c.async_stream_infer("repeat", [infer_input("IN", np.array([1], np.int32), "INT32")],
                         request_id="ok")
    errors = [q.get(timeout=10)[1] for _ in range(2)]
    assert "unknown model 'nope'" in str(errors[0]) and "IN must be >= 0" in str(errors[1])
    result, error = q.get(timeout=10)
    assert error is None and result.as_numpy("OUT").tolist() == [0]
    c.stop_stream()
    c.close()


def test_32_concurrent_streams(server) -> None:
    results: dict[int, dict] = {}

    def one(i: int) -> None:
        results[i] = stream_collect(server.url, [(f"s{i}", 10 + i % 5)])[f"s{i}"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 32
    for i, got in results.items():
        assert got == [(k, False) for k in range(10 + i % 5)] + [(None, True)]


def stats_of(client, name: str) -> dict:
    return client.get_inference_statistics(name, as_json=True)["model_stats"][0]


def test_statistics_count_success_and_failure(client, server) -> None:
    before = stats_of(client, "identity")
    _, inputs = fp32_inputs(2)
    for _ in range(5):
        client.infer("identity", inputs)
    after = stats_of(client, "identity")
    succ = lambda s: int(s["inference_stats"]["success"].get("count", 0))  # noqa: E731
    assert succ(after) - succ(before) == 5
    assert int(after["inference_stats"]["compute_infer"]["ns"]) > 0
    fail_before = stats_of(client, "repeat")["inference_stats"]["fail"].get("count", 0)
    stream_err = queue.Queue()
    client.start_stream(lambda result, error: stream_err.put(error))
    client.async_stream_infer("repeat", [infer_input("IN", np.array([-1], np.int32), "INT32")])
    assert stream_err.get(timeout=10) is not None
    client.stop_stream()
    fail_after = stats_of(client, "repeat")["inference_stats"]["fail"]["count"]
    assert int(fail_after) == int(fail_before) + 1
    every = client.get_inference_statistics(as_json=True)["model_stats"]
    assert {s["name"] for s in every} >= set(STARTUP)


def test_repository_index_load_unload(client) -> None:
    index = {(m["name"], m.get("version", "")): m
             for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index[("identity", "1")]["state"] == "READY"
    assert ("broken", "") in index and index[("broken", "")]["state"] == "UNAVAILABLE"
    expect_error(lambda: client.load_model("broken"), "INVALID_ARGUMENT", "refuses to load")
    broken = [m for m in client.get_model_repository_index(as_json=True)["models"]
              if m["name"] == "broken"]
    assert "refuses to load" in broken[0]["reason"]

    client.unload_model("bytes")
    assert not client.is_model_ready("bytes")
    inputs = [infer_input("INPUT0", np.array([b"x"], dtype=object), "BYTES")]
    expect_error(lambda: client.infer("bytes", inputs), "UNAVAILABLE", "not loaded")
    client.load_model("bytes")
    assert client.infer("bytes", inputs).as_numpy("OUTPUT0").tolist() == [b"x"]

    override = json.dumps({"backend": "test_identity", "max_batch_size": 2,
                           "input": [{"name": "INPUT0", "data_type": "TYPE_FP32",
                                      "dims": [4]}],
                           "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32",
                                       "dims": [4]}]})
    client.load_model("identity", config=override)
    assert client.get_model_config("identity", as_json=True)["config"]["max_batch_size"] == 2
    expect_error(lambda: client.infer("identity", fp32_inputs(3)[1]), "INVALID_ARGUMENT", "1..2")
    client.load_model("identity")  # back to the repository's config
    assert client.infer("identity", fp32_inputs(3)[1]).as_numpy("OUTPUT0").shape == (3, 4)


@pytest.mark.parametrize("name", ["../identity", "a/b", "..", ".hidden", "/etc"])
def test_model_names_cannot_escape(client, name: str) -> None:
    expect_error(lambda: client.load_model(name), "INVALID_ARGUMENT", "model name")
    assert not client.is_model_ready(name)


def test_versions_follow_policy(client) -> None:
    _, inputs = fp32_inputs(1)
    for v in ("2", "3", ""):
        assert client.infer("versioned", inputs, model_version=v).get_response(
            ).model_version == (v or "3")
    assert client.is_model_ready("versioned", "2") and not client.is_model_ready("versioned", "1")


def test_control_mode_none_refuses_load(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "identity" / "1").mkdir(parents=True)
    (root / "identity" / "config.pbtxt").write_text(IDENTITY)
    srv = Server(root, tmp_path / "log")
    try:
        c = grpcclient.InferenceServerClient(srv.url)
        assert c.is_model_ready("identity")
        expect_error(lambda: c.unload_model("identity"), "UNAVAILABLE", "explicit")
    finally:
        assert srv.stop() == 0


def test_bad_config_fails_startup_naming_the_field(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "config.pbtxt").write_text(
        'backend: "test_identity"\ninput { name: "X" data_type: TYPE_FP32 dims: [ 0 ] }\n')
    with pytest.raises(RuntimeError, match=r"field 'input\[0\].dims'"):
        Server(root, tmp_path / "log")


def test_perf_analyzer_zero_errors(server, tmp_path: Path) -> None:
    report = run_perf_analyzer(server.url, "identity", tmp_path, ["--shape", "INPUT0:4"])
    assert report["errors"] == 0, report["output"]
    assert report["rows"] and all(r["Inferences/Second"] > 0 for r in report["rows"])
