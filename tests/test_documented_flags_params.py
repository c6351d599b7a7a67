"""config.pbtxt parameters the docs name, each shown to have its effect. Giant models are added
with `shardserve repo add --param KEY=VALUE` and served by a real server where the effect shows
through the protocol (`num_blocks`, `block_size`, `kv_cache_bytes`, `max_model_len`,
`max_running`, `dist_backend`); where it shows only inside the engine (`max_prefill_tokens`,
`microbatches`, `dtype`) the backend's own settings drive a real engine whose step plans are
recorded. Plus the pytorch and onnxruntime thread-count parameters."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from launcher.cli import main
from serving.backends.llm import LLMSettings
from serving.repository import ModelRepository
from tests.backend_helpers import CollectSink, make_request, parse_config
from tests.reliability_support import expect_error, ids_inputs, reference, start, stream_tokens
from tests.serving_helpers import Server

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# the tiny llama of tests/checkpoints.py: 4 layers, 2 kv heads of 16, fp32
LAYERS, KV_HEADS, HEAD_DIM, FP32 = 4, 2, 16, 4
KV_BYTES = 170_000  # not a multiple of a block's bytes: the cache is the whole blocks that fit


def repo_add(repo: Path, name: str, model: Path, *flags: str) -> None:
    """`shardserve repo add REPO NAME --model MODEL FLAGS...` through the CLI."""
    assert main(["repo", "add", str(repo), name, "--model", str(model), *flags]) == 0


def settings(repo: Path, name: str) -> LLMSettings:
    """What the LLM backend reads from the entry `repo add` wrote."""
    return LLMSettings.from_config(ModelRepository(repo).config(name), repo / name / "1")


# --- through a real server ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(checkpoint_dir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`small`: 5 blocks of 4 tokens, context 40, one running request; `sized`: a KV budget in
    bytes, gloo; `nccl` and `bogus` (dist_backend) are left for the tests to load."""
    tmp = tmp_path_factory.mktemp("params")
    ck = checkpoint_dir("llama")
    repo = tmp / "repo"
    repo_add(repo, "small", ck, "--param", "num_blocks=5", "--param", "block_size=4",
             "--param", "max_model_len=40", "--param", "max_running=1")
    repo_add(repo, "sized", ck, "--param", f"kv_cache_bytes={KV_BYTES}",
             "--param", "dist_backend=gloo")
    repo_add(repo, "nccl", ck, "--param", "dist_backend=nccl", "--param", "num_blocks=8")
    repo_add(repo, "bogus", ck, "--param", "dist_backend=mpi", "--param", "num_blocks=8")
    srv = start(repo, tmp / "server.log", "--model-control-mode", "explicit",
                "--load-model", "small", "--load-model", "sized")
    srv.checkpoint = ck
    yield srv
    assert srv.stop() == 0, srv.text()[-3000:]


def test_num_blocks_and_block_size(served: Server) -> None:
    """5 blocks of 4 tokens: the final response reports 5 blocks, 16 tokens fit, and 24 tokens
    (which 5 blocks of the default 16 would hold) are refused naming both numbers."""
    prompt = [3, 5, 7, 9]
    tokens, params = stream_tokens(served.url, ids_inputs(prompt, 12, stream=True),
                                   model="small")
    assert tokens == reference(served.checkpoint, [prompt], 12)[0]
    assert params["kv_total_blocks"] == 5 and params["kv_free_blocks"] <= 5
    with grpcclient.InferenceServerClient(served.url) as c:
        expect_error(lambda: c.infer("small", ids_inputs(list(range(3, 11)), 16)),
                     "INVALID_ARGUMENT", "24 tokens need more KV cache than the 5 blocks of 4")


def test_max_model_len(served: Server) -> None:
    """Context 40: a 40-token prompt is refused as longer than the context (the checkpoint's
    own is 256)."""
    with grpcclient.InferenceServerClient(served.url) as c:
        expect_error(lambda: c.infer("small", ids_inputs(list(range(3, 43)), 1)),
                     "INVALID_ARGUMENT", "the model's context is 40")


