"""The OpenAI-compatible API through the official `openai` client (sync and async) against a
server the test starts: a giant model at pp=2 with a chat template, one without, and a python
model. Greedy text equals `transformers` (and the gRPC front's text), usage counts are exact,
logprobs equal transformers' log-softmax, errors are OpenAI-shaped 4xx while the server keeps
serving, and a client that disconnects frees its KV blocks."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import openai
import pytest
import torch
import tritonclient.grpc as grpcclient

from configs.demo import build_demo_model
from serving.cli import add_llm_model
from tests.backend_helpers import write_model
from tests.checkpoints import reference_generate
from tests.serving_helpers import Server
from tests.test_backends_python import ADD_SUB_CONFIG, TRITON_ADD_SUB
from tests.test_serving_llm import text_inputs

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant:{% endif %}")
ECHO_PY = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            text = pb_utils.get_input_tensor_by_name(r, "text_input").as_numpy()
            reply = np.array([b"echo: " + bytes(text.reshape(-1)[0])], dtype=object)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("text_output", reply)]))
        return out
'''
ECHO_CONFIG = """
name: "echo"
backend: "python"
input { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }
output { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] }
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("openai-models")
    chat = build_demo_model(root / "chat")
    tok = AutoTokenizer.from_pretrained(str(chat))
    tok.chat_template = TEMPLATE
    tok.save_pretrained(chat)
    return {"chat": chat, "plain": build_demo_model(root / "plain", seed=1)}


@pytest.fixture(scope="module")
def server(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("openai")
    add_llm_model(tmp / "repo", "llm", models["chat"], tp=1, pp=2, dtype="fp32",
                  extra={"num_blocks": "64"})
    add_llm_model(tmp / "repo", "plain", models["plain"], dtype="fp32")
    write_model(tmp / "repo", "echo", ECHO_CONFIG, {"model.py": ECHO_PY})
    write_model(tmp / "repo", "add_sub", ADD_SUB_CONFIG.format(name="add_sub", mbs=0),
                {"model.py": TRITON_ADD_SUB})
    srv = Server(tmp / "repo", tmp / "server.log", "--metrics-port", "0", module="launcher.cli")
    yield srv
    assert srv.stop() == 0, srv.text()[-3000:]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://localhost:{server.http_port}/v1", api_key="none",
                         max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(models["chat"]))


PROMPT = "The quick brown fox"


def greedy(models, tok, prompt_ids: list[int], n: int) -> list[int]:
    ids, _ = reference_generate(models["chat"], [prompt_ids], n)
    return ids[0]


def test_models_listed(client) -> None:
    names = sorted(m.id for m in client.models.list().data)
    assert names == ["echo", "llm", "plain"]  # add_sub is not a text model
    assert client.models.retrieve("llm").id == "llm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("add_sub")


