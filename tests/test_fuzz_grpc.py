"""Property-based fuzzing of the gRPC front (hypothesis, derandomized): thousands of generated
malformed ModelInferRequests (raw protos through the grpc stub, semi-valid ones through
tritonclient, batches of them on one stream, undecodable bytes) against a server with a tp=2
giant model and a python model. Every call must end with a status from an expected set and a
message; afterwards the same rank processes still produce transformers' tokens."""

from __future__ import annotations

import math
import struct
from collections import Counter
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from serving.convert import NP_DTYPES, set_param
from tests.reliability_support import (
    ECHO,
    LLM,
    build_repo,
    descendants,
    ids_inputs,
    reference,
    start,
)
from tests.serving_helpers import infer_input

# what a malformed request may get; INTERNAL / UNKNOWN would mean an unhandled exception
ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.function_scoped_fixture])
LLM_NAMES = ["input_ids", "text_input", "max_tokens", "temperature", "top_k", "top_p",
             "repetition_penalty", "random_seed", "stop_words", "stream",
             "exclude_input_in_output", "ignore_eos"]
ECHO_NAMES = ["IN", "TEXT", "REPEAT"]
DATATYPES = sorted(NP_DTYPES) + ["", "STRING", "int32", "FP8"]
DIMS = [-1, 0, 1, 2, 3, 5, 2**31, 2**40, 2**62]


@pytest.fixture(scope="module")
def server(checkpoint_dir, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("fuzz")
    srv = start(build_repo(tmp / "repo", checkpoint_dir("llama")), tmp / "server.log",
                "--max-message-bytes", str(2**20))
    srv.ranks = descendants(srv)
    yield srv
    assert srv.stop() == 0, srv.text()[-3000:]


@pytest.fixture(scope="module")
def stub(server) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def outcomes() -> Counter:
    """Status counts over the whole module (printed at the end, for docs/reliability.md)."""
    return Counter()


# --- strategies -------------------------------------------------------------------------------
def _count(shape: list[int]) -> int:
    return math.prod(shape) if all(d >= 0 for d in shape) else -1


@st.composite
def raw_tensor(draw: st.DrawFn, names: list[str]) -> tuple[str, str, list[int], bytes]:
    """(name, datatype, shape, raw): often well-formed for its datatype, sometimes not."""
    name = draw(st.sampled_from(names + ["bogus", ""]) | st.text(max_size=6))
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(st.lists(st.sampled_from(DIMS), max_size=3))
    n = _count(shape)
    if datatype == "BYTES" and 0 <= n <= 8 and draw(st.booleans()):
        items = draw(st.lists(st.binary(max_size=12), min_size=n, max_size=n))
        raw = b"".join(struct.pack("<I", len(b)) + b for b in items)
        if raw and draw(st.booleans()):  # corrupt one byte (often a length prefix)
            i = draw(st.integers(0, len(raw) - 1))
            raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1:]
    elif datatype in NP_DTYPES and datatype != "BYTES" and 0 <= n <= 64 and draw(st.booleans()):
        size = 2 if datatype == "BF16" else NP_DTYPES[datatype].itemsize
        raw = draw(st.binary(min_size=n * size, max_size=n * size))
    else:
        raw = draw(st.binary(max_size=40))
    return name, datatype, shape, raw


@st.composite
def malformed_request(draw: st.DrawFn) -> pb.ModelInferRequest:
    model = draw(st.sampled_from([LLM, ECHO, "", "nope", "../llm", "llm/1", ".", "ECHO"]))
    names = LLM_NAMES if model == LLM else ECHO_NAMES
    req = pb.ModelInferRequest(model_name=model, id=draw(st.text(max_size=8)),
                               model_version=draw(st.sampled_from(["", "1", "2", "-1", "x"])))
    tensors = draw(st.lists(raw_tensor(names), max_size=4))
    raw = draw(st.booleans())
    for name, datatype, shape, data in tensors:
        t = req.inputs.add(name=name, datatype=datatype, shape=shape)
        if raw:
            req.raw_input_contents.append(data)
        elif datatype in ("INT32", "INT8", "INT16"):
            t.contents.int_contents.extend(draw(st.lists(st.integers(-2**31, 2**31 - 1),
                                                         max_size=6)))
        elif datatype == "FP32":
            t.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=6)))
        elif datatype == "BYTES":
            t.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=8), max_size=3)))
    if raw and draw(st.integers(0, 9)) == 0:
        req.raw_input_contents.append(b"extra")
    for key, value in draw(st.dictionaries(
            st.sampled_from(["priority", "timeout", "triton_enable_empty_final_response",
                             "binary_data_output", "x"]),
            st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=4)
            | st.floats(), max_size=2)).items():
        set_param(req.parameters[key], value)
    for name in draw(st.lists(st.sampled_from(["output_ids", "text_output", "OUT", "NOPE"]),
                              max_size=2)):
        req.outputs.add(name=name)
    return req


def _check(outcomes: Counter, code: grpc.StatusCode, details: str | None) -> None:
    outcomes[code.name] += 1
    assert code.name in ALLOWED, (code, details)
    assert code == grpc.StatusCode.OK or details, code


