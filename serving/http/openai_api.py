"""The OpenAI-compatible API: `/v1/models`, `/v1/completions`, `/v1/chat/completions` and
`/health`, over the same models, schedulers and engines as the Triton fronts.

A model is listed when it follows the LLM tensor convention (`text_input` in, `text_output`
out): giant models, and python models or ensembles around them. Giant models get the whole
API (token-id prompts, exact usage, logprobs, chat templates from their tokenizer files); the
others take text prompts. Each choice is one request to the model (n choices: n requests), so
cancelling a choice (a client gone) frees its KV blocks at the next engine step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from serving.api import Call, Calls
from serving.http.app import json_body, open_sse
from serving.http.kserve import single_response
from serving.http.openai_schema import ChatRequest, CompletionRequest, Sampling, parse
from serving.manager import LoadedVersion, ModelState
from serving.types import InferRequest, InferResponse, ServingError

GIANT = "shardserve_llm"
RETURNS = ("finish_reason", "num_input_tokens", "num_output_tokens")


def _bad(message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", message)


def is_text_model(config: Any) -> bool:
    inputs = {i.name for i in config.input}
    outputs = {o.name for o in config.output}
    return "text_input" in inputs and "text_output" in outputs


@dataclass
class Target:
    """The model a request goes to, with what the API needs of it."""

    name: str
    config: Any
    lv: LoadedVersion
    tokenizer: Any | None  # runtime.tokenizer.Tokenizer (giant models with tokenizer files)
    max_len: int | None

    @property
    def giant(self) -> bool:
        return self.config.backend == GIANT


@dataclass
class Choice:
    """One generation of a request (prompt x n)."""

    index: int
    prompt_ids: list[int] | None
    prompt_text: str
    call: Call | None = None
    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, resp: InferResponse) -> tuple[str, list[dict[str, Any]]]:
        """Take one response; returns its new text and logprob entries."""
        out = resp.outputs
        text = ""
        if "text_output" in out:
            text = b"".join(bytes(x) for x in np.asarray(out["text_output"]).reshape(-1)
                            ).decode("utf-8", "replace")
        if "output_ids" in out:
            self.ids += [int(t) for t in np.asarray(out["output_ids"]).reshape(-1)]
        lps: list[dict[str, Any]] = []
        if "logprobs" in out:
            lps = json.loads(bytes(np.asarray(out["logprobs"]).reshape(-1)[0]))
        self.logprobs += lps
        reason = resp.parameters.get("finish_reason")
        if "finish_reason" in out:
            reason = bytes(np.asarray(out["finish_reason"]).reshape(-1)[0]).decode() or reason
        if reason:
            self.finish_reason = "length" if reason == "length" else "stop"
        self.text.append(text)
        return text, lps


def _sampling(body: Sampling, max_tokens: int | None, logprobs: int | None,
              seed: int | None) -> dict[str, Any]:
    """The vLLM-convention `sampling_parameters` for one choice."""
    s: dict[str, Any] = {"temperature": body.temperature, "top_p": body.top_p,
                         "top_k": body.top_k, "presence_penalty": body.presence_penalty,
                         "frequency_penalty": body.frequency_penalty,
                         "repetition_penalty": body.repetition_penalty,
                         "min_tokens": body.min_tokens, "ignore_eos": body.ignore_eos}
    if max_tokens is not None:
        s["max_tokens"] = max_tokens
    if body.stop is not None:
        s["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
    if body.stop_token_ids:
        s["stop_token_ids"] = body.stop_token_ids
    if seed is not None:
        s["seed"] = seed
    if logprobs is not None:
        s["logprobs"] = logprobs
    return s


def _one(value: Any, dtype: Any = None) -> np.ndarray:
    if isinstance(value, str):
        return np.array([value.encode()], dtype=object)
    return np.array([value], dtype=dtype)


def build_request(target: Target, choice: Choice, sampling: dict[str, Any], stream: bool,
                  request_id: str) -> InferRequest:
    """The InferRequest of one choice, in the giant backend's convention or, for other text
    models, with the inputs their config declares."""
    declared = {i.name for i in target.config.input}
    inputs: dict[str, np.ndarray] = {}
    if choice.prompt_ids is not None and "input_ids" in declared:
        inputs["input_ids"] = np.array(choice.prompt_ids, dtype=np.int32)
    else:
        inputs["text_input"] = _one(choice.prompt_text)
    decoupled = target.config.model_transaction_policy.decoupled
    if target.giant:
        inputs["sampling_parameters"] = _one(json.dumps(sampling))
        inputs["exclude_input_in_output"] = _one(True, bool)
        for r in RETURNS + (("logprobs",) if "logprobs" in sampling else ()):
            inputs[f"return_{r}"] = _one(True, bool)
    elif "max_tokens" in declared and "max_tokens" in sampling:
        inputs["max_tokens"] = _one(sampling["max_tokens"], np.int32)
    if "stream" in declared:
        inputs["stream"] = _one(stream and decoupled, bool)
    return InferRequest(model_name=target.name, model_version=str(target.lv.version),
                        inputs=inputs, id=request_id, unary=not stream)


async def _pump(choice: Choice, out: asyncio.Queue) -> None:
    assert choice.call is not None
    try:
        async for resp, final in choice.call:
            await out.put((choice, resp, final))
    except Exception as e:  # the consumer sees the failure as an error response
        err = InferResponse(error=ServingError("INTERNAL", f"{type(e).__name__}: {e}"))
        await out.put((choice, err, True))


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, InferResponse | None,
                                                                bool]]:
    """The responses of every choice as they come, until each has its final one."""
    out: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(c, out)) for c in choices]
    try:
        left = len(choices)
        while left:
            choice, resp, final = await out.get()
            left -= final
            yield choice, resp, final
    finally:
        for t in tasks:
            t.cancel()


def _usage(choices: list[Choice], prompts: dict[int, int]) -> dict[str, int]:
    done = sum(len(c.ids) for c in choices)
    prompt = sum(prompts.values())
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


class OpenAIRoutes:
    def __init__(self, calls: Calls, chat_template: Path | None) -> None:
        self.calls, self.api = calls, calls.api
        self.chat_template = chat_template.read_text() if chat_template is not None else None

    # --- models -----------------------------------------------------------------------------
    def _listed(self) -> list[dict[str, Any]]:
        out = []
        for m in self.api.manager.index(ready_only=True):
            try:
                st, _ = self.api.manager.get(m.name, "")
            except ServingError:
                continue
            if st.config is not None and is_text_model(st.config) and not any(
                    x["id"] == m.name for x in out):
                out.append({"id": m.name, "object": "model", "created": 0,
                            "owned_by": "shardserve"})
        return out

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self._listed()})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        found = [m for m in self._listed() if m["id"] == name]
        if not found:
            raise ServingError("NOT_FOUND", f"model '{name}' does not exist or is not a "
                               "ready text-generation model")
        return web.json_response(found[0])

    async def health(self, request: web.Request) -> web.Response:
        if self.api.server_ready():
            return web.Response(status=200)
        raise ServingError("UNAVAILABLE", "the server is not ready")

    def _target(self, name: str) -> Target:
        st: ModelState
        try:
            st, lv = self.api.manager.get(name, "")
        except ServingError as e:
            if e.status == "NOT_FOUND":
                raise ServingError("NOT_FOUND", f"model '{name}' does not exist") from None
            raise
        if st.config is None or not is_text_model(st.config):
            raise _bad(f"model '{name}' is not a text-generation model (it needs a "
                       "'text_input' input and a 'text_output' output)")
        return Target(name, st.config, lv, lv.backend.tokenizer(), lv.backend.max_model_len())

    async def _start(self, target: Target, choices: list[Choice], body: Sampling,
                     max_tokens: int | None, logprobs: int | None) -> None:
        rid = uuid.uuid4().hex
        for c in choices:
            seed = None if body.seed is None else body.seed + c.index
            limit = max_tokens
            if target.max_len is not None and c.prompt_ids is not None:
                room = target.max_len - len(c.prompt_ids)
                if limit is None:
                    limit = max(1, room)
                elif limit > room:  # vLLM's rule: refuse rather than cut silently
                    raise _bad(f"this model's maximum context length is {target.max_len} "
                               f"tokens; the request asks for {len(c.prompt_ids) + limit} "
                               f"({len(c.prompt_ids)} in the prompt, {limit} to generate)")
            req = build_request(target, c, _sampling(body, limit, logprobs, seed), body.stream,
                                f"{rid}-{c.index}")
            c.call = await self.calls.start(target.name, str(target.lv.version),
                                            lambda st, lv, r=req: r)

    @staticmethod
    def _close(choices: list[Choice]) -> None:
        for c in choices:
            if c.call is not None:
                c.call.close()

    async def _run(self, request: web.Request, target: Target, choices: list[Choice],
                   body: Sampling, max_tokens: int | None, logprobs: int | None,
                   render: Any) -> web.StreamResponse:
        """Start every choice, then answer: one JSON object, or SSE chunks and [DONE]."""
        try:
            await self._start(target, choices, body, max_tokens, logprobs)
            if not body.stream:
                for c in choices:
                    assert c.call is not None
                    resp = single_response(await c.call.collect(), target.name,
                                           "stream: true")
                    c.add(resp)
                return web.json_response(render.whole(choices))
            return await self._stream(request, choices, body, render)
        finally:
            self._close(choices)

    async def _stream(self, request: web.Request, choices: list[Choice], body: Sampling,
                      render: Any) -> web.StreamResponse:
        async with open_sse(request) as sse:
            for chunk in render.start(choices):
                await sse.send(json.dumps(chunk))
            async for choice, resp, final in merged(choices):
                if resp is not None and resp.error is not None:
                    await sse.send(json.dumps({"error": {
                        "message": resp.error.message, "type": "server_error",
                        "param": None, "code": resp.error.status}}))
                    break
                if resp is not None:
                    text, lps = choice.add(resp)
                    if text or lps:
                        await sse.send(json.dumps(render.delta(choice, text, lps)))
                if final:
                    await sse.send(json.dumps(render.finish(choice)))
            else:
                if body.stream_options is not None and body.stream_options.include_usage:
                    await sse.send(json.dumps(render.usage_chunk(choices)))
            await sse.send("[DONE]")
        return sse

    # --- completions ------------------------------------------------------------------------
    def _prompts(self, body: CompletionRequest, target: Target) -> list[tuple[list[int] | None,
                                                                            str]]:
        p = body.prompt
        items: list[Any] = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else p
        tok = target.tokenizer
        out: list[tuple[list[int] | None, str]] = []
        for item in items:
            if isinstance(item, str):
                out.append((tok.encode(item) if tok is not None and target.giant else None,
                            item))
            elif tok is None and not target.giant:
                raise _bad(f"model '{target.name}' takes text prompts, not token ids")
            else:
                out.append((list(item), tok.decode(list(item)) if tok is not None else ""))
        return out

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body: CompletionRequest = parse(CompletionRequest, json_body(await request.read()))
        target = await self.calls.run(self._target, body.model)
        if body.echo and body.logprobs is not None:
            raise _bad("echo with logprobs (prompt logprobs) is not supported")
        if body.logprobs is not None and not target.giant:
            raise _bad(f"model '{target.name}' cannot return logprobs")
        prompts = await self.calls.run(self._prompts, body, target)
        choices = [Choice(i * body.n + k, ids, text) for i, (ids, text) in enumerate(prompts)
                   for k in range(body.n)]
        render = CompletionRender(body, target.name, {
            i: len(ids or []) for i, (ids, _) in enumerate(prompts)})
        return await self._run(request, target, choices, body, body.max_tokens, body.logprobs,
                               render)

    # --- chat -------------------------------------------------------------------------------
    def _render_chat(self, body: ChatRequest, target: Target) -> tuple[list[int] | None, str]:
        tok = target.tokenizer
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        hf = tok.hf if tok is not None else None
        template = self.chat_template or (getattr(hf, "chat_template", None) if hf else None)
        if hf is None or not template:
            raise _bad(f"model '{target.name}' has no chat template in its tokenizer files; "
                       "start the server with --chat-template FILE or use /v1/completions")
        try:
            text = hf.apply_chat_template(messages, tokenize=False, chat_template=template,
                                          add_generation_prompt=body.add_generation_prompt)
        except Exception as e:  # a template error is the request's or the template's
            raise _bad(f"rendering the chat template failed: {type(e).__name__}: {e}") from e
        ids = list(hf.encode(text, add_special_tokens=False)) if target.giant else None
        return ids, text

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body: ChatRequest = parse(ChatRequest, json_body(await request.read()))
        target = await self.calls.run(self._target, body.model)
        ids, text = await self.calls.run(self._render_chat, body, target)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if logprobs is not None and not target.giant:
            raise _bad(f"model '{target.name}' cannot return logprobs")
        choices = [Choice(k, ids, text) for k in range(body.n)]
        render = ChatRender(body, target.name, len(ids or []))
        return await self._run(request, target, choices, body,
                               body.max_completion_tokens or body.max_tokens, logprobs, render)


class CompletionRender:
    """The JSON shapes of /v1/completions."""

    def __init__(self, body: CompletionRequest, model: str, prompt_tokens: dict[int, int]):
        self.body, self.model, self.prompt_tokens = body, model, prompt_tokens
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model}

    def _logprobs(self, c: Choice, lps: list[dict[str, Any]], offset: int) -> dict | None:
        if self.body.logprobs is None:
            return None
        tokens = [e.get("decoded_token", "") for e in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in lps],
                "top_logprobs": [{a.get("decoded_token", str(a["token_id"])): a["logprob"]
                                  for a in e["top"]} for e in lps], "text_offset": offsets}

    def whole(self, choices: list[Choice]) -> dict[str, Any]:
        out = []
        for c in choices:
            head = c.prompt_text if self.body.echo else ""
            out.append({"index": c.index, "text": head + "".join(c.text),
                        "logprobs": self._logprobs(c, c.logprobs, len(head)),
                        "finish_reason": c.finish_reason})
        return {**self._head(), "choices": out,
                "usage": _usage(choices, self.prompt_tokens)}

    def start(self, choices: list[Choice]) -> list[dict[str, Any]]:
        if not self.body.echo:
            return []
        return [{**self._head(), "choices": [{"index": c.index, "text": c.prompt_text,
                                              "logprobs": None, "finish_reason": None}]}
                for c in choices]

    def delta(self, c: Choice, text: str, lps: list[dict[str, Any]]) -> dict[str, Any]:
        offset = len("".join(c.text)) - len(text)
        return {**self._head(), "choices": [{"index": c.index, "text": text,
                                             "logprobs": self._logprobs(c, lps, offset),
                                             "finish_reason": None}]}

    def finish(self, c: Choice) -> dict[str, Any]:
        return {**self._head(), "choices": [{"index": c.index, "text": "", "logprobs": None,
                                             "finish_reason": c.finish_reason}]}

    def usage_chunk(self, choices: list[Choice]) -> dict[str, Any]:
        return {**self._head(), "choices": [], "usage": _usage(choices, self.prompt_tokens)}


class ChatRender:
    """The JSON shapes of /v1/chat/completions."""

    def __init__(self, body: ChatRequest, model: str, prompt_tokens: int) -> None:
        self.body, self.model, self.prompt_tokens = body, model, {0: prompt_tokens}
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def _head(self, chunk: bool) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk" if chunk else
                "chat.completion", "created": self.created, "model": self.model}

    def _logprobs(self, lps: list[dict[str, Any]]) -> dict[str, Any] | None:
        if not self.body.logprobs:
            return None

        def one(e: dict[str, Any]) -> dict[str, Any]:
            t = e.get("decoded_token", "")
            return {"token": t, "logprob": e["logprob"], "bytes": list(t.encode())}

        return {"content": [{**one(e), "top_logprobs": [one(a) for a in e["top"]]}
                            for e in lps]}

    def whole(self, choices: list[Choice]) -> dict[str, Any]:
        out = [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": self._logprobs(c.logprobs), "finish_reason": c.finish_reason}
               for c in choices]
        return {**self._head(False), "choices": out,
                "usage": _usage(choices, self.prompt_tokens)}

    def start(self, choices: list[Choice]) -> list[dict[str, Any]]:
        return [{**self._head(True), "choices": [{
            "index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
            "finish_reason": None}]} for c in choices]

    def delta(self, c: Choice, text: str, lps: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self._head(True), "choices": [{
            "index": c.index, "delta": {"content": text}, "logprobs": self._logprobs(lps),
            "finish_reason": None}]}

    def finish(self, c: Choice) -> dict[str, Any]:
        return {**self._head(True), "choices": [{"index": c.index, "delta": {},
                                                 "logprobs": None,
                                                 "finish_reason": c.finish_reason}]}

    def usage_chunk(self, choices: list[Choice]) -> dict[str, Any]:
        return {**self._head(True), "choices": [],
                "usage": _usage(choices, self.prompt_tokens)}


def add_routes(app: web.Application, calls: Calls, chat_template: Path | None) -> None:
    r = OpenAIRoutes(calls, chat_template)
    app.router.add_get("/v1/models", r.models)
    app.router.add_get("/v1/models/{model}", r.model)
    app.router.add_post("/v1/completions", r.completions)
    app.router.add_post("/v1/chat/completions", r.chat)
    app.router.add_get("/health", r.health)
