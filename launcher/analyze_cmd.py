"""`shardserve analyze`: search the configurations of a repository's models against a running
server, pick the best point that meets the constraints, and write an output repository with
the winning config.pbtxt files plus a report (report.md, report.json, PNG charts)."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

from launcher.analyze_report import choose, format_table, unmet, write_report
from launcher.analyze_run import Constraints, LoadSettings, PointRunner, link_model
from launcher.analyze_space import (
    Grids,
    Space,
    coordinate_descent,
    full_grid,
    is_ensemble,
    is_llm,
    llm_space,
    ordinary_space,
)
from launcher.errors import CommandError
from serving.types import ServingError


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _layouts(text: str) -> list[tuple[int, int]]:
    try:
        out = [tuple(int(x) for x in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        out = []
    if not out or any(len(lp) != 2 or min(lp) < 1 for lp in out):
        raise argparse.ArgumentTypeError(f"expected layouts like 1x1,2x1 (tp x pp), got {text!r}")
    return [(lp[0], lp[1]) for lp in out]


def _shape(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME:D1,D2, got {text!r}") from None
    return name, _ints(dims)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="search model configurations against a running server "
                       "and write the best ones that meet the constraints")
    p.add_argument("--model-repository", required=True, type=Path, metavar="REPO")
    p.add_argument("--out", required=True, type=Path, metavar="OUTREPO",
                   help="output repository (winning configs, report.md, charts)")
    p.add_argument("--models", type=lambda s: [m for m in s.split(",") if m],
                   help="comma-separated models to analyze (default: all but ensembles)")
    p.add_argument("--latency-p99-ms", type=float, metavar="X")
    p.add_argument("--min-throughput", type=float, metavar="Y",
                   help="infer/s (ordinary models) or output tokens/s (giant models)")
    p.add_argument("--max-memory-per-rank-mb", type=float, metavar="Z")
    p.add_argument("--concurrency", type=int, default=8, metavar="N")
    p.add_argument("--quick", action="store_true",
                   help="coordinate descent: one knob at a time, stop when it stops paying")
    p.add_argument("--duration-s", type=float, default=10.0, metavar="S",
                   help="measuring window per point")
    p.add_argument("--warmup-s", type=float, default=1.0, metavar="S")
    g = p.add_argument_group("search grids")
    g.add_argument("--instance-counts", type=_ints, default=[1, 2])
    g.add_argument("--max-batch-sizes", type=_ints, help="default: 1,8,32 and the original")
    g.add_argument("--queue-delays-us", type=_ints, default=[0, 2000])
    g.add_argument("--preferred-batch-sizes", type=_ints, default=[0], help="0: none")
    g.add_argument("--layouts", type=_layouts, help="tp x pp list (default: all that fit)")
    g.add_argument("--max-ranks", type=int, help="default: GPUs, or 2 x CPU cores")
    g.add_argument("--max-running", type=_ints, help="default: N/4, N/2, N (concurrency N)")
    g.add_argument("--kv-cache-mb", type=_ints, help="per rank; default: original/4, original")
    w = p.add_argument_group("load")
    w.add_argument("--prompt-len", type=int, default=32, help="giant models: prompt tokens")
    w.add_argument("--max-tokens", type=int, default=16, help="giant models: new tokens")
    w.add_argument("--shape", type=_shape, action="append", default=[], metavar="NAME:DIMS",
                   help="dims (without batch) for a variable-shape input; repeatable")
    w.add_argument("--start-timeout", type=float, default=300.0, metavar="S")
    p.set_defaults(func=run_analyze)


def _settings(args: argparse.Namespace) -> tuple[Grids, LoadSettings, Constraints]:
    if args.concurrency < 1 or args.duration_s <= 0 or args.warmup_s < 0:
        raise CommandError("--concurrency must be >= 1, --duration-s > 0, --warmup-s >= 0")
    if 0 in args.instance_counts or (args.max_batch_sizes and 0 in args.max_batch_sizes):
        raise CommandError("--instance-counts and --max-batch-sizes must be >= 1")
    grids = Grids(instances=args.instance_counts, max_batch_sizes=args.max_batch_sizes,
                  queue_delays_us=args.queue_delays_us,
                  preferred_batch_sizes=args.preferred_batch_sizes, layouts=args.layouts,
                  max_running=args.max_running, kv_cache_mb=args.kv_cache_mb,
                  max_ranks=args.max_ranks, concurrency=args.concurrency)
    load = LoadSettings(args.concurrency, args.duration_s, args.warmup_s, args.prompt_len,
                        args.max_tokens, dict(args.shape) or None, args.start_timeout)
    return grids, load, Constraints(args.latency_p99_ms, args.min_throughput,
                                    args.max_memory_per_rank_mb)


def _selected(repo: Any, wanted: list[str] | None) -> list[str]:
    names = repo.names()
    for name in wanted or []:
        if name not in names:
            raise CommandError(f"model {name!r} is not in {repo.root} (have: {names})")
    return list(wanted) if wanted else names


def analyze_model(name: str, repo: Any, grids: Grids, runner: PointRunner, quick: bool
                  ) -> dict[str, Any]:
    """Search one model's space; its entry for the report."""
    config = repo.config(name)
    space: Space = (llm_space(config, repo.model_dir(name), grids) if is_llm(config)
                    else ordinary_space(config, grids))
    for point, reason in space.skipped:
        runner.skipped(point, reason)
    entry: dict[str, Any] = {"kind": "llm" if runner.llm else "ordinary",
                             "mode": "quick" if quick else "full",
                             "knobs": dict(space.knobs), "results": runner.results}
    empty = [k for k, values in space.knobs if not values]
    if empty:
        entry["note"] = f"no candidate value for {', '.join(empty)} fits this machine"
    else:
        (coordinate_descent if quick else full_grid)(space, runner)
    entry["chosen"] = choose(runner.results)
    if entry["chosen"] is None:
        entry["unmet"] = (unmet(runner.results, runner.constraints) if not empty
                          else entry["note"])
    return entry