def test_max_running_one_runs_requests_one_after_the_other(served: Server) -> None:
    """Two requests on one stream to a model with max_running 1: every response of the first
    (its final one included) comes before the second's first, and both are token-exact."""
    prompts = {"a": [3, 5, 7, 9], "b": [20, 21]}
    new = {"a": 8, "b": 6}
    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(served.url)
    c.start_stream(lambda result, error: q.put((result, error)))
    order: list[tuple[str, bool]] = []
    got: dict[str, list[int]] = {"a": [], "b": []}
    try:
        for rid in ("a", "b"):
            c.async_stream_infer("small", ids_inputs(prompts[rid], new[rid], stream=True),
                                 request_id=rid)
        while sum(final for _, final in order) < 2:
            result, error = q.get(timeout=120)
            assert error is None, error
            resp = result.get_response()
            final = resp.parameters["triton_final_response"].bool_param
            got[resp.id] += result.as_numpy("output_ids").tolist()
            order.append((resp.id, final))
    finally:
        c.stop_stream()
        c.close()
    first_b = next(i for i, (rid, _) in enumerate(order) if rid == "b")
    assert order[first_b - 1] == ("a", True), order
    assert all(rid == "a" for rid, _ in order[:first_b]), order
    for rid in ("a", "b"):
        assert got[rid] == reference(served.checkpoint, [prompts[rid]], new[rid])[0]


def test_kv_cache_bytes(served: Server) -> None:
    """A KV budget in bytes buys the whole blocks that fit: 2 (k, v) x layers x kv heads x
    head dim x 16 tokens x 4 bytes each."""
    per_block = 2 * LAYERS * KV_HEADS * HEAD_DIM * 16 * FP32
    prompt = [4, 6, 8]
    tokens, params = stream_tokens(served.url, ids_inputs(prompt, 5, stream=True),
                                   model="sized")
    assert params["kv_total_blocks"] == KV_BYTES // per_block == 10
    assert tokens == reference(served.checkpoint, [prompt], 5)[0]


def test_dist_backend(served: Server) -> None:
    """`dist_backend nccl` is what the ranks use: without CUDA the load fails naming NCCL and
    the server keeps serving; a value that is no backend is refused naming the parameter."""
    with grpcclient.InferenceServerClient(served.url) as c:
        if torch.cuda.is_available():
            c.load_model("nccl")
            assert c.is_model_ready("nccl")
        else:
            expect_error(lambda: c.load_model("nccl"), "INTERNAL", "model 'nccl'",
                         "backend nccl asked for, but CUDA is not available")
            assert not c.is_model_ready("nccl")
        expect_error(lambda: c.load_model("bogus"), "INVALID_ARGUMENT",
                     "parameter 'dist_backend' must be auto, gloo or nccl, got 'mpi'")
        assert c.is_model_ready("sized")


# --- inside the engine -------------------------------------------------------------------------
def _engine_run(s: LLMSettings, prompts: list[list[int]], new_tokens: int
                ) -> tuple[list[list[int]], list[tuple[int, int]], str]:
    """Start the engine the backend would start for `s` (spec built as in LLMBackend.load),
    generate greedily, and record each prefill plan's (sequences, micro-batches run)."""
    from launcher.local import start_local_engine
    from runtime.types import SamplingParams
    from runtime.worker import EngineSpec

    spec = EngineSpec(str(s.model), s.tp, s.pp, s.dtype, s.engine, backend=s.dist_backend)
    local = start_local_engine(spec)
    plans: list[tuple[int, int]] = []
    runner = local.engine.runner
    execute = runner.execute

    def spy(plan: Any) -> Any:
        if plan.seqs and plan.seqs[0].start_pos == 0:
            plans.append((len(plan.seqs), len(plan.split())))
        return execute(plan)

    runner.execute = spy
    try:
        results = local.engine.generate(prompts, SamplingParams(max_tokens=new_tokens,
                                                                ignore_eos=True))
        return [r.token_ids for r in results], plans, local.engine.dtype
    finally:
        local.close()


def test_max_prefill_tokens(checkpoint_dir, tmp_path: Path) -> None:
    """Three 6-token prompts: by default one prefill step takes all three; with
    max_prefill_tokens 8 each gets its own. Tokens equal transformers either way."""
    ck = checkpoint_dir("llama")
    repo = tmp_path / "repo"
    repo_add(repo, "budget", ck, "--param", "max_prefill_tokens=8", "--param", "num_blocks=16")
    repo_add(repo, "default", ck, "--param", "num_blocks=16")
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [30, 31, 32, 33, 34, 35]]
    ref = reference(ck, prompts, 4)
    tokens, plans, _ = _engine_run(settings(repo, "budget"), prompts, 4)
    assert tokens == ref and [n for n, _ in plans] == [1, 1, 1]
    tokens, plans, _ = _engine_run(settings(repo, "default"), prompts, 4)
    assert tokens == ref and [n for n, _ in plans] == [3]


