"""Token sampling on the last pipeline stage, with per-request state.

Each seeded request owns a torch.Generator, so its tokens do not depend on what else shares the
batch. The history of tokens seen (for the repetition penalty) is kept per request too.
"""

from __future__ import annotations

import torch

from runtime.types import SamplingParams


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._generators: dict[str, torch.Generator] = {}
        self._history: dict[str, list[int]] = {}
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
        if all(p.temperature == 0 and p.repetition_penalty == 1.0 for p in params):
            return logits.argmax(dim=-1).tolist()
        out = []
        for row, rid, p in zip(logits, request_ids, params, strict=True):
            out.append(self._sample_one(row, rid, p))
        return out

    def _sample_one(self, row: torch.Tensor, rid: str, p: SamplingParams) -> int:
        if p.repetition_penalty != 1.0 and self._history.get(rid):
            seen = torch.tensor(sorted(set(self._history[rid])), dtype=torch.long)
            vals = row[seen]
            row = row.clone()
            # same rule as transformers: divide positive logits, multiply negative ones
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                    vals * p.repetition_penalty)
        if p.temperature == 0:
            return int(row.argmax())
        row = row / p.temperature
        if 0 < p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > p.top_p  # keep the token crossing top_p
            row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = row.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self._generator(rid, p)))
