"""`shardserve bench` inside a world that torchrun / mpirun / srun started: every rank runs the
command; the layouts whose tp x pp equals the world are measured on it, one after the other
(same world, fresh groups). Then the world is left and rank 0 measures the remaining layouts
that fit its node (the 1x1 baseline included) by spawning local ranks."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from launcher.bench_report import summarize_layout
from launcher.bench_run import BenchJob, bench_layout_rank
from runtime.worker import RankStartupError

MakeJob = Callable[[int, int], BenchJob]


def _measure_one(ctx: Any, backend: str, job: BenchJob, t0: float,
                 progress: Callable[[str], None] | None) -> dict[str, Any] | None:
    """One layout on the launched world; rank 0 gets its summary (a failed build included)."""
    spec = job.spec
    loaded: list[float] = []

    def note(msg: str) -> None:
        if msg == "loaded":
            loaded.append(time.monotonic() - t0)
        if progress:
            progress(msg)

    try:
        raw = bench_layout_rank(ctx, job, note if ctx.is_driver else None)
    except RankStartupError as e:  # raised on every rank alike
        return summarize_layout(spec.tp, spec.pp, None, "failed", str(e))
    if raw is None:
        return None
    raw.update(backend=backend, startup_s=loaded[0] if loaded else None)
    return summarize_layout(spec.tp, spec.pp, raw)


def run_in_world(info: Any, layouts: list[tuple[int, int]], make_job: MakeJob,
                 progress: Callable[[str, str], None] | None = None) -> list[dict[str, Any]] | None:
    """Measure every layout of `layouts` with as many ranks as the world. Rank 0 returns the
    summaries; the other ranks return None once the world has been left together."""
    from launcher.launch import init_world, start_watchdog

    watchdog, ctx, results = None, None, []
    try:
        for tp, pp in layouts:
            job = make_job(tp, pp)
            t0 = time.monotonic()
            ctx, plan = init_world(info, tp, pp, backend=job.spec.backend,
                                   timeout_s=job.spec.timeout_s)
            watchdog = watchdog or start_watchdog(info)  # the store exists once joined
            note = (lambda m, n=f"{tp}x{pp}": progress(n, m)) if progress else None
            out = _measure_one(ctx, plan.backend, job, t0, note)
            if out is not None:
                results.append(out)
    finally:
        if watchdog is not None:
            watchdog.stop()
    if ctx is not None:
        dist.barrier(group=ctx.control_group)
        dist.destroy_process_group()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return results if info.rank == 0 else None