def test_completion_matches_transformers_and_grpc(client, server, models, tok) -> None:
    ids = tok.encode(PROMPT)
    expected = tok.decode(greedy(models, tok, ids, 12), skip_special_tokens=True)
    r = client.completions.create(model="llm", prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 12)
    assert r.usage.total_tokens == len(ids) + 12
    g = grpcclient.InferenceServerClient(server.url)
    extra = {"exclude_input_in_output": ([True], "BOOL")}
    grpc_text = g.infer("llm", text_inputs(PROMPT, 12, **extra)).as_numpy("text_output")[0]
    assert grpc_text.decode() == expected
    ids_prompt = client.completions.create(model="llm", prompt=ids, max_tokens=12,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert ids_prompt.choices[0].text == expected
    echo = client.completions.create(model="llm", prompt=PROMPT, max_tokens=12, temperature=0,
                                     echo=True, extra_body={"ignore_eos": True})
    assert echo.choices[0].text == PROMPT + expected


def test_completion_streaming_and_usage(client) -> None:
    whole = client.completions.create(model="llm", prompt=PROMPT, max_tokens=10,
                                      temperature=0, extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(
        model="llm", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) >= 3  # streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_several_prompts_and_n(client) -> None:
    r = client.completions.create(model="llm", prompt=["a b", "c d e"], max_tokens=4, n=2,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text != r.choices[2].text == r.choices[3].text
    assert r.usage.completion_tokens == 16


def test_seed_determinism(client) -> None:
    def run(seed: int) -> list[str]:
        r = client.completions.create(model="llm", prompt=PROMPT, max_tokens=8, n=2,
                                      temperature=1.0, seed=seed,
                                      extra_body={"ignore_eos": True})
        return [c.text for c in r.choices]

    first = run(7)
    assert run(7) == first
    assert first[0] != first[1] or run(8) != first  # the seed drives the samples


def test_stop_words(client) -> None:
    base = client.completions.create(model="llm", prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    word = base[4:7]
    assert len(word.strip()) >= 2, base
    for stream in (False, True):
        r = client.completions.create(model="llm", prompt=PROMPT, max_tokens=16,
                                      temperature=0, stop=[word], stream=stream,
                                      extra_body={"ignore_eos": True})
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert text == base[:base.find(word)] and reason == "stop"


def test_logprobs_match_transformers(client, models, tok) -> None:
    import transformers as tf

    ids = tok.encode(PROMPT)
    r = client.completions.create(model="llm", prompt=PROMPT, max_tokens=5, temperature=0,
                                  logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    hf = tf.AutoModelForCausalLM.from_pretrained(models["chat"], dtype=torch.float32).eval()
    gen = greedy(models, tok, ids, 5)
    with torch.no_grad():
        logits = hf(torch.tensor([ids + gen])).logits[0, len(ids) - 1:-1]
    ref = torch.log_softmax(logits, -1)
    got = [ref[i, t].item() for i, t in enumerate(gen)]
    np.testing.assert_allclose(lp.token_logprobs, got, atol=1e-4)
    assert lp.tokens == [tok.decode([t]) for t in gen]
    for i, top in enumerate(lp.top_logprobs):
        best = torch.topk(ref[i], 3)
        assert len(top) == 3
        np.testing.assert_allclose(sorted(top.values(), reverse=True),
                                   best.values.tolist(), atol=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_chat_with_template(client, models, tok) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                   chat_template=TEMPLATE)
    ids = tok.encode(text, add_special_tokens=False)
    expected = tok.decode(greedy(models, tok, ids, 8), skip_special_tokens=True)
    r = client.chat.completions.create(model="llm", messages=messages, max_tokens=8,
                                       temperature=0, extra_body={"ignore_eos": True},
                                       logprobs=True, top_logprobs=2)
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == expected
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 8
    content = r.choices[0].logprobs.content
    assert len(content) == 8 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)


def test_chat_streaming_async(server, models, tok) -> None:
    async def run() -> list:
        c = openai.AsyncOpenAI(base_url=f"http://localhost:{server.http_port}/v1",
                               api_key="none", max_retries=0)
        stream = await c.chat.completions.create(
            model="llm", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
            temperature=0, stream=True, extra_body={"ignore_eos": True})
        chunks = [x async for x in stream]
        whole = await c.chat.completions.create(
            model="llm", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
            temperature=0, extra_body={"ignore_eos": True})
        await c.close()
        return [chunks, whole]

    chunks, whole = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(x.choices[0].delta.content or "" for x in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_python_text_model(client) -> None:
    r = client.completions.create(model="echo", prompt="ping", max_tokens=4)
    assert r.choices[0].text == "echo: ping"


@pytest.mark.parametrize(("call", "error", "fragment"), [
    (lambda c: c.completions.create(model="nope", prompt="x"), openai.NotFoundError,
     "model 'nope' does not exist"),
    (lambda c: c.completions.create(model="llm", prompt="x", temperature="hot"),
     openai.BadRequestError, "temperature"),
    (lambda c: c.completions.create(model="llm", prompt="x", extra_body={"colour": 1}),
     openai.BadRequestError, "colour: Extra inputs are not permitted"),
    (lambda c: c.completions.create(model="llm", prompt=""), openai.BadRequestError,
     "prompt must not be empty"),
    (lambda c: c.completions.create(model="llm", prompt="x", max_tokens=10**6),
     openai.BadRequestError, "maximum context length is 512 tokens"),
    (lambda c: c.chat.completions.create(model="plain", messages=[
        {"role": "user", "content": "x"}]), openai.BadRequestError, "no chat template"),
    (lambda c: c.chat.completions.create(model="add_sub", messages=[
        {"role": "user", "content": "x"}]), openai.BadRequestError,
     "not a text-generation model"),
])
def test_errors_are_openai_shaped(client, call, error, fragment: str) -> None:
    with pytest.raises(error) as info:
        call(client)
    assert fragment in info.value.message, info.value.message
    assert isinstance(info.value.body, dict) and "message" in info.value.body
    assert client.completions.create(model="llm", prompt="x", max_tokens=2).choices


def test_bad_json_is_a_400(server) -> None:
    req = urllib.request.Request(f"http://localhost:{server.http_port}/v1/completions",
                                 data=b"{oops", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 400
    assert b"failed to parse the request JSON" in info.value.read()


def _metric(server, name: str) -> float:
    port = re.search(r"metrics on http://[\w.]+:(\d+)/metrics", server.text()).group(1)
    text = urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=30).read().decode()
    m = re.search(rf'^{name}{{model="llm"}} (\S+)$', text, re.M)
    assert m, text
    return float(m.group(1))


def test_disconnect_frees_kv_blocks(server) -> None:
    async def read_two_chunks_and_leave() -> int:
        async with aiohttp.ClientSession() as s:
            r = await s.post(f"http://localhost:{server.http_port}/v1/completions", json={
                "model": "llm", "prompt": PROMPT, "max_tokens": 400, "stream": True,
                "temperature": 0, "ignore_eos": True})
            got = 0
            async for line in r.content:
                got += line.startswith(b"data:")
                if got == 2:
                    break
            r.close()  # drop the connection mid-stream
            return got

    assert asyncio.run(read_two_chunks_and_leave()) == 2
    deadline = time.monotonic() + 60
    pattern = re.compile(r"cancelled after (\d+) tokens; KV blocks free (\d+)/(\d+)")
    while not (m := pattern.search(server.text())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert m, server.text()[-2000:]
    assert int(m.group(1)) < 400 and m.group(2) == m.group(3)
    while _metric(server, "nv_llm_kv_cache_usage_ratio") != 0.0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert _metric(server, "nv_llm_num_requests_running") == 0



def _grpc_stream(url: str, inputs: list) -> list:
    import queue

    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(lambda result, error: q.put((result, error)))
    c.async_stream_infer("llm", inputs)
    got = []
    while True:
        result, error = q.get(timeout=120)
        if error is not None:
            c.stop_stream()
            raise error
        got.append(result)
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    c.stop_stream()
    return got


def test_vllm_tensor_convention_over_grpc(server, models, tok) -> None:
    """As genai-perf --backend vllm and Triton's OpenAI frontend send it."""
    from tests.serving_helpers import infer_input

    ids = tok.encode(PROMPT)
    ref = greedy(models, tok, ids, 6)
    sampling = json.dumps({"max_tokens": 6, "temperature": 0, "ignore_eos": True})
    inputs = [infer_input("text_input", np.array([PROMPT.encode()], dtype=object), "BYTES"),
              infer_input("stream", np.array([True]), "BOOL"),
              infer_input("sampling_parameters", np.array([sampling.encode()], dtype=object),
                          "BYTES"),
              infer_input("exclude_input_in_output", np.array([True]), "BOOL")]
    for r in ("finish_reason", "num_input_tokens", "num_output_tokens"):
        inputs.append(infer_input(f"return_{r}", np.array([True]), "BOOL"))
    got = _grpc_stream(server.url, inputs)
    text = b"".join(bytes(r.as_numpy("text_output")[0]) for r in got).decode()
    assert text == tok.decode(ref, skip_special_tokens=True)
    assert sum(int(r.as_numpy("num_output_tokens")[0]) for r in got) == 6
    assert int(got[-1].as_numpy("num_input_tokens")[0]) == len(ids)
    assert got[-1].as_numpy("finish_reason")[0] == b"length"
    bad = json.dumps({"max_tokens": 2, "colour": "red"})
    inputs[2] = infer_input("sampling_parameters", np.array([bad.encode()], dtype=object),
                            "BYTES")
    with pytest.raises(Exception, match=r"unknown key\(s\) \['colour'\]"):
        _grpc_stream(server.url, inputs)


def test_generate_extension_on_the_giant_model(server, models, tok) -> None:
    ids = tok.encode(PROMPT)
    expected = tok.decode(greedy(models, tok, ids, 6), skip_special_tokens=True)
    body = {"text_input": PROMPT, "exclude_input_in_output": True,
            "parameters": {"max_tokens": 6, "temperature": 0, "ignore_eos": True}}
    url = f"http://localhost:{server.http_port}/v2/models/llm"
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode())
    out = json.loads(urllib.request.urlopen(req, timeout=60).read())
    assert out["text_output"] == expected and out["model_name"] == "llm"

    async def stream() -> list[dict]:
        async with aiohttp.ClientSession() as s, s.post(url + "/generate_stream",
                                                        json=body) as r:
            return [json.loads(x[5:]) async for x in _lines(r) if x.startswith("data:")]

    events = asyncio.run(stream())
    assert len(events) >= 3 and "".join(e["text_output"] for e in events) == expected
    assert events[-1]["finish_reason"] == "length"


async def _lines(r: aiohttp.ClientResponse):
    async for line in r.content:
        yield line.decode()


def test_chat_template_flag_overrides(models, tok, tmp_path) -> None:
    """`--chat-template FILE` gives a model without a template of its own a chat API."""
    add_llm_model(tmp_path / "repo", "plain", models["plain"], dtype="fp32")
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    srv = Server(tmp_path / "repo", tmp_path / "server.log", "--metrics-port", "0",
                 "--chat-template", str(tmp_path / "t.jinja"), module="launcher.cli")
    try:
        c = openai.OpenAI(base_url=f"http://localhost:{srv.http_port}/v1", api_key="none",
                          max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                       chat_template=TEMPLATE)
        ids = tok.encode(text, add_special_tokens=False)
        r = c.chat.completions.create(model="plain", messages=messages, max_tokens=4,
                                      temperature=0, extra_body={"ignore_eos": True})
        ref, _ = reference_generate(models["plain"], [ids], 4)
        assert r.choices[0].message.content == tok.decode(ref[0], skip_special_tokens=True)
        assert r.usage.prompt_tokens == len(ids)
    finally:
        assert srv.stop() == 0
