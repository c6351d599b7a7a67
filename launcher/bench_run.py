"""What every rank does for one layout of `shardserve bench`: build its part of the model (timed),
then rank 0 drives the workloads step by step while the others follow its plans; at the end every
rank reports its load time, memory and per-step communication time to rank 0."""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from parallel import ParallelContext
from parallel.collectives import CommStats, all_gather_object
from runtime.engine import LLMEngine, worker_loop
from runtime.runner import ModelRunner
from runtime.types import SamplingParams
from runtime.worker import EngineSpec, RankStartupError, build_rank

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Workload:
    """`batch` requests of `prompt_len` random tokens, each generating exactly `output_len`."""

    prompt_len: int
    output_len: int
    batch: int

    @property
    def label(self) -> str:
        return f"{self.prompt_len}:{self.output_len}:{self.batch}"

    @classmethod
    def parse(cls, text: str) -> Workload:
        """'prompt:output:batch', e.g. '32:16:4'."""
        parts = text.strip().split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 3 or min(values) < 1:
            raise ValueError(f"workload {text!r}: expected prompt:output:batch, positive integers")
        return cls(*values)


@dataclass
class BenchJob:
    """One layout to measure: the engine to build and the workloads to drive through it."""

    spec: EngineSpec
    workloads: list[Workload]
    warmup: bool = True
    seed: int = 0
    comm_stats: bool = True
    threads: int = 0  # torch CPU threads per rank; 0: cores / ranks


@dataclass
class WorkloadRun:
    """Raw timings of one workload on rank 0, plus its range of executed steps."""

    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    output_tokens: int = 0
    elapsed_s: float = 0.0
    steps: tuple[int, int] = (0, 0)
    error: str | None = None


def make_prompts(w: Workload, vocab: int, seed: int) -> list[list[int]]:
    """The same random prompts for a workload whatever the layout (seeded by the workload)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + w.prompt_len * 1009 + w.batch)
    low = min(3, vocab - 1)
    return torch.randint(low, vocab, (w.batch, w.prompt_len), generator=g).tolist()


def drive(engine: LLMEngine, w: Workload, prompts: list[list[int]], tag: str) -> WorkloadRun:
    """Submit every request at once and step until all finish, timestamping each token."""
    params = SamplingParams(max_tokens=w.output_len, ignore_eos=True)
    run = WorkloadRun()
    start = time.perf_counter()
    times: dict[str, list[float]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
        times[f"{tag}-{i}"] = []
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.token_id is not None and out.request_id in times:
                times[out.request_id].append(now)
    run.elapsed_s = time.perf_counter() - start
    for stamps in times.values():
        run.output_tokens += len(stamps)
        if stamps:
            run.ttft_ms.append((stamps[0] - start) * 1e3)
            run.itl_ms += [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:], strict=False)]
    return run


def drive_all(engine: LLMEngine, job: BenchJob, comm: CommStats | None,
              progress: Progress | None) -> list[WorkloadRun]:
    """Warm up once, then run each workload in turn; a bad workload is recorded, not fatal."""
    if job.warmup:
        w = Workload(min(8, engine.max_model_len - 3), 2, 1)
        drive(engine, w, make_prompts(w, engine.vocab_size, job.seed + 1), "warmup")
    runs = []
    for i, w in enumerate(job.workloads):
        if progress:
            progress(f"workload {w.label}")
        first = len(comm.steps) if comm else 0
        try:
            run = drive(engine, w, make_prompts(w, engine.vocab_size, job.seed), f"w{i}")
        except ValueError as e:  # e.g. longer than the model's context or the KV cache
            run = WorkloadRun(error=str(e))
        run.steps = (first, len(comm.steps) if comm else 0)
        runs.append(run)
        if progress:
            progress(f"done {w.label}")
    return runs


def tensor_mb(tensors: Any) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (reset by exec, unlike ru_maxrss, which would count the
    spawning parent's pages), falling back to ru_maxrss where /proc is absent."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rank_report(ctx: ParallelContext, runner: ModelRunner | None, load_s: float) -> dict[str, Any]:
    """This rank's figures: load time, memory (CUDA peak or peak RSS), per-step comm time."""
    import psutil

    if ctx.device.type == "cuda":
        mem_kind, mem_mb = "cuda_max_allocated", torch.cuda.max_memory_allocated(ctx.device) / 2**20
    else:
        mem_kind, mem_mb = "peak_rss", peak_rss_mb()
    weights = tensor_mb(runner.model.parameters()) if runner else 0.0
    kv = tensor_mb(t for kv in runner.caches.values() for t in kv) if runner else 0.0
    return {"rank": ctx.rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank,
            "host": socket.gethostname(), "pid": os.getpid(), "device": str(ctx.device),
            "load_s": load_s, "mem_kind": mem_kind, "mem_mb": mem_mb,
            "rss_mb": psutil.Process().memory_info().rss / 2**20,
            "weights_mb": weights, "kv_mb": kv,
            "steps": list(ctx.comm_stats.steps) if ctx.comm_stats else []}


def build_timed(spec: EngineSpec, ctx: ParallelContext) -> tuple[Any, float]:
    """Build this rank (timed); every rank learns whether all built, like `run_rank`."""
    t0 = time.perf_counter()
    built, error = None, None
    try:
        built = build_rank(spec, ctx)
    except Exception as e:  # reported below, on every rank
        error = f"{type(e).__name__}: {e}"
    load_s = time.perf_counter() - t0
    errors = all_gather_object(error, ctx.control_group)
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
    if failed:
        raise RankStartupError("; ".join(failed))
    return built, load_s


def bench_layout_rank(ctx: ParallelContext, job: BenchJob,
                      progress: Progress | None = None) -> dict[str, Any] | None:
    """Run `job` on this rank of an initialised tp x pp world. Rank 0 returns the layout's raw
    results (every rank's report and each workload's timings); other ranks return None."""
    ctx.comm_stats = CommStats() if job.comm_stats else None
    (runner, info, _), load_s = build_timed(job.spec, ctx)
    runs: list[WorkloadRun] = []
    failure: BaseException | None = None
    if ctx.is_driver:
        engine = LLMEngine(ctx, runner, info, job.spec.engine)
        if progress:
            progress("loaded")
        try:
            runs = drive_all(engine, job, ctx.comm_stats, progress)
        except BaseException as e:  # still stop the workers and gather, then raise
            failure = e
        finally:
            engine.shutdown()
    else:
        worker_loop(ctx, runner)
    reports = all_gather_object(rank_report(ctx, runner, load_s), ctx.control_group)
    if failure is not None:
        raise failure
    if not ctx.is_driver:
        return None
    return {"tp": ctx.tp, "pp": ctx.pp, "ranks": reports,
            "workloads": [(w, r) for w, r in zip(job.workloads, runs, strict=True)]}
