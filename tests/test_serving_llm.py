"""The giant-model backend through the gRPC front at tp=2, pp=2 (4 ranks): streaming and
non-streaming generation token-identical to transformers greedy, text in/text out, stop words,
16 concurrent requests, cancellation freeing KV blocks, errors, and perf_analyzer."""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from configs.demo import build_demo_model
from serving.cli import add_llm_model
from tests.checkpoints import reference_generate
from tests.perf import run_perf_analyzer
from tests.serving_helpers import Server, infer_input

MODEL = "llm"
NUM_BLOCKS = 24  # x 16 tokens: less than the context needs, so 16 requests preempt


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo") / "tiny-llama")


@pytest.fixture(scope="module")
def server(demo: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("llm-serving")
    add_llm_model(tmp / "repo", MODEL, demo, tp=2, pp=2, dtype="fp32",
                  extra={"num_blocks": str(NUM_BLOCKS)})
    srv = Server(tmp / "repo", tmp / "server.log", module="launcher.cli")
    yield srv
    assert srv.stop() == 0, srv.text()


def ids_inputs(prompt: list[int], max_tokens: int, stream: bool = False, **extra) -> list:
    inputs = [infer_input("input_ids", np.array(prompt, np.int32), "INT32"),
              infer_input("max_tokens", np.array([max_tokens], np.int32), "INT32"),
              infer_input("ignore_eos", np.array([True]), "BOOL"),
              infer_input("stream", np.array([stream]), "BOOL")]
    for name, (value, dt) in extra.items():
        inputs.append(infer_input(name, np.array(value, dtype=triton_to_np_dtype(dt)), dt))
    return inputs


def text_inputs(text: str, max_tokens: int, stream: bool = False, **extra) -> list:
    inputs = [infer_input("text_input", np.array([text.encode()], dtype=object), "BYTES"),
              infer_input("max_tokens", np.array([max_tokens], np.int32), "INT32"),
              infer_input("ignore_eos", np.array([True]), "BOOL"),
              infer_input("stream", np.array([stream]), "BOOL")]
    for name, (value, dt) in extra.items():
        inputs.append(infer_input(name, np.array(value, dtype=triton_to_np_dtype(dt)), dt))
    return inputs


def stream_generate(url: str, inputs: list, cancel_after: int | None = None
                    ) -> list[tuple[list[int], bytes | None, bool, dict]]:
    """One streamed request: per response (output_ids, text_output, final, parameters)."""
    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(lambda result, error: q.put((result, error)))
    c.async_stream_infer(MODEL, inputs, request_id="req")
    got = []
    while True:
        result, error = q.get(timeout=60)
        assert error is None, error
        resp = result.get_response()
        params = {k: getattr(v, v.WhichOneof("parameter_choice"))
                  for k, v in resp.parameters.items()}
        text = result.as_numpy("text_output")
        got.append((result.as_numpy("output_ids").tolist(),
                    None if text is None else bytes(text[0]), params[
                        "triton_final_response"], params))
        if got[-1][2] or (cancel_after is not None and len(got) >= cancel_after):
            break
    c.stop_stream(cancel_requests=cancel_after is not None)
    c.close()
    return got


PROMPTS = [[5, 9, 200, 31, 77, 8], [300], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]]
NEW = 10


@pytest.fixture(scope="module")
def reference(demo: Path) -> list[list[int]]:
    ids, _ = reference_generate(demo, PROMPTS, NEW)
    assert all(len(set(r)) >= 3 for r in ids), ids  # varied tokens, or parity proves little
    return ids


def test_nonstreaming_matches_transformers(client, reference) -> None:
    assert client.is_model_ready(MODEL)
    for prompt, ref in zip(PROMPTS, reference, strict=True):
        result = client.infer(MODEL, ids_inputs(prompt, NEW))
        assert result.as_numpy("output_ids").tolist() == ref
        params = result.get_response().parameters
        assert params["finish_reason"].string_param == "length"
        assert params["completion_tokens"].int64_param == NEW


def test_streaming_matches_transformers(server, reference) -> None:
    for prompt, ref in zip(PROMPTS, reference, strict=True):
        got = stream_generate(server.url, ids_inputs(prompt, NEW, stream=True))
        assert [f for _, _, f, _ in got] == [False] * (len(got) - 1) + [True]
        assert [t for ids, _, _, _ in got for t in ids] == ref
        assert len(got) >= NEW // 2  # one response per text chunk, not one at the end


