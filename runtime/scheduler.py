"""Continuous batching on rank 0: requests join and leave the running batch every step.

Each step is either a prefill step (waiting requests admitted while KV blocks allow) or a decode
step (one token for every running request). When a decode step runs out of blocks, the newest
running request is preempted: its blocks are freed and it is recomputed later from its tokens.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from runtime.kv_cache import BlockAllocator, blocks_needed
from runtime.plan import SeqWork
from runtime.types import EngineConfig, SamplingParams

_arrival = itertools.count()


@dataclass
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    arrival: int = field(default_factory=lambda: next(_arrival))

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    def pending_tokens(self) -> list[int]:
        """Tokens to feed next: everything not yet in the cache."""
        return (self.prompt + self.output)[self.num_cached:]


class EngineFull(RuntimeError):
    """The waiting queue is full; the caller should retry later (RESOURCE_EXHAUSTED)."""


class Scheduler:
    def __init__(self, cfg: EngineConfig, num_blocks: int) -> None:
        self.cfg = cfg
        self.allocator = BlockAllocator(num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.cfg.max_waiting:
            raise EngineFull(f"{len(self.waiting)} requests already waiting")
        self.waiting.append(seq)

    def remove(self, request_id: str) -> Sequence | None:
        """Take a request out of the queues and free its blocks."""
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                self.allocator.free(seq.blocks)
                seq.blocks = []
                return seq
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[SeqWork]:
        """Pick the next step's work: admit waiting requests if any fit, else decode."""
        admitted = self._admit()
        if admitted:
            return [self._work(s) for s in admitted]
        return [self._work(s) for s in self._reserve_decode()]

    def _admit(self) -> list[Sequence]:
        budget = self.cfg.max_prefill_tokens
        batch: list[Sequence] = []
        while self.waiting and len(self.running) < self.cfg.max_running:
            seq = self.waiting[0]
            n = seq.length
            need = blocks_needed(n, self.cfg.block_size)
            if (batch and n > budget) or need > self.allocator.num_free:
                break
            self.waiting.popleft()
            seq.blocks = self.allocator.allocate(need)
            seq.num_cached = 0
            self.running.append(seq)
            batch.append(seq)
            budget -= n
        return batch

    def _reserve_decode(self) -> list[Sequence]:
        """Make room for one more token in every running sequence, preempting if needed."""
        self.running.sort(key=lambda s: s.arrival)
        ready: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted below while making room
                continue
            while len(seq.blocks) * self.cfg.block_size < seq.length:
                if self.allocator.num_free == 0:
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is seq:
                        break
                    continue
                seq.blocks += self.allocator.allocate(1)
            if seq in self.running:
                ready.append(seq)
        return ready

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks, seq.num_cached = [], 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    @staticmethod
    def _work(seq: Sequence) -> SeqWork:
        return SeqWork(seq.request_id, seq.pending_tokens(), seq.num_cached, list(seq.blocks),
                       seq.params)
