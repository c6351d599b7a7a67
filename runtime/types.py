"""Public engine types: what a caller (CLI, server) gives the engine and gets back."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20  # most alternatives a request may ask for (OpenAI's top_logprobs limit)


@dataclass
class SamplingParams:
    """Per-request generation settings. temperature == 0 means greedy.

    Penalties follow vLLM/OpenAI: repetition_penalty (transformers' rule) counts the prompt and
    the output; presence_penalty and frequency_penalty count only the generated output
    (logit -= presence * (count > 0) + frequency * count); the sampler applies repetition,
    then presence/frequency, then temperature, top-k, top-p. min_tokens: before that many tokens
    were generated, the EOS ids (unless ignore_eos) and stop_token_ids are masked out and cannot
    end the request. logprobs: None for none; k >= 0 for the chosen token's logprob plus the k
    most likely tokens'. Logprobs are the log-softmax in fp32 of the model's raw logits, before
    any penalty, temperature or filter (vLLM's default "raw_logprobs").
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    return_logits: bool = False  # debugging/tests: full-vocabulary logits of every step
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; k: the chosen token's plus the top k (k <= 20)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first out-of-range setting."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(
                f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab_size})")


@dataclass
class EngineConfig:
    """Engine-wide settings, identical on every rank."""

    block_size: int = 16
    num_blocks: int | None = None  # None: derived from kv_cache_bytes
    kv_cache_bytes: int = 256 * 2**20  # per rank
    max_running: int = 64  # sequences in the running batch
    max_prefill_tokens: int = 4096  # tokens per prefill step
    max_model_len: int | None = None  # None: the model's max positions
    microbatches: int = 0  # pipeline micro-batches per step; 0: pp (when the batch allows)
    # Split a step only when each micro-batch keeps at least this many new tokens: small decode
    # steps are bound by reading the weights, which every extra micro-batch repeats.
    min_microbatch_tokens: int = 32
    max_waiting: int = 1024  # queued requests beyond this are refused
    # Pack linear weights for oneDNN after loading (CPU bf16; see parallel/kernels.py).
    prepack_weights: bool = True
    # Fused CPU kernels for norms, RoPE + cache store, decode attention and SwiGLU (CPU bf16 /
    # fp16; compiled on first use, see parallel/native.py). Unavailable: the torch ops.
    native_kernels: bool = True


@dataclass
class TokenOutput:
    """What one engine step produced for one request."""

    request_id: str
    token_id: int | None  # None when the request ended without a new token (abort)
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    logits: torch.Tensor | None = None
    logprob: float | None = None  # the chosen token's (when the request asked for logprobs)
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), best first