def test_text_in_text_out(client, server, demo) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo))
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    ref, _ = reference_generate(demo, [ids], 12)
    expected = tok.decode(ref[0], skip_special_tokens=True)
    full = client.infer(MODEL, text_inputs(prompt, 12)).as_numpy("text_output")[0]
    assert full.decode() == prompt + expected
    excl = client.infer(MODEL, text_inputs(prompt, 12, exclude_input_in_output=([True], "BOOL")))
    assert excl.as_numpy("text_output")[0].decode() == expected
    chunks = stream_generate(server.url, text_inputs(prompt, 12, stream=True))
    assert b"".join(t for _, t, _, _ in chunks).decode() == expected


def test_stop_words_cut_text(client, server) -> None:
    prompt = "Tensor parallel ranks"
    base = client.infer(MODEL, text_inputs(prompt, 16, exclude_input_in_output=(
        [True], "BOOL"))).as_numpy("text_output")[0].decode()
    word = base[6:9]
    assert len(word.strip()) >= 2, base
    cut = base[:base.find(word)]
    extra = {"exclude_input_in_output": ([True], "BOOL"), "stop_words": ([word.encode()],
                                                                        "BYTES")}
    result = client.infer(MODEL, text_inputs(prompt, 16, **extra))
    assert result.as_numpy("text_output")[0].decode() == cut
    assert result.get_response().parameters["finish_reason"].string_param == "stop"
    chunks = stream_generate(server.url, text_inputs(prompt, 16, stream=True, **extra))
    assert b"".join(t for _, t, _, _ in chunks).decode() == cut


def test_16_concurrent_requests_match_solo(server, demo) -> None:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, size=int(n)).tolist() for n in rng.integers(1, 40, size=16)]
    lengths = [int(n) for n in rng.integers(4, 20, size=16)]
    ref, _ = reference_generate(demo, prompts, max(lengths))
    got: dict[int, list[int]] = {}

    def one(i: int) -> None:
        chunks = stream_generate(server.url, ids_inputs(prompts[i], lengths[i], stream=True))
        got[i] = [t for ids, _, _, _ in chunks for t in ids]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(got) == list(range(16))
    for i in range(16):
        assert got[i] == ref[i][:lengths[i]], i


def test_cancel_frees_blocks(client, server) -> None:
    before = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    got = stream_generate(server.url, ids_inputs([4, 5, 6], 300, stream=True), cancel_after=3)
    assert len(got) == 3 and not got[-1][2]  # cancelled mid-generation
    deadline = time.monotonic() + 20
    pattern = re.compile(r"cancelled after (\d+) tokens; KV blocks free (\d+)/(\d+)")
    while not (m := pattern.search(server.text())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert m, server.text()[-2000:]
    assert int(m.group(1)) < 300 and int(m.group(2)) == int(m.group(3)) == NUM_BLOCKS
    after = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    fails = lambda s: int(s["inference_stats"]["fail"].get("count", 0))  # noqa: E731
    assert fails(after) == fails(before) + 1
    result = client.infer(MODEL, ids_inputs([7, 8], 4))
    params = result.get_response().parameters
    assert params["kv_free_blocks"].int64_param == params["kv_total_blocks"].int64_param


@pytest.mark.parametrize(("inputs", "fragment"), [
    (lambda: text_inputs("", 4), "empty"),
    (lambda: ids_inputs([1, 2], 0), "max_tokens must be >= 1"),
    (lambda: ids_inputs([1, 2], 10**6), "KV cache"),
    (lambda: ids_inputs([5] * 600, 4), "context"),
    (lambda: ids_inputs([1, 100000], 4), "outside the vocabulary"),
    (lambda: ids_inputs([1, 2], 4, temperature=([-1.0], "FP32")), "temperature"),
    (lambda: [infer_input("text_input", np.array([b"\xff\xfe"], dtype=object), "BYTES")],
     "UTF-8"),
    (lambda: [infer_input("max_tokens", np.array([4], np.int32), "INT32")], "text_input"),
])
def test_bad_requests_are_rejected(client, inputs, fragment: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, inputs())
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
    assert fragment in info.value.message()
    assert client.infer(MODEL, ids_inputs([9, 10], 2)).as_numpy("output_ids").size == 2


def test_perf_analyzer_llm_zero_errors(server, tmp_path: Path) -> None:
    data = {"data": [{"input_ids": {"content": [5, 6, 7, 8], "shape": [4]},
                      "max_tokens": [6], "ignore_eos": [True]}]}
    (tmp_path / "data.json").write_text(json.dumps(data))
    report = run_perf_analyzer(server.url, MODEL, tmp_path,
                               ["--streaming", "--input-data", str(tmp_path / "data.json")])
    assert report["errors"] == 0, report["output"]
    assert report["rows"] and all(r["Inferences/Second"] > 0 for r in report["rows"])
