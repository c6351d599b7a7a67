"""`shardserve shard | verify | reshard` subcommands.

`add_commands(subparsers)` registers them; each sets `func` to a `run_*(args) -> int` function
that prints a one-line error and returns a non-zero exit status on bad input.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sharding.checkpoint import CheckpointError
from sharding.manifest import ShardError
from sharding.reshard import reshard
from sharding.sources import HFSource
from sharding.stformat import FormatError
from sharding.verify import verify_shards
from sharding.writer import parse_dtype, write_shards

EXIT_BAD_INPUT = 2
EXIT_VERIFY_FAILED = 1


def _stage_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--stage-layers wants integers like 10,12 ({e})") from e


def _layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel ranks")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    p.add_argument("--stage-layers", type=_stage_layers, default=None,
                   help="layers per stage, e.g. 10,12 (default: balanced by parameter count)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="convert float tensors (default: keep the source's dtype)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: only on a terminal)")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `shard`, `verify` and `reshard` on the `shardserve` CLI."""
    p = subparsers.add_parser("shard", help="split an HF checkpoint into per-rank shard files")
    p.add_argument("source", help="HF checkpoint directory")
    p.add_argument("out", help="output shard folder")
    _layout_args(p)
    p.set_defaults(func=run_shard)

    p = subparsers.add_parser("verify", help="check a shard folder (and against its source)")
    p.add_argument("out", help="shard folder")
    p.add_argument("--source", default=None, help="HF checkpoint to compare with, bit for bit")
    p.set_defaults(func=run_verify)

    p = subparsers.add_parser("reshard", help="re-split a shard folder for another tp x pp")
    p.add_argument("out", help="existing shard folder")
    p.add_argument("new", help="new shard folder")
    _layout_args(p)
    p.set_defaults(func=run_reshard)


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while writing, so the temporary folder is removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _guarded(command: str, body: Callable[[], int]) -> int:
    try:
        with _sigterm_as_exit():
            return body()
    except (ShardError, CheckpointError, FormatError, ValueError, OSError) as e:
        print(f"shardserve {command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def run_shard(args: argparse.Namespace) -> int:
    def body() -> int:
        source = HFSource(args.source)
        try:
            summary = write_shards(source, args.out, args.tp, args.pp, args.stage_layers,
                                   parse_dtype(args.dtype), args.force, args.progress)
        finally:
            source.close()
        print(summary.line())
        return 0

    return _guarded("shard", body)


def run_reshard(args: argparse.Namespace) -> int:
    def body() -> int:
        summary = reshard(args.out, args.new, args.tp, args.pp, args.stage_layers,
                          parse_dtype(args.dtype), args.force, args.progress)
        print(summary.line())
        return 0

    return _guarded("reshard", body)


def run_verify(args: argparse.Namespace) -> int:
    def body() -> int:
        report = verify_shards(args.out, args.source)
        for problem in report.problems:
            print(f"  {problem}", file=sys.stderr)
        print(report.line())
        return 0 if report.ok else EXIT_VERIFY_FAILED

    return _guarded("verify", body)
