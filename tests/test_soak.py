"""Soak: several thousand mixed requests (the tp=2 giant model, a python model and an ONNX
model; unary and streaming; some cancelled on purpose) from concurrent clients. Every response
is checked against its expected value (transformers greedy tokens, the python model's formula,
the eager torch model); no request may be lost, wrong or fail unexpectedly."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import torch
from tritonclient.grpc import InferResult, service_pb2_grpc
from tritonclient.grpc import service_pb2 as pb

from serving.convert import serialize_bytes
from tests.backend_helpers import write_model
from tests.reliability_support import ECHO, LLM, build_repo, descendants, reference, start
from tests.torch_models import Classifier, save_onnx

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
REQUESTS = int(os.environ.get("SHARDSERVE_SOAK_REQUESTS", "8000"))
CLIENTS = 8
ONNX = "clf_onnx"
PROMPTS = [[7 + i, 3 * i + 1, 50, 60 + i, 99 - i] for i in range(10)]
MAX_NEW = 10
ONNX_CONFIG = """
name: "clf_onnx"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ { name: "features" data_type: TYPE_FP32 dims: [ 8 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 4 ] },
         { name: "probs" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { max_queue_delay_microseconds: 1000 }
"""


@pytest.fixture(scope="module")
def server(checkpoint_dir, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("soak")
    repo = build_repo(tmp / "repo", checkpoint_dir("llama"))
    write_model(repo, ONNX, ONNX_CONFIG, {})
    save_onnx(Classifier(), (torch.randn(2, 8),), repo / ONNX / "1" / "model.onnx",
              ["features"], ["logits", "probs"])
    srv = start(repo, tmp / "server.log")
    yield srv
    assert srv.stop() == 0, srv.text()[-3000:]


# --- requests and their expected results ------------------------------------------------------
def _request(model: str, tensors: list[tuple[str, np.ndarray, str]]) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    for name, array, datatype in tensors:
        req.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        raw = serialize_bytes(array) if datatype == "BYTES" else array.astype(
            array.dtype.newbyteorder("<")).tobytes()
        req.raw_input_contents.append(raw)
    return req


@dataclass
class Job:
    kind: str  # llm / echo / onnx
    request: pb.ModelInferRequest
    expected: object
    stream: bool = False
    cancel: bool = False  # cancel after the first response (llm) / tight deadline (echo)


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def add(self, key: str, problem: str | None = None) -> None:
        with self.lock:
            self.counts[key] += 1
            if problem:
                self.problems.append(problem)


def make_job(rng: random.Random, refs: list[list[int]], clf: Classifier) -> Job:
    roll = rng.random()
    if roll < 0.15:
        i, n = rng.randrange(len(PROMPTS)), rng.randint(1, MAX_NEW)
        stream = rng.random() < 0.6
        req = _request(LLM, [("input_ids", np.array(PROMPTS[i], np.int32), "INT32"),
                             ("max_tokens", np.array([n], np.int32), "INT32"),
                             ("ignore_eos", np.array([True]), "BOOL"),
                             ("stream", np.array([stream]), "BOOL")])
        return Job("llm", req, refs[i][:n], stream=stream,
                   cancel=stream and n > 3 and rng.random() < 0.15)
    if roll < 0.65:
        x = np.array([rng.uniform(-5, 5) for _ in range(rng.randint(1, 16))], np.float32)
        word = "".join(rng.choice("abcxyzé") for _ in range(rng.randint(1, 8))).encode()
        reps = rng.randint(1, 3)
        cancel = rng.random() < 0.01
        tensors = [("IN", x, "FP32"), ("TEXT", np.array([word], dtype=object), "BYTES"),
                   ("REPEAT", np.array([reps], np.int32), "INT32")]
        if cancel:
            tensors.append(("DELAY_MS", np.array([100], np.int32), "INT32"))
        return Job("echo", _request(ECHO, tensors), (np.tile(2 * x + 1, reps), word.upper()),
                   stream=rng.random() < 0.3, cancel=cancel)
    x = np.array([[rng.gauss(0, 1) for _ in range(8)] for _ in range(rng.randint(1, 4))],
                 np.float32)
    with torch.no_grad():
        logits, probs = clf(torch.from_numpy(x))
    return Job("onnx", _request(ONNX, [("features", x, "FP32")]),
               (logits.numpy(), probs.numpy()), stream=rng.random() < 0.2)


# --- running a job ------------------------------------------------------------------------------
def _wrong(job: Job, result: InferResult) -> str | None:
    if job.kind == "echo":
        out, text = job.expected
        if not (np.array_equal(result.as_numpy("OUT"), out)
                and result.as_numpy("TEXT_OUT")[0] == text):
            return f"echo: got {result.as_numpy('OUT')} for {out}"
    elif job.kind == "onnx":
        logits, probs = job.expected
        if not (np.allclose(result.as_numpy("logits"), logits, atol=1e-5)
                and np.allclose(result.as_numpy("probs"), probs, atol=1e-5)):
            return "onnx: outputs differ from the eager model"
    return None


def _run_stream(stub: service_pb2_grpc.GRPCInferenceServiceStub, job: Job, tally: Tally
                ) -> None:
    call = stub.ModelStreamInfer(iter([job.request]), timeout=120)
    tokens: list[int] = []
    try:
        for msg in call:
            if msg.error_message:
                tally.add("failed", f"{job.kind} stream: {msg.error_message}")
                return
            result = InferResult(msg.infer_response)
            if job.kind != "llm":
                problem = _wrong(job, result)
                tally.add("wrong" if problem else "ok", problem)
                return
            tokens += result.as_numpy("output_ids").tolist()
            if job.cancel:
                call.cancel()
                ok = tokens == job.expected[:len(tokens)]
                tally.add("cancelled" if ok else "wrong", None if ok else f"prefix {tokens}")
                return
            if msg.infer_response.parameters["triton_final_response"].bool_param:
                ok = tokens == job.expected
                tally.add("ok" if ok else "wrong", None if ok else f"{tokens} != "
                          f"{job.expected}")
                return
        tally.add("lost", f"{job.kind} stream ended without a final response "
                  f"(cancel={job.cancel}, {len(tokens)} tokens)")
    except grpc.RpcError as e:
        if job.cancel and e.code() == grpc.StatusCode.CANCELLED:
            tally.add("cancelled")
        else:
            tally.add("failed", f"{job.kind} stream: {e.code()} {e.details()}")


def _run_unary(stub: service_pb2_grpc.GRPCInferenceServiceStub, job: Job, tally: Tally
               ) -> None:
    try:
        result = InferResult(stub.ModelInfer(job.request, timeout=0.02 if job.cancel else 120))
    except grpc.RpcError as e:
        if job.cancel and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            tally.add("cancelled")
        elif e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            tally.add("lost", f"{job.kind}: no answer in 120 s")
        else:
            tally.add("failed", f"{job.kind}: {e.code()} {e.details()}")
        return
    if job.kind == "llm":
        got = result.as_numpy("output_ids").tolist()
        problem = None if got == job.expected else f"llm {got} != {job.expected}"
    else:
        problem = _wrong(job, result)
    tally.add("wrong" if problem else "ok", problem)


def _client(url: str, seed: int, count: int, refs: list[list[int]], clf: Classifier,
            tally: Tally) -> None:
    rng = random.Random(seed)
    with grpc.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(count):
            job = make_job(rng, refs, clf)
            tally.add(f"sent_{job.kind}")
            (_run_stream if job.stream else _run_unary)(stub, job, tally)


def test_soak_mixed_workload(server, checkpoint_dir, tmp_path: Path) -> None:
    refs = reference(checkpoint_dir("llama"), PROMPTS, MAX_NEW)
    ranks = descendants(server)
    proc = psutil.Process(server.proc.pid)
    base = peak = proc.memory_info().rss / 2**20
    tally = Tally()
    per = REQUESTS // CLIENTS
    clf = Classifier()  # built once: its seeded init must not race with other threads
    threads = [threading.Thread(target=_client, args=(server.url, seed, per, refs, clf, tally))
               for seed in range(CLIENTS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, proc.memory_info().rss / 2**20)
        time.sleep(0.2)
    elapsed = time.monotonic() - t0
    c = tally.counts
    sent = sum(v for k, v in c.items() if k.startswith("sent_"))
    line = (f"soak: {sent} requests in {elapsed:.0f}s (llm {c['sent_llm']}, python "
            f"{c['sent_echo']}, onnx {c['sent_onnx']}): ok {c['ok']}, cancelled on purpose "
            f"{c['cancelled']}, wrong {c['wrong']}, failed {c['failed']}, lost {c['lost']}; "
            f"server RSS {base:.0f} -> peak {peak:.0f} MiB")
    print("\n" + line)
    assert not tally.problems, tally.problems[:10]
    assert sent == per * CLIENTS == c["ok"] + c["cancelled"], line
    assert c["cancelled"] > 0 and c["sent_llm"] > 0, line
    assert descendants(server) == ranks
    final = InferResult(service_pb2_grpc.GRPCInferenceServiceStub(
        grpc.insecure_channel(server.url)).ModelInfer(_request(LLM, [
            ("input_ids", np.array(PROMPTS[0], np.int32), "INT32"),
            ("max_tokens", np.array([1], np.int32), "INT32")])))
    params = final.get_response().parameters
    assert params["kv_free_blocks"].int64_param == params["kv_total_blocks"].int64_param
