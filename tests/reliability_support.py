"""Support for the reliability, security, fuzz and soak tests: a repository with a tp=2 giant
model and ordinary models, server start-up, rank and memory inspection, request builders."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from serving.cli import add_llm_model
from tests.backend_helpers import write_model
from tests.serving_helpers import Server, infer_input

LLM = "llm"
ECHO = "echo"
# An ordinary python model: OUT = tile(2 * IN + 1, REPEAT), TEXT_OUT = upper(TEXT), after
# sleeping DELAY_MS (out-of-range values are refused). Deterministic, so every response has a
# known expected value. GATE (a file path) holds the execution until that file exists: it
# writes GATE.started-<n> (n = the execution's number) when it starts waiting, so a test can
# keep instances busy for exactly as long as it needs, and knows when they are.
ECHO_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "IN" data_type: TYPE_FP32 dims: [ -1 ] }},
        {{ name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
        {{ name: "REPEAT" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
        {{ name: "DELAY_MS" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
        {{ name: "GATE" data_type: TYPE_STRING dims: [ 1 ] optional: true }} ]
output [ {{ name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] }},
         {{ name: "TEXT_OUT" data_type: TYPE_STRING dims: [ 1 ] }} ]
instance_group [ {{ count: {instances} }} ]
{extra}
"""
ECHO_MODEL = '''
import itertools
import os
import time

import numpy as np

from serving.python_model import (InferenceResponse, PythonModel, Tensor, TritonError,
                                  get_input_tensor_by_name)

_EXECUTIONS = itertools.count(1)


def hold(gate):
    open(f"{gate}.started-{next(_EXECUTIONS)}", "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.002)


class Echo(PythonModel):
    def execute(self, requests):
        out = []
        for r in requests:
            gate = get_input_tensor_by_name(r, "GATE")
            if gate is not None:
                hold(bytes(gate.as_numpy().reshape(-1)[0]).decode())
            x = get_input_tensor_by_name(r, "IN").as_numpy()
            rep = get_input_tensor_by_name(r, "REPEAT")
            delay = get_input_tensor_by_name(r, "DELAY_MS")
            delay_ms = int(delay.as_numpy().reshape(-1)[0]) if delay is not None else 0
            reps = int(rep.as_numpy().reshape(-1)[0]) if rep is not None else 1
            if not (0 <= delay_ms <= 5000 and 1 <= reps <= 10**6 and x.size * reps <= 10**7):
                out.append(InferenceResponse(error=TritonError(
                    "DELAY_MS must be in 0..5000 and REPEAT in 1..1e6", TritonError.INVALID_ARG)))
                continue
            time.sleep(delay_ms / 1000)
            tensors = [Tensor("OUT", np.tile(2 * x + 1, reps).astype(np.float32))]
            text = get_input_tensor_by_name(r, "TEXT")
            if text is not None:
                word = bytes(text.as_numpy().reshape(-1)[0]).upper()
                tensors.append(Tensor("TEXT_OUT", np.array([word], dtype=object)))
            out.append(InferenceResponse(tensors))
        return out
'''


def add_echo(repo: Path, name: str = ECHO, instances: int = 2, extra: str = "") -> None:
    write_model(repo, name, ECHO_CONFIG.format(name=name, instances=instances, extra=extra),
                {"model.py": ECHO_MODEL})


def build_repo(repo: Path, checkpoint: Path, **llm_params: Any) -> Path:
    """`llm` (tp=2 over the tiny checkpoint, through `repo add`) and the `echo` python model."""
    params = {"max_model_len": "64", "num_blocks": "64", **{k: str(v) for k, v in
                                                           llm_params.items()}}
    add_llm_model(repo, LLM, checkpoint, tp=2, dtype="fp32", extra=params, force=True)
    add_echo(repo)
    return repo


_REFERENCES: dict[tuple[str, tuple[int, ...]], list[int]] = {}


