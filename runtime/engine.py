"""The engine on global rank 0: scheduling, step-plan broadcast, token bookkeeping.

Not thread-safe: one thread owns an engine. The CLI and the server drive the same API:
`add_request`, `abort_request`, `step`, `generate`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from parallel import ParallelContext
from parallel.collectives import broadcast_object
from runtime.kv_cache import blocks_needed
from runtime.plan import StepPlan
from runtime.runner import Logprobs, ModelRunner
from runtime.scheduler import EngineFull, Scheduler, Sequence
from runtime.tokenizer import Tokenizer
from runtime.types import EngineConfig, SamplingParams, TokenOutput

__all__ = ["EngineFull", "GenerationResult", "LLMEngine"]

HEARTBEAT_S = 1.0


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logits: list[torch.Tensor] = field(default_factory=list)
    logprobs: list[Logprobs] = field(default_factory=list)  # per token, when asked for


@dataclass
class ModelInfo:
    """What rank 0 knows of the model it drives."""

    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    num_blocks: int
    pp: int
    dtype: str = "float32"
    tokenizer: Tokenizer | None = None


class LLMEngine:
    def __init__(self, ctx: ParallelContext, runner: ModelRunner, info: ModelInfo,
                 cfg: EngineConfig) -> None:
        self.ctx, self.runner, self.cfg = ctx, runner, cfg
        self.vocab_size = info.vocab_size
        self.max_model_len = info.max_model_len
        self.eos_token_ids = info.eos_token_ids
        self.tokenizer = info.tokenizer
        self.dtype = info.dtype
        self.num_blocks = info.num_blocks
        self.microbatches = cfg.microbatches or info.pp
        self.scheduler = Scheduler(cfg, info.num_blocks)
        self._seqs: dict[str, Sequence] = {}
        self._finished: list[str] = []  # sampler state to drop on the last stage
        self._aborted: list[TokenOutput] = []
        self._last_broadcast = time.monotonic()
        self.last_step_kind = "idle"
        self._closed = False
        share_eos_ids(ctx, runner, info.eos_token_ids)

    # --- requests -------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        """Queue a request. ValueError for bad input, EngineFull when the queue is full."""
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, "
                             f"{self.vocab_size})")
        params.validate(self.vocab_size)
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens; the model's context is "
                             f"{self.max_model_len}")
        longest = min(n + params.max_tokens, self.max_model_len)
        if blocks_needed(longest, self.cfg.block_size) > self.num_blocks:
            raise ValueError(f"{longest} tokens need more KV cache than the "
                             f"{self.num_blocks} blocks of {self.cfg.block_size} there are")
        seq = Sequence(request_id, list(prompt_token_ids), params)
        self.scheduler.add(seq)
        self._seqs[request_id] = seq

    def abort_request(self, request_id: str) -> None:
        """Drop a request; its blocks are free for the next step."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return
        self.scheduler.remove(request_id)
        self._finished.append(request_id)
        self._aborted.append(TokenOutput(request_id, None, True, "abort"))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> dict[str, Any]:
        s = self.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting),
                "free_blocks": s.allocator.num_free, "total_blocks": self.num_blocks,
                "preemptions": s.preemptions}

    # --- stepping -------------------------------------------------------------------------
    def step(self) -> list[TokenOutput]:
        """One scheduling step. When idle, only keeps the workers' heartbeat going."""
        outputs, self._aborted = self._aborted, []
        if not self.scheduler.has_work():
            self.last_step_kind = "idle"
            if time.monotonic() - self._last_broadcast >= HEARTBEAT_S:
                self._broadcast(StepPlan("idle", finished=self._take_finished()))
            return outputs
        work = self.scheduler.schedule()
        if not work:  # everything preempted this step; next step re-admits
            return outputs
        self.last_step_kind = "prefill" if work[0].start_pos == 0 else "decode"
        tokens = sum(len(w.tokens) for w in work)
        split = max(1, min(self.microbatches, tokens // max(1, self.cfg.min_microbatch_tokens)))
        plan = StepPlan("run", work, self._take_finished(), split)
        self._broadcast(plan)
        result = self.runner.execute(plan)
        assert result is not None
        for w, token, row, lp in zip(work, *result, strict=True):
            outputs.append(self._advance(self._seqs[w.request_id], len(w.tokens), token, row, lp))
        return outputs

    def _advance(self, seq: Sequence, fed: int, token: int, logits: torch.Tensor | None,
                 logprobs: Logprobs | None) -> TokenOutput:
        seq.num_cached += fed
        seq.output.append(token)
        reason = None
        p = seq.params
        stop = (token in p.stop_token_ids) or (not p.ignore_eos and token in self.eos_token_ids)
        if stop and len(seq.output) > p.min_tokens:  # (the sampler masks them before that)
            reason = "stop"
        elif len(seq.output) >= p.max_tokens or seq.length >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.scheduler.remove(seq.request_id)
            self._seqs.pop(seq.request_id, None)
            self._finished.append(seq.request_id)
        lp, top = logprobs if logprobs is not None else (None, None)
        return TokenOutput(seq.request_id, token, reason is not None, reason, logits, lp, top)

    def _take_finished(self) -> list[str]:
        done, self._finished = self._finished, []
        return done

    def _broadcast(self, plan: StepPlan) -> None:
        broadcast_object(plan, 0, self.ctx.control_group)
        self._last_broadcast = time.monotonic()

    # --- whole generations ----------------------------------------------------------------
    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams]) -> list[GenerationResult]:
        """Generate for every prompt (continuous batching); results in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        results = {f"generate-{i}": GenerationResult(list(p)) for i, p in enumerate(prompts)}
        for rid, prompt, p in zip(results, prompts, plist, strict=True):
            self.add_request(rid, prompt, p)
        self.timings = {"prefill_s": 0.0, "decode_s": 0.0, "decode_tokens": 0}
        while any(r.finish_reason is None for r in results.values()):
            t0 = time.perf_counter()
            outs = self.step()
            kind = self.last_step_kind
            self.timings[f"{kind}_s"] = self.timings.get(f"{kind}_s", 0.0) + (
                time.perf_counter() - t0)
            for out in outs:
                r = results.get(out.request_id)
                if r is None:
                    continue
                if out.token_id is not None:
                    r.token_ids.append(out.token_id)
                    if kind == "decode":
                        self.timings["decode_tokens"] += 1
                if out.logits is not None:
                    r.logits.append(out.logits)
                if out.logprob is not None:
                    r.logprobs.append((out.logprob, out.top_logprobs or []))
                if out.finished:
                    r.finish_reason = out.finish_reason
        return list(results.values())

    def shutdown(self) -> None:
        """Tell every worker rank to stop (idempotent)."""
        if not self._closed:
            self._closed = True
            self._broadcast(StepPlan("stop"))


def share_eos_ids(ctx: ParallelContext, runner: ModelRunner, eos_ids: list[int] | None) -> None:
    """Once at start (rank 0 sends, every other rank receives): the model's EOS ids reach the
    sampler on the last stage, which masks them while a request is short of its min_tokens."""
    got = broadcast_object(eos_ids, 0, ctx.control_group)
    assert isinstance(got, list)
    if runner.sampler is not None:
        runner.sampler.eos_token_ids = list(got)


def worker_loop(ctx: ParallelContext, runner: ModelRunner) -> None:
    """Non-zero ranks: follow rank 0's plans until told to stop."""
    share_eos_ids(ctx, runner, None)
    while True:
        plan = broadcast_object(None, 0, ctx.control_group)
        assert isinstance(plan, StepPlan)
        if plan.kind == "stop":
            return
        if plan.kind == "run":
            runner.execute(plan)
        elif runner.sampler is not None:
            for rid in plan.finished:
                runner.sampler.forget(rid)