def write_repository(repo: Any, out: Path, models: dict[str, dict[str, Any]],
                     runners: dict[str, PointRunner]) -> None:
    """Every model of the source repository into `out`: analyzed ones with the chosen config,
    the rest (and those with nothing chosen) with their original config.pbtxt."""
    for name in repo.names():
        chosen = models.get(name, {}).get("chosen")
        config = runners[name].config_for(chosen["point"]) if chosen else None
        dst = out / name
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        elif dst.is_dir():
            shutil.rmtree(dst)
        link_model(repo.model_dir(name), dst, config)


def run_analyze(args: argparse.Namespace) -> int:
    from serving.repository import ModelRepository

    grids, load, constraints = _settings(args)
    try:
        repo = ModelRepository(args.model_repository)
        names = _selected(repo, args.models)
        configs = {n: repo.config(n) for n in names}
    except ServingError as e:
        raise CommandError(e.message) from None
    out = args.out.resolve()
    if out == repo.root:
        raise CommandError("--out must differ from --model-repository")
    work = out / ".analyze"
    work.mkdir(parents=True, exist_ok=True)
    models: dict[str, dict[str, Any]] = {}
    runners: dict[str, PointRunner] = {}
    for name in names:
        if is_ensemble(configs[name]):
            continue  # an ensemble's speed is its steps': they are analyzed on their own
        runners[name] = PointRunner(name, repo.model_dir(name), configs[name], work, load,
                                    constraints)
        models[name] = analyze_model(name, repo, grids, runners[name], args.quick)
    write_repository(repo, out, models, runners)
    meta = _meta(repo.root, args, load)
    paths = write_report(out, meta, models, constraints)
    print(format_table(models, constraints))
    print("wrote " + ", ".join(str(p) for p in [out, *paths]))
    failed = [(n, e) for n, e in models.items() if e["chosen"] is None]
    for name, entry in failed:
        print(f"shardserve analyze: model {name!r}: {entry['unmet']}", file=sys.stderr)
    return 1 if failed or not models else 0


def _meta(root: Path, args: argparse.Namespace, load: LoadSettings) -> dict[str, Any]:
    return {"repository": str(root), "out": str(args.out.resolve()),
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "mode": "quick" if args.quick else "full", "concurrency": load.concurrency,
            "duration_s": load.duration_s, "warmup_s": load.warmup_s,
            "prompt_len": load.prompt_len, "max_tokens": load.max_tokens}