def reference(checkpoint: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers greedy tokens per prompt, cached per process (a shorter run of a greedy
    generation is a prefix of a longer one, so one run serves every length)."""
    from tests.checkpoints import reference_generate

    todo = sorted({tuple(p) for p in prompts
                   if len(_REFERENCES.get((str(checkpoint), tuple(p)), [])) < new_tokens})
    if todo:
        ids, _ = reference_generate(checkpoint, [list(p) for p in todo], new_tokens)
        for p, r in zip(todo, ids, strict=True):
            _REFERENCES[(str(checkpoint), p)] = r
    return [_REFERENCES[(str(checkpoint), tuple(p))][:new_tokens] for p in prompts]


def start(repo: Path, log: Path, *args: str) -> Server:
    return Server(repo, log, "--metrics-port", "0", *args, module="launcher.cli")


def descendants(server: Server) -> dict[int, float]:
    """pid -> create time of the giant model's rank processes below the server (spawned
    multiprocessing children; not multiprocessing's resource tracker, not zombies)."""
    out = {}
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                out[p.pid] = p.create_time()
        except psutil.NoSuchProcess:
            continue
    return out


def rss_mib(server: Server) -> float:
    return psutil.Process(server.proc.pid).memory_info().rss / 2**20


# --- requests ---------------------------------------------------------------------------------
def ids_inputs(prompt: list[int], max_tokens: int, stream: bool = False,
               **scalars: tuple[Any, str]) -> list[grpcclient.InferInput]:
    """LLM inputs: token ids, max_tokens, ignore_eos (so transformers' greedy output is the
    reference), stream, plus `name=(value, datatype)` scalars."""
    inputs = [infer_input("input_ids", np.array(prompt, np.int32), "INT32"),
              infer_input("max_tokens", np.array([max_tokens], np.int32), "INT32"),
              infer_input("ignore_eos", np.array([True]), "BOOL"),
              infer_input("stream", np.array([stream]), "BOOL")]
    for name, (value, datatype) in scalars.items():
        dtype = {"FP32": np.float32, "INT32": np.int32, "UINT64": np.uint64}[datatype]
        inputs.append(infer_input(name, np.array([value], dtype), datatype))
    return inputs


def echo_inputs(x: np.ndarray, text: bytes | None = None, repeat: int | None = None,
                delay_ms: int | None = None, gate: Path | None = None
                ) -> list[grpcclient.InferInput]:
    """Echo inputs; `gate` holds the execution until that file exists."""
    inputs = [infer_input("IN", x.astype(np.float32), "FP32")]
    if gate is not None:
        inputs.append(infer_input("GATE", np.array([str(gate).encode()], dtype=object), "BYTES"))
    if text is not None:
        inputs.append(infer_input("TEXT", np.array([text], dtype=object), "BYTES"))
    if repeat is not None:
        inputs.append(infer_input("REPEAT", np.array([repeat], np.int32), "INT32"))
    if delay_ms is not None:
        inputs.append(infer_input("DELAY_MS", np.array([delay_ms], np.int32), "INT32"))
    return inputs


def expect_error(call: Callable[[], Any], status: str, *fragments: str) -> str:
    """Run `call`; it must fail with gRPC `status` and a message holding every fragment."""
    with pytest.raises(InferenceServerException) as info:
        call()
    got = info.value
    assert got.status() == f"StatusCode.{status}", (got.status(), got.message())
    for fragment in fragments:
        assert fragment in (got.message() or ""), (fragment, got.message())
    return got.message() or ""


def stream_tokens(url: str, inputs: list, model: str = LLM, timeout_s: float = 60.0,
                  **client_kw: Any) -> tuple[list[int], dict[str, Any]]:
    """One streamed LLM request: its tokens and the final response's parameters."""
    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url, **client_kw)
    c.start_stream(lambda result, error: q.put((result, error)))
    try:
        c.async_stream_infer(model, inputs)
        tokens: list[int] = []
        deadline = time.monotonic() + timeout_s
        while True:
            result, error = q.get(timeout=max(deadline - time.monotonic(), 0.1))
            if error is not None:
                raise error
            tokens += result.as_numpy("output_ids").tolist()
            params = {k: getattr(v, v.WhichOneof("parameter_choice"))
                      for k, v in result.get_response().parameters.items()}
            if params.get("triton_final_response"):
                return tokens, params
    finally:
        c.stop_stream()
        c.close()


# --- waiting for events -----------------------------------------------------------------------
HANG_S = 120.0  # only a hang takes this long


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = HANG_S) -> None:
    """Poll `check` until it holds; fail naming `what` after a deadline that only a hang hits."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def held(gate: Path) -> int:
    """How many executions have started waiting on `gate` (see ECHO_MODEL)."""
    return len(list(gate.parent.glob(gate.name + ".started-*")))


def metric(server: Server, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    import re
    import urllib.request

    port = re.search(r"metrics on http://[\w.]+:(\d+)/metrics", server.text()).group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as reply:
        text = reply.read().decode()
    body = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{re.escape(name + '{' + body + '}')} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0