def test_microbatches(checkpoint_dir, tmp_path: Path) -> None:
    """pp=2, two 40-token prompts (80 new tokens, enough to split): by default the prefill runs
    as 2 micro-batches (one per stage), with microbatches 1 as one. Tokens equal transformers."""
    ck = checkpoint_dir("llama")
    repo = tmp_path / "repo"
    repo_add(repo, "one", ck, "--pp", "2", "--param", "microbatches=1", "--param",
             "num_blocks=16")
    repo_add(repo, "default", ck, "--pp", "2", "--param", "num_blocks=16")
    prompts = [list(range(3, 43)), list(range(50, 90))]
    ref = reference(ck, prompts, 3)
    tokens, plans, _ = _engine_run(settings(repo, "one"), prompts, 3)
    assert tokens == ref and plans == [(2, 1)]
    tokens, plans, _ = _engine_run(settings(repo, "default"), prompts, 3)
    assert tokens == ref and plans == [(2, 2)]


def test_dtype_parameter(checkpoint_dir, tmp_path: Path) -> None:
    """`repo add --dtype bf16` (parameter dtype) runs the fp32 checkpoint in bfloat16."""
    repo = tmp_path / "repo"
    repo_add(repo, "half", checkpoint_dir("llama"), "--dtype", "bf16", "--param", "num_blocks=8")
    s = settings(repo, "half")
    assert s.dtype == "bf16"
    tokens, _, dtype = _engine_run(s, [[3, 5, 7]], 2)
    assert dtype == "bfloat16" and len(tokens[0]) == 2


# --- ordinary backends -------------------------------------------------------------------------
def _classifier_config(backend: str, extra: str) -> str:
    return f"""
    name: "clf"
    backend: "{backend}"
    max_batch_size: 8
    input [ {{ name: "features" data_type: TYPE_FP32 dims: [ 8 ] }} ]
    output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ 4 ] }},
             {{ name: "probs" data_type: TYPE_FP32 dims: [ 4 ] }} ]
    {extra}
    """


def test_pytorch_intra_op_thread_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """INTRA_OP_THREAD_COUNT 3: the instance thread that runs the model sets 3 torch threads;
    without the parameter it leaves torch's default alone."""
    from serving.backends.pytorch import PytorchBackend
    from tests.torch_models import Classifier, save_torchscript

    save_torchscript(Classifier(), tmp_path / "clf" / "1" / "model.pt")
    real = torch.set_num_threads
    calls: list[tuple[int, str, int]] = []

    def spy(n: int) -> None:
        real(n)
        calls.append((n, threading.current_thread().name, torch.get_num_threads()))

    monkeypatch.setattr(torch, "set_num_threads", spy)
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    for extra, expected in (('parameters { key: "INTRA_OP_THREAD_COUNT" '
                             'value { string_value: "3" } }', [3]), ("", [])):
        calls.clear()
        model = PytorchBackend(parse_config(_classifier_config("pytorch", extra)),
                               tmp_path / "clf", 1)
        model.load()
        try:
            sink = CollectSink()
            model.submit(make_request("clf", features=x), sink)
            assert sink.outputs()["logits"].shape == (2, 4)
        finally:
            model.unload()
        assert [n for n, _, _ in calls] == expected, calls
        assert all(name != "MainThread" and now == n for n, name, now in calls), calls


def test_onnx_intra_op_thread_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """intra_op_thread_count 1 reaches the onnxruntime session's options."""
    import onnxruntime as ort

    from serving.backends.onnx import OnnxBackend
    from tests.torch_models import Classifier, save_onnx

    save_onnx(Classifier(), (torch.randn(2, 8),), tmp_path / "clf" / "1" / "model.onnx",
              ["features"], ["logits", "probs"])
    real = ort.InferenceSession
    seen: list[int] = []

    def session(*args: Any, **kwargs: Any) -> Any:
        sess = real(*args, **kwargs)
        seen.append(sess.get_session_options().intra_op_num_threads)
        return sess

    monkeypatch.setattr(ort, "InferenceSession", session)
    for extra, expected in (('parameters { key: "intra_op_thread_count" '
                             'value { string_value: "1" } }', 1), ("", 0)):
        seen.clear()
        model = OnnxBackend(parse_config(_classifier_config("onnxruntime", extra)),
                            tmp_path / "clf", 1)
        model.load()
        model.unload()
        assert seen and set(seen) == {expected}, seen
