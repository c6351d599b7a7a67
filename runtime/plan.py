"""The step plan rank 0 broadcasts to every rank of the model each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.types import SamplingParams


@dataclass
class SeqWork:
    """One sequence's part of a step: the tokens fed now, starting at cache position start_pos."""

    request_id: str
    tokens: list[int]
    start_pos: int
    block_table: list[int]
    params: SamplingParams


@dataclass
class StepPlan:
    kind: str  # "run" | "idle" (heartbeat) | "stop"
    seqs: list[SeqWork] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # sampler state to drop
    microbatches: int = 1

    def split(self) -> list[list[SeqWork]]:
        """Contiguous micro-batches, sizes as even as possible."""
        n = max(1, min(self.microbatches, len(self.seqs)))
        base, extra = divmod(len(self.seqs), n)
        out, start = [], 0
        for i in range(n):
            size = base + (1 if i < extra else 0)
            out.append(self.seqs[start:start + size])
            start += size
        return out
