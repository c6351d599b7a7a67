"""Triton's LLM tensor convention for the giant-model backend: the config it declares, request
decoding into a generation job, and stop-word handling on the generated text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from runtime.types import SamplingParams
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
]
OUTPUTS = [("text_output", mc.TYPE_STRING, [-1]), ("output_ids", mc.TYPE_INT32, [-1])]
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


def parse_job(request: InferRequest, tokenizer: Any) -> GenerationJob:
    """Decode a request in the LLM convention (shape/range errors name the input)."""
    x = request.inputs
    ids, text = _prompt(x, tokenizer)
    max_tokens = _scalar(x, "max_tokens", int, DEFAULT_MAX_TOKENS)
    seed = _scalar(x, "random_seed", int, None)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_scalar(x, "temperature", float, 0.0),
        top_k=_scalar(x, "top_k", int, 0), top_p=_scalar(x, "top_p", float, 1.0),
        repetition_penalty=_scalar(x, "repetition_penalty", float, 1.0),
        seed=None if seed is None else seed % 2**63,
        ignore_eos=_scalar(x, "ignore_eos", bool, False),
    )
    try:
        params.validate()
    except ValueError as e:
        raise _bad(str(e)) from None
    stop_words = [_text(w, "stop_words") for w in x["stop_words"].reshape(-1)] if (
        "stop_words" in x) else []
    stream = _scalar(x, "stream", bool, False) and not request.unary
    exclude = _scalar(x, "exclude_input_in_output", bool, False)
    return GenerationJob(ids, params, stream, text, exclude, [w for w in stop_words if w])


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
