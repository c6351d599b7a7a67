"""Executes step plans on one rank: its pipeline stage, its tp shard, its slice of the KV cache."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallel import ParallelContext
from parallel.layers import attach_comm_stats
from parallel.pipeline import recv_hidden, send_hidden
from runtime.models.attention import AttentionBatch, KVCache
from runtime.plan import SeqWork, StepPlan
from runtime.sampler import Sampler

# the chosen token's logprob and the (token id, logprob) of the top k, best first
Logprobs = tuple[float, list[tuple[int, float]]]
# per sequence of a plan: the sampled token, its logits (when asked), its logprobs (when asked)
StepResult = tuple[list[int], list[torch.Tensor | None], list[Logprobs | None]]
# what a micro-batch gives: tokens, logits rows, packed logprobs rows (see pack_logprobs)
_Partial = tuple[list[int], list[torch.Tensor | None], list[torch.Tensor | None]]


def build_batch(seqs: list[SeqWork], block_size: int, device: torch.device
                ) -> tuple[torch.Tensor, AttentionBatch]:
    """Pad a micro-batch to (batch, max new tokens) and lay out its cache slots."""
    width = max(len(s.tokens) for s in seqs)
    max_blocks = max(len(s.block_table) for s in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    positions = torch.zeros(len(seqs), width, dtype=torch.long)
    slots = torch.full((len(seqs), width), -1, dtype=torch.long)
    tables = torch.zeros(len(seqs), max_blocks, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.tokens)
        table = torch.tensor(s.block_table, dtype=torch.long)
        tables[i, : len(s.block_table)] = table
        pos = torch.arange(s.start_pos, s.start_pos + n)
        tokens[i, :n] = torch.tensor(s.tokens)
        positions[i, :n] = pos
        positions[i, n:] = s.start_pos + n - 1  # padding repeats the last position
        slots[i, :n] = table[pos // block_size] * block_size + pos % block_size
    batch = AttentionBatch(
        positions=positions.to(device), slot_mapping=slots.to(device),
        block_tables=tables.to(device),
        last_index=torch.tensor([len(s.tokens) - 1 for s in seqs], device=device),
        kv_len=max(s.start_pos + len(s.tokens) for s in seqs),
        fresh=all(s.start_pos == 0 for s in seqs),
    )
    return tokens.to(device), batch


def pack_logprobs(logits: torch.Tensor, tokens: list[int], wanted: list[int | None]
                  ) -> list[torch.Tensor | None]:
    """Per row asking for k logprobs: a float64 CPU row [chosen, k top ids, k top logprobs] of
    the fp32 log-softmax of the raw logits (batch, vocab); None for the rows that do not ask."""
    rows = [i for i, k in enumerate(wanted) if k is not None]
    out: list[torch.Tensor | None] = [None] * len(wanted)
    if not rows:
        return out
    lp = torch.log_softmax(logits[rows].float(), dim=-1)
    picked = torch.tensor([tokens[i] for i in rows], device=lp.device)
    chosen = lp.gather(1, picked[:, None])
    k_max = min(max(wanted[i] or 0 for i in rows), lp.shape[-1])
    top = lp.topk(k_max, dim=-1)  # sorted, best first
    packed = torch.cat([chosen.double(), top.indices.double(), top.values.double()], 1).cpu()
    for j, i in enumerate(rows):
        k = min(wanted[i] or 0, k_max)
        out[i] = torch.cat([packed[j, :1 + k], packed[j, 1 + k_max:1 + k_max + k]])
    return out


def unpack_logprobs(row: torch.Tensor) -> Logprobs:
    """A packed row (see pack_logprobs) as (chosen logprob, [(token id, logprob), ...])."""
    k = (row.numel() - 1) // 2
    values = row.tolist()
    return values[0], [(int(t), v) for t, v in zip(values[1:1 + k], values[1 + k:], strict=True)]


class ModelRunner:
    """Runs this rank's stage for each micro-batch of a plan; the last stage samples and the
    sampled tokens (and logits and logprobs when asked) come back to rank 0."""

    def __init__(self, ctx: ParallelContext, model: nn.Module, caches: dict[int, KVCache],
                 block_size: int, hidden_size: int, vocab_size: int) -> None:
        self.ctx, self.model, self.caches = ctx, model, caches
        self.block_size, self.hidden_size, self.vocab_size = block_size, hidden_size, vocab_size
        self.sampler = Sampler() if ctx.rank == ctx.last_stage_leader else None
        self.comm = ctx.comm_stats  # None unless a benchmark measures communication
        if self.comm is not None:
            attach_comm_stats(model, self.comm)

    def execute(self, plan: StepPlan) -> StepResult | None:
        """Run one plan. Returns (tokens, logits, logprobs) on rank 0, None elsewhere."""
        if self.comm is None:
            return self._execute(plan)
        self.comm.begin_step()
        try:
            return self._execute(plan)
        finally:
            self.comm.end_step(self.ctx.device)

    @torch.inference_mode()
    def _execute(self, plan: StepPlan) -> StepResult | None:
        if self.sampler is not None:
            for rid in plan.finished:
                self.sampler.forget(rid)
        tokens: list[int] = []
        logits: list[torch.Tensor | None] = []
        packed: list[torch.Tensor | None] = []
        pending: list[dist.Work] = []
        for mb in plan.split():
            out = self._run_microbatch(mb, pending)
            if out is not None:
                tokens += out[0]
                logits += out[1]
                packed += out[2]
        got = (tokens, logits, packed)
        if self.comm is None or not (pending or self.ctx.last_stage_leader != 0):
            return self._finish(plan, got, pending)
        with self.comm.timed(torch.device("cpu")):  # host waits: sends, tokens to rank 0
            return self._finish(plan, got, pending)

    def _finish(self, plan: StepPlan, got: _Partial, pending: list[dist.Work]
                ) -> StepResult | None:
        for work in pending:
            work.wait()
        return self._return_to_driver(plan, got)

    def _run_microbatch(self, mb: list[SeqWork], pending: list[dist.Work]) -> _Partial | None:
        ctx, dtype = self.ctx, self.model.dtype
        ids, batch = build_batch(mb, self.block_size, ctx.device)
        if ctx.is_first_stage:
            x = self.model(ids, None, batch, self.caches)
        else:
            shape = (*ids.shape, self.hidden_size)
            hidden = recv_hidden(shape, dtype, ctx.prev_stage_rank, ctx.device, self.comm)
            x = self.model(None, hidden, batch, self.caches)  # (batch, seq, hidden)
        if not ctx.is_last_stage:
            pending.append(send_hidden(x, ctx.next_stage_rank))
            return None
        last = x[torch.arange(len(mb), device=x.device), batch.last_index]  # (batch, hidden)
        step_logits = self.model.compute_logits(last).float()  # (batch, vocab)
        if self.sampler is None:
            return None
        for s in mb:
            self.sampler.observe(s.request_id, s.tokens, s.start_pos)
        sampled = self.sampler.sample(step_logits, [s.request_id for s in mb],
                                      [s.params for s in mb])
        kept = [row.cpu() if s.params.return_logits else None
                for row, s in zip(step_logits, mb, strict=True)]
        return sampled, kept, pack_logprobs(step_logits, sampled,
                                            [s.params.logprobs for s in mb])

    def _return_to_driver(self, plan: StepPlan, got: _Partial) -> StepResult | None:
        ctx = self.ctx
        leader = ctx.last_stage_leader
        if leader == 0:
            if not ctx.is_driver:
                return None
            tokens, logits, packed = got
            return tokens, logits, [None if r is None else unpack_logprobs(r) for r in packed]
        if ctx.rank == leader:
            self._send_to_driver(plan, got)
            return None
        return self._recv_from_leader(plan) if ctx.is_driver else None

    def _send_to_driver(self, plan: StepPlan, got: _Partial) -> None:
        """Last stage leader: tokens, then the asked-for logits rows, then logprobs rows."""
        tokens, logits, packed = got
        group = self.ctx.control_group
        dist.send(torch.tensor(tokens, dtype=torch.long), 0, group=group)
        want = [i for i, s in enumerate(plan.seqs) if s.params.return_logits]
        if want:
            dist.send(torch.stack([logits[i] for i in want]), 0, group=group)
        rows = [r for r in packed if r is not None]
        if rows:
            dist.send(torch.cat(rows), 0, group=group)

    def _recv_from_leader(self, plan: StepPlan) -> StepResult:
        """Rank 0: what `_send_to_driver` sent; the plan says which rows and sizes come."""
        leader, group, n = self.ctx.last_stage_leader, self.ctx.control_group, len(plan.seqs)
        got = torch.empty(n, dtype=torch.long)
        dist.recv(got, leader, group=group)
        rows: list[torch.Tensor | None] = [None] * n
        want = [i for i, s in enumerate(plan.seqs) if s.params.return_logits]
        if want:
            buf = torch.empty(len(want), self.vocab_size)
            dist.recv(buf, leader, group=group)
            for j, i in enumerate(want):
                rows[i] = buf[j]
        lps: list[Logprobs | None] = [None] * n
        sizes = {i: 1 + 2 * min(s.params.logprobs, self.vocab_size)
                 for i, s in enumerate(plan.seqs) if s.params.logprobs is not None}
        if sizes:
            flat = torch.empty(sum(sizes.values()), dtype=torch.float64)
            dist.recv(flat, leader, group=group)
            for i, part in zip(sizes, flat.split(list(sizes.values())), strict=True):
                lps[i] = unpack_logprobs(part)
        return got.tolist(), rows, lps
