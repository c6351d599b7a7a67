"""Run one benchmark layout on this machine: spawn its tp x pp ranks as processes (rank 0
included, so the calling process keeps no process group or model memory between layouts) and
collect rank 0's results through a queue. A dead rank ends the layout with an error, never a
hang."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from launcher.bench_run import BenchJob, bench_layout_rank
from launcher.local import device_for, free_port
from parallel import init_parallel


class LayoutFailed(RuntimeError):
    """A layout could not be measured (a rank failed to build, died, or timed out)."""


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(0.5)


# What an outer launcher (torchrun, `shardserve launch`) exports; a local rank spawned from one
# of its ranks must not inherit them (torchrun's agent-store flag would redirect our rendezvous).
LAUNCH_VARS = ("TORCHELASTIC_USE_AGENT_STORE", "RANK", "WORLD_SIZE", "LOCAL_RANK",
               "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def _rank_entry(rank: int, job: BenchJob, port: int, out: Any, parent_pid: int) -> None:
    """Body of one spawned rank: join the world, run the layout, rank 0 posts the result."""
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    for name in LAUNCH_VARS:
        os.environ.pop(name, None)
    spec = job.spec
    world = spec.tp * spec.pp
    torch.set_num_threads(job.threads or max(1, (os.cpu_count() or 1) // world))
    try:
        backend, device = device_for(rank, spec.backend)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        ctx = init_parallel(spec.tp, spec.pp, rank, backend=backend,
                            init_method=f"tcp://127.0.0.1:{port}", device=device,
                            timeout_s=spec.timeout_s)
        progress = (lambda msg: out.put(("progress", msg))) if rank == 0 else None
        result = bench_layout_rank(ctx, job, progress)
        if rank == 0:
            result["backend"] = backend
            out.put(("result", result))
    except BaseException as e:
        if rank == 0:
            out.put(("error", f"{type(e).__name__}: {e}"))
        else:
            traceback.print_exc()
        _exit(out, 1)
    _exit(out, 0)


def _exit(out: Any, code: int) -> None:
    """Flush the queue, then leave without interpreter teardown of the process group."""
    out.close()
    out.join_thread()
    os._exit(code)


def _stop(procs: list[mp.process.BaseProcess], grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def run_layout_local(job: BenchJob, on_progress: Callable[[str], None] | None = None,
                     timeout_s: float = 3600.0) -> dict[str, Any]:
    """Spawn the layout's ranks, wait for rank 0's result and return it (with `startup_s`:
    seconds from spawning to every rank loaded). Raises LayoutFailed."""
    world = job.spec.tp * job.spec.pp
    mpctx = mp.get_context("spawn")
    out = mpctx.Queue()
    port = free_port()
    t0 = time.monotonic()
    procs = [mpctx.Process(target=_rank_entry, args=(r, job, port, out, os.getpid()),
                           daemon=True, name=f"shardserve-bench-rank{r}") for r in range(world)]
    for p in procs:
        p.start()
    startup_s = None
    try:
        while True:
            try:
                kind, payload = out.get(timeout=0.5)
            except queue.Empty:
                dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise LayoutFailed(f"rank {dead[0][0]} exited with {dead[0][1]}") from None
                if time.monotonic() - t0 > timeout_s:
                    raise LayoutFailed(f"no result after {timeout_s:g} s") from None
                continue
            if kind == "progress":
                if payload == "loaded":
                    startup_s = time.monotonic() - t0
                if on_progress:
                    on_progress(payload)
            elif kind == "error":
                raise LayoutFailed(payload)
            else:
                payload["startup_s"] = startup_s
                return payload
    finally:
        _stop(procs, grace_s=10.0)
