"""Bad requests get a gRPC status whose message names the problem, and neither the server nor
any rank of the tp=2 giant model goes down: every case runs against one server, whose rank
processes must be the same ones at the end, still generating transformers' tokens."""

from __future__ import annotations

import queue
import struct

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tests.reliability_support import (
    ECHO,
    LLM,
    build_repo,
    descendants,
    echo_inputs,
    expect_error,
    ids_inputs,
    reference,
    start,
    stream_tokens,
)
from tests.serving_helpers import Server, infer_input

MAX_MESSAGE = 2**20
PROMPT = [5, 9, 100, 31, 77, 8]


@pytest.fixture(scope="module")
def server(checkpoint_dir, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("reliability-errors")
    srv = start(build_repo(tmp / "repo", checkpoint_dir("llama")), tmp / "server.log",
                "--max-message-bytes", str(MAX_MESSAGE))
    srv.ranks = descendants(srv)
    assert srv.ranks, "the tp=2 model should have a worker rank process"
    yield srv
    assert srv.stop() == 0, srv.text()[-3000:]


@pytest.fixture
def client(server: Server):
    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.close()


@pytest.fixture
def stub(server: Server):
    with grpc.insecure_channel(server.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def raw_request(model: str, inputs: list[tuple[str, str, list[int], bytes]]
                ) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    for name, datatype, shape, raw in inputs:
        req.inputs.add(name=name, datatype=datatype, shape=shape)
        req.raw_input_contents.append(raw)
    return req


def expect_raw(stub, request: pb.ModelInferRequest, code: grpc.StatusCode, *fragments: str
               ) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details(), (fragment, info.value.details())


I32 = lambda *v: struct.pack(f"<{len(v)}i", *v)  # noqa: E731
X = np.arange(4, dtype=np.float32)

CASES = {  # name: (inputs, model, status, fragments)
    "unknown model": (lambda: echo_inputs(X), "nope", "NOT_FOUND", ["unknown model 'nope'"]),
    "model name escaping": (lambda: echo_inputs(X), "../echo", "INVALID_ARGUMENT",
                            ["invalid model name"]),
    "missing input": (lambda: [infer_input("TEXT", np.array([b"a"], dtype=object), "BYTES")],
                      ECHO, "INVALID_ARGUMENT", ["['IN']", "lacks"]),
    "extra input": (lambda: echo_inputs(X) + [infer_input("EXTRA", X, "FP32")], ECHO,
                    "INVALID_ARGUMENT", ["unexpected inference input 'EXTRA'"]),
    "wrong datatype": (lambda: [infer_input("IN", X.astype(np.float64), "FP64")], ECHO,
                       "INVALID_ARGUMENT", ["datatype FP64, expected FP32"]),
    "wrong shape": (lambda: [infer_input("IN", X.reshape(2, 2), "FP32")], ECHO,
                    "INVALID_ARGUMENT", ["shape [2, 2], expected [-1]"]),
    "non-UTF-8 prompt": (lambda: [infer_input("text_input", np.array([b"\xff\xfe"], object),
                                              "BYTES")], LLM, "INVALID_ARGUMENT", ["UTF-8"]),
    "non-UTF-8 stop word": (lambda: ids_inputs(PROMPT, 2) + [infer_input(
        "stop_words", np.array([b"\xc3"], object), "BYTES")], LLM, "INVALID_ARGUMENT",
        ["'stop_words' is not valid UTF-8"]),
    "empty text prompt": (lambda: [infer_input("text_input", np.array([b""], object),
                                               "BYTES")], LLM, "INVALID_ARGUMENT", ["empty"]),
    "empty token prompt": (lambda: ids_inputs([], 4), LLM, "INVALID_ARGUMENT",
                           ["prompt is empty"]),
    "prompt longer than context": (lambda: ids_inputs([7] * 100, 4), LLM, "INVALID_ARGUMENT",
                                   ["100 tokens", "context is 64"]),
    "token outside vocabulary": (lambda: ids_inputs([1, 500], 4), LLM, "INVALID_ARGUMENT",
                                 ["outside the vocabulary"]),
    "max_tokens 0": (lambda: ids_inputs(PROMPT, 0), LLM, "INVALID_ARGUMENT",
                     ["max_tokens must be >= 1, got 0"]),
    "max_tokens negative": (lambda: ids_inputs(PROMPT, -5), LLM, "INVALID_ARGUMENT",
                            ["max_tokens must be >= 1, got -5"]),
    "temperature negative": (lambda: ids_inputs(PROMPT, 2, temperature=(-1.0, "FP32")), LLM,
                             "INVALID_ARGUMENT", ["temperature"]),
    "temperature NaN": (lambda: ids_inputs(PROMPT, 2, temperature=(float("nan"), "FP32")),
                        LLM, "INVALID_ARGUMENT", ["'temperature' must be a finite number"]),
    "top_p zero": (lambda: ids_inputs(PROMPT, 2, top_p=(0.0, "FP32")), LLM,
                   "INVALID_ARGUMENT", ["top_p must be in (0, 1]"]),
    "top_p above one": (lambda: ids_inputs(PROMPT, 2, top_p=(1.5, "FP32")), LLM,
                        "INVALID_ARGUMENT", ["top_p"]),
    "top_k negative": (lambda: ids_inputs(PROMPT, 2, top_k=(-3, "INT32")), LLM,
                       "INVALID_ARGUMENT", ["top_k must be >= 0"]),
    "repetition_penalty zero": (lambda: ids_inputs(PROMPT, 2,
                                                   repetition_penalty=(0.0, "FP32")),
                                LLM, "INVALID_ARGUMENT", ["repetition_penalty"]),
    "request over the receive limit": (lambda: echo_inputs(np.zeros(MAX_MESSAGE // 3)), ECHO,
                                       "RESOURCE_EXHAUSTED", ["larger than max"]),
    "response over the send limit": (lambda: echo_inputs(np.zeros(MAX_MESSAGE // 8),
                                                         repeat=3), ECHO,
                                     "RESOURCE_EXHAUSTED", ["--max-message-bytes"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_is_named(client, case: str) -> None:
    inputs, model, status, fragments = CASES[case]
    expect_error(lambda: client.infer(model, inputs()), status, *fragments)


def test_bad_version_and_outputs(client) -> None:
    expect_error(lambda: client.infer(ECHO, echo_inputs(X), model_version="7"), "NOT_FOUND",
                 "no loaded version '7'")
    expect_error(lambda: client.infer(ECHO, echo_inputs(X), model_version="x"), "NOT_FOUND")
    out = [grpcclient.InferRequestedOutput("NOPE")]
    expect_error(lambda: client.infer(ECHO, echo_inputs(X), outputs=out), "INVALID_ARGUMENT",
                 "unknown requested output(s) ['NOPE']")


def test_malformed_raw_tensors(stub) -> None:
    code = grpc.StatusCode.INVALID_ARGUMENT
    bad_prefix = struct.pack("<I", 1000) + b"abc"  # claims 1000 bytes, has 3
    expect_raw(stub, raw_request(LLM, [("text_input", "BYTES", [1], bad_prefix)]), code,
               "'text_input'", "claims 1000 bytes but only 3 remain")
    cut = struct.pack("<I", 3) + b"abc" + b"\x01\x00"  # the second prefix is cut short
    expect_raw(stub, raw_request(LLM, [("stop_words", "BYTES", [2], cut),
                                       ("input_ids", "INT32", [2], I32(1, 2))]), code,
               "ends inside the length prefix of element 1")
    expect_raw(stub, raw_request(LLM, [("text_input", "BYTES", [1], b"\x01\x00")]), code,
               "2 bytes cannot hold 1 length-prefixed BYTES elements")
    two = struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b"
    expect_raw(stub, raw_request(LLM, [("text_input", "BYTES", [1], two)]), code,
               "left over after 1 BYTES elements")
    # a huge declared shape is refused before anything of that size is allocated
    expect_raw(stub, raw_request(ECHO, [("IN", "FP32", [2**40], b"\0" * 16)]), code,
               "16 bytes of raw data for shape [1099511627776]")
    expect_raw(stub, raw_request(LLM, [("stop_words", "BYTES", [2**40], b"\0" * 8),
                                       ("input_ids", "INT32", [2], I32(1, 2))]), code,
               "cannot hold 1099511627776")
    expect_raw(stub, raw_request(ECHO, [("IN", "FP32", [3], b"\0" * 5)]), code,
               "5 bytes of raw data for shape [3]")
    expect_raw(stub, raw_request(ECHO, [("IN", "FP32", [-2], b"")]), code, "negative dimension")
    req = raw_request(ECHO, [("IN", "FP32", [1], b"\0" * 4)])
    req.raw_input_contents.append(b"")
    expect_raw(stub, req, code, "2 raw_input_contents for 1 inputs")
    req = pb.ModelInferRequest(model_name=ECHO)
    req.inputs.add(name="IN", datatype="FP32", shape=[3]).contents.fp32_contents.extend([1.0])
    expect_raw(stub, req, code, "1 values in contents for shape [3]")
    req = raw_request(ECHO, [("IN", "FP32", [1], b"\0" * 4)] * 2)
    expect_raw(stub, req, code, "appears twice")
    req = raw_request(ECHO, [("IN", "FP32", [1], b"\0" * 4)])
    req.parameters["priority"].string_param = "high"
    expect_raw(stub, req, code, "'priority' must be a non-negative integer")


def test_errors_on_a_stream_keep_it_open(server) -> None:
    """Each bad request on a stream answers with an error message naming it; the stream keeps
    going and a good request after them completes."""
    results: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(server.url)
    c.start_stream(lambda result, error: results.put((result, error)))
    bad = [(LLM, ids_inputs(PROMPT, 0, stream=True), "max_tokens must be >= 1"),
           ("nope", echo_inputs(X), "unknown model"),
           (ECHO, [infer_input("IN", X.astype(np.float64), "FP64")], "datatype FP64")]
    for model, inputs, _ in bad:
        c.async_stream_infer(model, inputs)
    c.async_stream_infer(ECHO, echo_inputs(X, text=b"ok"))
    got = [results.get(timeout=30) for _ in range(len(bad) + 1)]
    c.stop_stream()
    c.close()
    errors = sorted(str(e) for _, e in got if e is not None)
    assert len(errors) == len(bad), errors
    for (_, _, fragment) in bad:
        assert any(fragment in e for e in errors), (fragment, errors)
    ok = [r for r, e in got if e is None]
    np.testing.assert_array_equal(ok[0].as_numpy("OUT"), 2 * X + 1)


def test_huge_max_tokens_is_cut_at_the_context(client) -> None:
    """max_tokens far beyond the context is not an error: generation ends at the context."""
    result = client.infer(LLM, ids_inputs(PROMPT, 2**31 - 1))
    params = result.get_response().parameters
    assert params["finish_reason"].string_param == "length"
    assert params["completion_tokens"].int64_param == 64 - len(PROMPT)
    assert result.as_numpy("output_ids").size == 64 - len(PROMPT)


def test_server_and_ranks_survived(server, client, checkpoint_dir) -> None:
    """Last in this module: same rank processes, ready, and still token-exact."""
    assert descendants(server) == server.ranks
    assert client.is_server_ready() and client.is_model_ready(LLM)
    ref = reference(checkpoint_dir("llama"), [PROMPT], 8)
    assert client.infer(LLM, ids_inputs(PROMPT, 8)).as_numpy("output_ids").tolist() == ref[0]
    tokens, params = stream_tokens(server.url, ids_inputs(PROMPT, 8, stream=True))
    assert tokens == ref[0] and params["finish_reason"] == "length"
    assert "Traceback" not in server.text(), server.text()[-3000:]
