"""Start a giant model's ranks on this machine: the calling process is rank 0 and ranks
1..N-1 are spawned processes. A dead rank brings the others down instead of a hang."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel import ParallelContext, init_parallel
from runtime.engine import LLMEngine
from runtime.worker import EngineSpec, RankStartupError, check_layout, run_rank

__all__ = ["EngineSpec", "LocalEngine", "device_for", "start_local_engine", "start_parent_watch"]


PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_for(local_rank: int, backend: str) -> tuple[str, torch.device]:
    """NCCL and cuda:local_rank when CUDA is present (unless gloo is asked for), else gloo/CPU."""
    if backend in ("auto", "nccl") and torch.cuda.is_available():
        return "nccl", torch.device("cuda", local_rank % torch.cuda.device_count())
    if backend == "nccl":
        raise RuntimeError("backend nccl asked for, but CUDA is not available")
    return "gloo", torch.device("cpu")


def _threads_per_rank(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


def watch_parent(parent_pid: int, period_s: float = 0.5) -> None:
    """Exit when the process that spawned this one is gone (its death must not leave ranks
    behind); run it in a daemon thread."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(period_s)


def start_parent_watch(parent_pid: int) -> None:
    threading.Thread(target=watch_parent, args=(parent_pid,), name="parent-watch",
                     daemon=True).start()


@contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Processes started inside inherit SIGINT ignored (a disposition of SIG_IGN survives exec,
    a handler does not), so a Ctrl-C cannot kill a worker while it imports, before its own
    `signal.signal` runs. Only the main thread may change dispositions; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _join(spec: EngineSpec, rank: int, port: int) -> ParallelContext:
    backend, device = device_for(rank, spec.backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return init_parallel(spec.tp, spec.pp, rank, backend=backend,
                         init_method=f"tcp://127.0.0.1:{port}", device=device,
                         timeout_s=spec.timeout_s)


def _worker_main(rank: int, spec: EngineSpec, port: int, parent_pid: int) -> None:
    # Ctrl-C reaches the whole process group; rank 0's owner shuts the workers down
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    start_parent_watch(parent_pid)
    torch.set_num_threads(_threads_per_rank(spec.tp * spec.pp))
    try:
        ctx = _join(spec, rank, port)
        run_rank(spec, ctx)
        dist.destroy_process_group()
    except RankStartupError:
        os._exit(1)  # rank 0 reports every rank's start-up error
    except Exception as e:
        if any(s in str(e) for s in PEER_LOST):  # another rank died: it is reported there
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"shardserve rank {rank}: a peer rank is gone ({first[:160]}); exiting",
                  file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
        os._exit(1)


@dataclass
class LocalEngine:
    """Rank 0's engine plus the worker processes it spawned."""

    engine: LLMEngine
    workers: list[mp.process.BaseProcess]

    def dead_workers(self) -> list[tuple[int, int | None]]:
        """(rank, exit code) of every worker that has exited."""
        return [(i + 1, p.exitcode) for i, p in enumerate(self.workers) if not p.is_alive()]

    def kill(self) -> None:
        """Kill every worker still running (the model is broken; no polite shutdown)."""
        for p in self.workers:
            if p.is_alive():
                p.kill()
        for p in self.workers:
            p.join(5.0)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the workers (politely, then by force) and leave the process group."""
        try:
            if self.dead_workers() or self.engine.has_unfinished():
                # abandoned mid-generation (Ctrl-C, an error): the workers may be inside a
                # step's collectives, where a polite stop plan would wait for them forever
                self.kill()
            else:
                self.engine.shutdown()
        finally:
            deadline = time.monotonic() + timeout_s
            for p in self.workers:
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join()
            if dist.is_initialized():
                dist.destroy_process_group()


def start_local_engine(spec: EngineSpec) -> LocalEngine:
    """Spawn ranks 1..N-1, become rank 0, and return once every rank has loaded."""
    check_layout(spec)  # fail fast, before any process is spawned
    world = spec.tp * spec.pp
    port = free_port()
    mpctx = mp.get_context("spawn")
    workers = [mpctx.Process(target=_worker_main, args=(r, spec, port, os.getpid()),
                             daemon=True, name=f"shardserve-rank{r}")
               for r in range(1, world)]
    with _children_ignore_sigint():
        for p in workers:
            p.start()
    torch.set_num_threads(_threads_per_rank(world))
    try:
        ctx = _join(spec, 0, port)
        engine = run_rank(spec, ctx)
    except BaseException:
        for p in workers:
            p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    assert engine is not None
    return LocalEngine(engine, workers)