# --- the properties ---------------------------------------------------------------------------
@settings(max_examples=1200, **FUZZ)
@given(request=malformed_request())
def test_fuzz_raw_protos(stub, outcomes, request: pb.ModelInferRequest) -> None:
    try:
        stub.ModelInfer(request, timeout=30)
        _check(outcomes, grpc.StatusCode.OK, None)
    except grpc.RpcError as e:
        _check(outcomes, e.code(), e.details())


@st.composite
def semi_valid_llm(draw: st.DrawFn) -> list[grpcclient.InferInput]:
    """Well-typed LLM requests whose values range over good and bad ones."""
    prompt = draw(st.lists(st.integers(-1, 130), max_size=70))
    inputs = [infer_input("input_ids", np.array(prompt, np.int32), "INT32")]
    if draw(st.integers(0, 3)) == 0:
        text = draw(st.binary(max_size=12) | st.text(max_size=12).map(str.encode))
        inputs = [infer_input("text_input", np.array([text], dtype=object), "BYTES")]
    scalars = {"max_tokens": (st.sampled_from([-1, 0, 1, 2, 3, 2, 1, 2**31 - 1]), np.int32),
               "temperature": (st.floats(-0.5, 2) | st.sampled_from([float("nan"), 1e9]),
                               np.float32),
               "top_k": (st.integers(-2, 200), np.int32),
               "top_p": (st.floats(-0.2, 1.2), np.float32),
               "repetition_penalty": (st.floats(-1, 12), np.float32),
               "random_seed": (st.integers(0, 2**64 - 1), np.uint64)}
    for name, (values, dtype) in scalars.items():
        if draw(st.booleans()):
            datatype = {np.int32: "INT32", np.float32: "FP32", np.uint64: "UINT64"}[dtype]
            inputs.append(infer_input(name, np.array([draw(values)], dtype), datatype))
    if draw(st.booleans()):
        words = draw(st.lists(st.binary(max_size=4), min_size=1, max_size=3))
        inputs.append(infer_input("stop_words", np.array(words, dtype=object), "BYTES"))
    return inputs


@settings(max_examples=400, **FUZZ)
@given(inputs=semi_valid_llm())
def test_fuzz_semi_valid_llm(server, outcomes, inputs: list) -> None:
    with grpcclient.InferenceServerClient(server.url) as client:
        try:
            client.infer(LLM, inputs, client_timeout=30)
            _check(outcomes, grpc.StatusCode.OK, None)
        except InferenceServerException as e:
            _check(outcomes, getattr(grpc.StatusCode, str(e.status()).split(".")[-1]),
                   e.message())


@settings(max_examples=120, **FUZZ)
@given(batch=st.lists(malformed_request(), min_size=1, max_size=6))
def test_fuzz_stream(stub, outcomes, batch: list[pb.ModelInferRequest]) -> None:
    """A stream carrying malformed requests still ends cleanly when the client closes it."""
    responses = list(stub.ModelStreamInfer(iter(batch), timeout=60))
    outcomes["stream_requests"] += len(batch)
    outcomes["stream_errors"] += sum(1 for r in responses if r.error_message)
    assert len(responses) >= sum(1 for r in batch if r.model_name not in (LLM, ECHO))


@settings(max_examples=120, **FUZZ)
@given(data=st.binary(min_size=1, max_size=64))
def test_fuzz_undecodable_bytes(server, stub, outcomes, data: bytes) -> None:
    """Bytes that may not even parse as a ModelInferRequest: those that do not parse get
    INVALID_ARGUMENT naming the message type (on a stream: an error message, and the stream
    goes on); the rest are requests as above."""
    with grpc.insecure_channel(server.url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        try:
            call(data, timeout=30)
            outcomes["OK"] += 1
        except grpc.RpcError as e:
            if "malformed request message" in (e.details() or ""):
                assert "inference.ModelInferRequest" in e.details(), e.details()
                outcomes["undecodable (of INVALID_ARGUMENT)"] += 1
            _check(outcomes, e.code(), e.details())
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                       response_deserializer=pb.ModelStreamInferResponse.FromString)
        good = pb.ModelInferRequest(model_name="nope").SerializeToString()
        replies = list(stream(iter([data, good]), timeout=30))
        outcomes["stream_requests"] += 2
        assert replies and "unknown model 'nope'" in replies[-1].error_message, replies


def test_after_fuzzing_ranks_unchanged_and_exact(server, outcomes, checkpoint_dir) -> None:
    """Last: thousands of calls later the same ranks answer token-exact, and nothing leaked."""
    total = sum(v for k, v in outcomes.items() if k.isupper() or k == "stream_requests")
    print(f"\nfuzz outcomes: {dict(outcomes)} (total {total})")
    assert total >= 2000, outcomes
    assert descendants(server) == server.ranks
    prompt = [3, 14, 15, 92, 65]
    ref = reference(checkpoint_dir("llama"), [prompt], 10)
    with grpcclient.InferenceServerClient(server.url) as client:
        assert client.is_server_ready()
        got = client.infer(LLM, ids_inputs(prompt, 10)).as_numpy("output_ids").tolist()
        stats = client.infer(LLM, ids_inputs(prompt, 1)).get_response().parameters
    assert got == ref[0]
    assert stats["kv_free_blocks"].int64_param == stats["kv_total_blocks"].int64_param
    assert "Traceback" not in server.text(), server.text()[-3000:]
