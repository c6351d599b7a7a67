"""`shardserve bench`: measure a model under every tp x pp layout that fits, with the 1x1 baseline
measured in the same run. Writes results.json/.csv, summary.md and PNG plots to --out and prints
the table; a progress bar goes to stderr when it is a terminal."""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from launcher.bench_run import BenchJob, Workload
from launcher.errors import CommandError
from runtime.types import EngineConfig
from runtime.worker import EngineSpec

DEFAULT_LAYOUTS = "1x1,2x1,1x2,2x2"
DEFAULT_WORKLOADS = "64:32:1,64:32:8"


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark a model over tp x pp layouts and workloads",
                       description=__doc__)
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    p.add_argument("--layouts", default=DEFAULT_LAYOUTS, metavar="TPxPP,...",
                   help=f"layouts to try (default {DEFAULT_LAYOUTS}); 1x1 is always added")
    p.add_argument("--workloads", default=DEFAULT_WORKLOADS, metavar="P:O:B,...",
                   help="prompt tokens:output tokens:concurrent requests "
                   f"(default {DEFAULT_WORKLOADS})")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: the checkpoint's")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    p.add_argument("--kv-cache-mb", type=int, default=256, help="KV cache per rank (MiB)")
    p.add_argument("--max-running", type=int, default=64, help="engine's running batch limit")
    p.add_argument("--threads-per-rank", type=int, default=0,
                   help="torch CPU threads per rank (default: cores / ranks of the layout)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up request")
    p.add_argument("--no-comm-stats", action="store_true", help="do not time communication")
    p.add_argument("--layout-timeout", type=float, default=3600.0, help="seconds per layout")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="rendezvous and collective timeout of the ranks (seconds)")
    p.set_defaults(func=run)


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """'1x1,2x1' -> [(1, 1), (2, 1)], with 1x1 first (the baseline) and no duplicates."""
    out = [(1, 1)]
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        try:
            tp, pp = (int(p) for p in parts)
        except ValueError:
            raise CommandError(f"layout {item!r}: expected TPxPP, e.g. 2x1") from None
        if tp < 1 or pp < 1:
            raise CommandError(f"layout {item!r}: tp and pp must be >= 1")
        if (tp, pp) not in out:
            out.append((tp, pp))
    return out


def parse_workloads(text: str) -> list[Workload]:
    try:
        return [Workload.parse(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise CommandError(str(e)) from None


def fits(spec: EngineSpec) -> str | None:
    """Why `spec`'s layout cannot run here, or None when it can."""
    from runtime.worker import check_layout

    world = spec.tp * spec.pp
    gpus = torch.cuda.device_count() if spec.backend != "gloo" else 0
    if gpus and world > gpus:
        return f"needs {world} GPUs, this node has {gpus}"
    try:
        check_layout(spec)
    except (ValueError, OSError) as e:
        return str(e)
    return None


class ProgressBar:
    """A one-line bar on a terminal stream; silent when the stream is not a TTY."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 30,
                 enabled: bool = True) -> None:
        self.total, self.done, self.stream, self.width = max(1, total), 0, stream, width
        self.enabled = enabled and stream.isatty()

    def update(self, label: str, advance: int = 1) -> None:
        self.done = min(self.total, self.done + advance)
        if not self.enabled:
            return
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} {label[:50]:<50}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def meta(args: argparse.Namespace, workloads: list[Workload]) -> dict[str, Any]:
    cuda = torch.cuda.is_available() and args.backend != "gloo"
    device = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if cuda
              else f"cpu, {os.cpu_count()} cores")
    return {"model": str(args.model), "date": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"), "host": socket.gethostname(), "device": device,
            "torch": torch.__version__, "dtype": args.dtype,
            "mem_kind": "CUDA max allocated" if cuda else "peak RSS of each rank's process",
            "workloads": [w.label for w in workloads], "kv_cache_mb": args.kv_cache_mb,
            "threads_per_rank": args.threads_per_rank or "cores / ranks"}


def make_job(args: argparse.Namespace, workloads: list[Workload], tp: int, pp: int) -> BenchJob:
    engine = EngineConfig(kv_cache_bytes=args.kv_cache_mb * 2**20, max_running=args.max_running)
    spec = EngineSpec(str(args.model), tp, pp, args.dtype, engine, backend=args.backend,
                      timeout_s=args.timeout)
    return BenchJob(spec, workloads, warmup=not args.no_warmup, seed=args.seed,
                    comm_stats=not args.no_comm_stats, threads=args.threads_per_rank)


def measure_local(args: argparse.Namespace, layouts: list[tuple[int, int]],
                  workloads: list[Workload], bar: ProgressBar) -> list[dict[str, Any]]:
    """Run every layout that fits, in turn, each in its own freshly spawned ranks."""
    from launcher.bench_local import LayoutFailed, run_layout_local
    from launcher.bench_report import summarize_layout

    results = []
    for tp, pp in layouts:
        job = make_job(args, workloads, tp, pp)
        reason = fits(job.spec)
        if reason is not None:
            results.append(summarize_layout(tp, pp, None, "skipped", reason))
            bar.update(f"{tp}x{pp} skipped", 1 + 2 * len(workloads))
            continue
        done = bar.done
        bar.update(f"{tp}x{pp} loading", 0)
        try:
            raw = run_layout_local(job, lambda m, t=f"{tp}x{pp}": bar.update(f"{t} {m}"),
                                   timeout_s=args.layout_timeout)
            results.append(summarize_layout(tp, pp, raw))
        except LayoutFailed as e:
            results.append(summarize_layout(tp, pp, None, "failed", str(e)))
        bar.done = done
        bar.update(f"{tp}x{pp} done", 1 + 2 * len(workloads))
    return results


def measure(args: argparse.Namespace, layouts: list[tuple[int, int]],
            workloads: list[Workload]) -> list[dict[str, Any]] | None:
    """Every layout's summary, in `layouts` order; None on the non-zero ranks of a launched
    world (they only help measure the layouts of the world's size)."""
    from launcher.bench_world import run_in_world
    from launcher.discovery import discover_ranks

    info = discover_ranks()
    bar = ProgressBar(len(layouts) * (1 + 2 * len(workloads)),
                      enabled=not info.launched or info.rank == 0)
    results = []
    if info.launched:
        here = [lay for lay in layouts if lay[0] * lay[1] == info.world_size]
        if not here:
            raise CommandError(f"no layout in --layouts has {info.world_size} ranks, the size "
                               f"of the launched world")
        results = run_in_world(info, here, lambda tp, pp: make_job(args, workloads, tp, pp),
                               lambda name, msg: bar.update(f"{name} {msg}"))
        if results is None:
            return None
        layouts = [lay for lay in layouts if lay not in here]
    results += measure_local(args, layouts, workloads, bar)
    bar.close()
    return sorted(results, key=lambda e: (e["ranks"] > 1, e["ranks"], e["pp"]))


def run(args: argparse.Namespace) -> int:
    from launcher.bench_report import add_speedups, format_table, write_all

    if not Path(args.model).is_dir():
        raise CommandError(f"--model {args.model}: not a directory")
    layouts, workloads = parse_layouts(args.layouts), parse_workloads(args.workloads)
    if not workloads:
        raise CommandError("give at least one workload")
    results = measure(args, layouts, workloads)
    if results is None:
        return 0
    add_speedups(results)
    paths = write_all(args.out, meta(args, workloads), results)
    print(format_table(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if any(e["status"] == "ok" for e in results) else 1
