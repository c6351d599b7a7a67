"""Token sampling on the last pipeline stage, with per-request state.

Each seeded request owns a torch.Generator, so its tokens do not depend on what else shares the
batch. The history of tokens seen (for the repetition penalty) is kept per request too, and so
are the tokens this sampler chose (presence/frequency penalties, min_tokens): those are not reset
when a preempted request is recomputed from position 0.
"""

from __future__ import annotations

import torch

from runtime.types import SamplingParams


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._generators: dict[str, torch.Generator] = {}
        self._history: dict[str, list[int]] = {}
        self._outputs: dict[str, list[int]] = {}  # chosen tokens, for requests that need them
        self.eos_token_ids: list[int] = []  # the model's; the engine sets them at start
        self._base = torch.Generator().manual_seed(seed)

    def observe(self, request_id: str, tokens: list[int], start_pos: int) -> None:
        """Record the tokens fed to the model this step (a restart at position 0 resets)."""
        if start_pos == 0:
            self._history[request_id] = list(tokens)
        else:
            self._history.setdefault(request_id, []).extend(tokens)

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self._history.pop(request_id, None)
        self._outputs.pop(request_id, None)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            seed = params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._base))
            gen = torch.Generator().manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    def sample(self, logits: torch.Tensor, request_ids: list[str],
               params: list[SamplingParams]) -> list[int]:
        """logits: (batch, vocab) -> one token id per row."""
        logits = logits.float()
        if all(self._plain_greedy(rid, p) for rid, p in zip(request_ids, params, strict=True)):
            out = logits.argmax(dim=-1).tolist()
        else:
            out = [self._sample_one(row, rid, p)
                   for row, rid, p in zip(logits, request_ids, params, strict=True)]
        for rid, p, token in zip(request_ids, params, out, strict=True):
            if p.presence_penalty or p.frequency_penalty or p.min_tokens:
                self._outputs.setdefault(rid, []).append(token)
        return out

    def _plain_greedy(self, rid: str, p: SamplingParams) -> bool:
        """Argmax of the raw logits is this request's token (the batch's fast path)."""
        return (p.temperature == 0 and p.repetition_penalty == 1.0 and not p.presence_penalty
                and not p.frequency_penalty
                and (not p.min_tokens or len(self._outputs.get(rid, ())) >= p.min_tokens))

    def _sample_one(self, row: torch.Tensor, rid: str, p: SamplingParams) -> int:
        if p.repetition_penalty != 1.0 and self._history.get(rid):
            row = apply_repetition_penalty(row, self._history[rid], p.repetition_penalty)
        done = self._outputs.get(rid, [])
        if (p.presence_penalty or p.frequency_penalty) and done:
            row = apply_output_penalties(row, done, p.presence_penalty, p.frequency_penalty)
        if len(done) < p.min_tokens:
            stops = p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)
            if stops:
                row = row.index_fill(0, torch.tensor(stops, dtype=torch.long), float("-inf"))
        if p.temperature == 0:
            return int(row.argmax())
        probs = filter_logits(row, p).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self._generator(rid, p)))


def apply_repetition_penalty(row: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor on one row (vocab,): the logits of every
    token seen (prompt and output) are divided by `penalty` when positive, else multiplied."""
    idx = torch.tensor(sorted(set(seen)), dtype=torch.long)
    vals = row[idx]
    out = row.clone()
    out[idx] = torch.where(vals < 0, vals * penalty, vals / penalty)
    return out


def apply_output_penalties(row: torch.Tensor, output: list[int], presence: float,
                           frequency: float) -> torch.Tensor:
    """vLLM's/OpenAI's presence and frequency penalties on one row (vocab,): each token's logit
    drops by frequency * (times generated) + presence * (generated at all)."""
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=row.numel())
    counts = counts.to(row.dtype)
    return row - frequency * counts - presence * (counts > 0).to(row.dtype)


def filter_logits(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p on one row (vocab,), with the rules (ties and
    boundaries included) of transformers' Temperature-, TopK- and TopPLogitsWarper; filtered
    tokens get -inf. p.temperature must be > 0."""
    row = row / p.temperature
    if 0 < p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        # drop the least likely tokens while together they hold at most 1 - top_p of the mass;
        # the most likely token always stays
        ascending, order = torch.sort(row, descending=False)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - p.top_p
        drop[-1] = False
        row = row.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return row
