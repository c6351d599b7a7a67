"""Triton's LLM tensor conventions for the giant-model backend: the config it declares, request
decoding into a generation job, and stop-word handling on the generated text.

Both conventions of Triton's LLM backends are accepted: TensorRT-LLM's (one input per setting:
`max_tokens`, `temperature`, `stop_words`, ...) and the vLLM backend's (`sampling_parameters`,
a JSON string, or else the request's parameters; `return_*` inputs ask for the optional outputs
`finish_reason`, `num_input_tokens`, `num_output_tokens`, `logprobs`). An input given as a
tensor wins over the same setting in `sampling_parameters`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from runtime.types import SamplingParams
from serving.convert import json_kind_ok
from serving.types import InferRequest, ServingError

BACKEND = "shardserve_llm"
# name, config type, dims, optional
INPUTS = [
    ("text_input", mc.TYPE_STRING, [1], True),
    ("input_ids", mc.TYPE_INT32, [-1], True),
    ("max_tokens", mc.TYPE_INT32, [1], True),
    ("temperature", mc.TYPE_FP32, [1], True),
    ("top_k", mc.TYPE_INT32, [1], True),
    ("top_p", mc.TYPE_FP32, [1], True),
    ("repetition_penalty", mc.TYPE_FP32, [1], True),
    ("random_seed", mc.TYPE_UINT64, [1], True),
    ("stop_words", mc.TYPE_STRING, [-1], True),
    ("stream", mc.TYPE_BOOL, [1], True),
    ("exclude_input_in_output", mc.TYPE_BOOL, [1], True),
    ("ignore_eos", mc.TYPE_BOOL, [1], True),
    ("presence_penalty", mc.TYPE_FP32, [1], True),
    ("frequency_penalty", mc.TYPE_FP32, [1], True),
    ("min_tokens", mc.TYPE_INT32, [1], True),
    ("stop_token_ids", mc.TYPE_INT32, [-1], True),
    ("sampling_parameters", mc.TYPE_STRING, [1], True),
    ("return_finish_reason", mc.TYPE_BOOL, [1], True),
    ("return_num_input_tokens", mc.TYPE_BOOL, [1], True),
    ("return_num_output_tokens", mc.TYPE_BOOL, [1], True),
    ("return_logprobs", mc.TYPE_BOOL, [1], True),
]
OUTPUTS = [("text_output", mc.TYPE_STRING, [-1]), ("output_ids", mc.TYPE_INT32, [-1]),
           ("finish_reason", mc.TYPE_STRING, [-1]), ("num_input_tokens", mc.TYPE_UINT32, [1]),
           ("num_output_tokens", mc.TYPE_UINT32, [1]), ("logprobs", mc.TYPE_STRING, [-1])]
RETURNS = ("finish_reason", "num_input_tokens", "num_output_tokens", "logprobs")
# sampling_parameters keys (the vLLM backend's names) -> (SamplingParams field, type)
SAMPLING_KEYS: dict[str, tuple[str, type]] = {
    "max_tokens": ("max_tokens", int), "temperature": ("temperature", float),
    "top_k": ("top_k", int), "top_p": ("top_p", float), "seed": ("seed", int),
    "repetition_penalty": ("repetition_penalty", float),
    "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float), "min_tokens": ("min_tokens", int),
    "ignore_eos": ("ignore_eos", bool), "logprobs": ("logprobs", int),
}
# the TensorRT-LLM style inputs -> SamplingParams field, type
TENSOR_KEYS: dict[str, tuple[str, type]] = {
    "max_tokens": ("max_tokens", int), "temperature": ("temperature", float),
    "top_k": ("top_k", int), "top_p": ("top_p", float), "random_seed": ("seed", int),
    "repetition_penalty": ("repetition_penalty", float), "ignore_eos": ("ignore_eos", bool),
    "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float), "min_tokens": ("min_tokens", int),
}
DEFAULT_MAX_TOKENS = 16


def llm_model_config(name: str, model_path: str, tp: int = 1, pp: int = 1,
                     dtype: str | None = None, extra: dict[str, Any] | None = None
                     ) -> mc.ModelConfig:
    """A complete config.pbtxt message for a giant model served by this backend."""
    cfg = mc.ModelConfig(name=name, backend=BACKEND, max_batch_size=0)
    cfg.model_transaction_policy.decoupled = True
    for n, t, dims, optional in INPUTS:
        cfg.input.add(name=n, data_type=t, dims=dims, optional=optional)
    for n, t, dims in OUTPUTS:
        cfg.output.add(name=n, data_type=t, dims=dims)
    params = {"model_path": model_path, "tp": tp, "pp": pp, **(extra or {})}
    if dtype:
        params["dtype"] = dtype
    for k, v in params.items():
        cfg.parameters[k].string_value = str(v)
    return cfg


@dataclass
class GenerationJob:
    """One decoded generation request."""

    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    prompt_text: str | None  # None: the request came as token ids
    exclude_input: bool
    stop_words: list[str] = field(default_factory=list)
    returns: frozenset[str] = frozenset()  # optional outputs asked for (RETURNS)


def _bad(message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", message)


def _scalar(inputs: dict[str, np.ndarray], name: str, kind: type, default: Any) -> Any:
    arr = inputs.get(name)
    if arr is None:
        return default
    if arr.size != 1:
        raise _bad(f"input '{name}' must hold exactly one value, got shape {list(arr.shape)}")
    value = arr.reshape(-1)[0]
    if kind is float and not np.isfinite(value):
        raise _bad(f"input '{name}' must be a finite number, got {value}")
    return kind(value)


def _text(raw: Any, name: str) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except (UnicodeDecodeError, TypeError):
        raise _bad(f"input '{name}' is not valid UTF-8") from None


def _prompt(inputs: dict[str, np.ndarray], tokenizer: Any) -> tuple[list[int], str | None]:
    if "input_ids" in inputs:
        ids = inputs["input_ids"].reshape(-1)
        if ids.dtype.kind not in "iu":
            raise _bad("input 'input_ids' must hold integers")
        return [int(t) for t in ids], None
    if "text_input" not in inputs:
        raise _bad("the request needs 'text_input' (or 'input_ids' with token ids)")
    arr = inputs["text_input"]
    if arr.size != 1:
        raise _bad(f"input 'text_input' must hold one prompt, got shape {list(arr.shape)}")
    text = _text(arr.reshape(-1)[0], "text_input")
    if not text:
        raise _bad("input 'text_input' is empty")
    if tokenizer is None:
        raise _bad("this model has no tokenizer: send token ids as 'input_ids'")
    return tokenizer.encode(text), text


def _sampling_json(request: InferRequest) -> dict[str, Any]:
    """Sampling settings from `sampling_parameters` (unknown keys are an error), else from the
    request's parameters (where Triton's own keys may sit too: only known ones are read)."""
    arr = request.inputs.get("sampling_parameters")
    if arr is None:
        known = set(SAMPLING_KEYS) | {"stop", "stop_token_ids", "n", "stream"}
        return {k: v for k, v in request.parameters.items() if k in known}
    if arr.size != 1:
        raise _bad("input 'sampling_parameters' must hold one JSON string")
    try:
        obj = json.loads(_text(arr.reshape(-1)[0], "sampling_parameters"))
    except json.JSONDecodeError as e:
        raise _bad(f"input 'sampling_parameters' is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise _bad("input 'sampling_parameters' must be a JSON object")
    unknown = sorted(set(obj) - set(SAMPLING_KEYS) - {"stop", "stop_token_ids", "n"})
    if unknown:
        raise _bad(f"input 'sampling_parameters': unknown key(s) {unknown}; supported: "
                   f"{sorted(set(SAMPLING_KEYS) | {'stop', 'stop_token_ids', 'n'})}")
    return obj


def _typed(value: Any, kind: type, name: str) -> Any:
    if value is None:
        return None
    if not json_kind_ok(value, kind):
        raise _bad(f"sampling parameter '{name}' must be {kind.__name__}, got "
                   f"{json.dumps(value)}")
    if kind is float and not np.isfinite(value):
        raise _bad(f"sampling parameter '{name}' must be a finite number, got {value}")
    return kind(value)


def _stop_lists(x: dict[str, np.ndarray], sampling: dict[str, Any]) -> tuple[list[str],
                                                                             list[int]]:
    words = sampling.get("stop") or []
    if isinstance(words, str):
        words = [words]
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise _bad("sampling parameter 'stop' must be a string or a list of strings")
    if "stop_words" in x:
        words = [_text(w, "stop_words") for w in x["stop_words"].reshape(-1)]
    ids = sampling.get("stop_token_ids") or []
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in ids):
        raise _bad("sampling parameter 'stop_token_ids' must be a list of integers")
    if "stop_token_ids" in x:
        arr = x["stop_token_ids"].reshape(-1)
        if arr.dtype.kind not in "iu":
            raise _bad("input 'stop_token_ids' must hold integers")
        ids = [int(t) for t in arr]
    return [w for w in words if w], ids


def parse_job(request: InferRequest, tokenizer: Any) -> GenerationJob:
    """Decode a request in either LLM convention (shape/range errors name the input)."""
    x = request.inputs
    ids, text = _prompt(x, tokenizer)
    sampling = _sampling_json(request)
    if sampling.get("n", 1) != 1:
        raise _bad("sampling parameter 'n' must be 1 here (send n requests; the OpenAI "
                   "front does)")
    values: dict[str, Any] = {"max_tokens": DEFAULT_MAX_TOKENS}
    for key, (name, kind) in SAMPLING_KEYS.items():
        if key in sampling and sampling[key] is not None:
            values[name] = _typed(sampling[key], kind, key)
    if values.get("top_k") == -1:  # vLLM's "no top-k"
        values["top_k"] = 0
    for key, (name, kind) in TENSOR_KEYS.items():
        value = _scalar(x, key, kind, None)
        if value is not None:
            values[name] = value
    stop_words, stop_ids = _stop_lists(x, sampling)
    seed = values.pop("seed", None)
    params = SamplingParams(**values, stop_token_ids=stop_ids,
                            seed=None if seed is None else seed % 2**63)
    try:
        params.validate()
    except ValueError as e:
        raise _bad(str(e)) from None
    stream = _scalar(x, "stream", bool, False) and not request.unary
    exclude = _scalar(x, "exclude_input_in_output", bool, False)
    returns = frozenset(r for r in RETURNS if _scalar(x, f"return_{r}", bool, False))
    if "logprobs" in returns and params.logprobs is None:
        params.logprobs = 0
    return GenerationJob(ids, params, stream, text, exclude, stop_words, returns)


class StopText:
    """Generated text with stop words: finds the first stop word and holds back any tail that
    could still become one, so streamed chunks never contain part of a stop word."""

    def __init__(self, stop_words: list[str]) -> None:
        self.stop_words = stop_words
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, chunk: str) -> None:
        """Append decoded text; truncate at the first stop word if one is now complete."""
        if self.stopped or not chunk:
            return
        start = max(0, len(self.text) - max((len(w) for w in self.stop_words), default=0))
        self.text += chunk
        hits = [i for w in self.stop_words if (i := self.text.find(w, start)) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _holdback(self) -> int:
        tail = 0
        for w in self.stop_words:
            for n in range(min(len(w) - 1, len(self.text)), tail, -1):
                if self.text.endswith(w[:n]):
                    tail = n
                    break
        return tail

    def take(self, final: bool) -> str:
        """The text not yet sent that is safe to send now (everything when final)."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._holdback()
        end = max(end, self.sent)
        chunk, self.sent = self.text[self.sent:end], end
        return chunk
