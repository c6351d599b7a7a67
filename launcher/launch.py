"""``shardserve launch``: run under torchrun, mpirun or srun, join the tp x pp world, show the
rank layout, check the fabric, or hand a normalized environment to a command.

Inside every rank started by an external launcher::

    srun -n 4 shardserve launch --tp 2 --pp 2              # layout table + fabric check
    torchrun --nproc-per-node 4 -m launcher.cli launch --tp 2 --pp 2 -- shardserve generate ...
    mpirun -n 4 shardserve launch --tp 2 --pp 2 -- python my_program.py

With a command, each rank prints its own layout line, exports torchrun-style variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, ...) plus SHARDSERVE_TP/PP/DEVICE/BACKEND and
execs the command, so the command sees one launcher flavour whatever started it.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from launcher.discovery import DevicePlan, RankInfo, choose_device, discover_ranks
from launcher.watchdog import EXIT_PEER_LOST, Watchdog, connect_store
from parallel.context import ParallelContext, init_parallel

if TYPE_CHECKING:
    from runtime.engine import LLMEngine
    from runtime.worker import EngineSpec

DEFAULT_TIMEOUT_S = 60.0


class LaunchTimeout(RuntimeError):
    """A rendezvous or collective did not complete within the configured timeout."""


@dataclass(frozen=True)
class LayoutRow:
    """Where one rank sits: grid coordinates, host and device."""

    rank: int
    tp_rank: int
    pp_rank: int
    node: int
    host: str
    local_rank: int
    device: str
    backend: str
    source: str

    def line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())


def say(message: str, stream: Any = None) -> None:
    """Print one line in a single write, so lines of ranks sharing a pipe do not interleave."""
    stream = stream or sys.stdout
    stream.write(message + "\n")
    stream.flush()


def layout_row(info: RankInfo, tp: int, plan: DevicePlan) -> LayoutRow:
    return LayoutRow(
        rank=info.rank,
        tp_rank=info.rank % tp,
        pp_rank=info.rank // tp,
        node=info.node_rank,
        host=os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
        local_rank=info.local_rank,
        device=plan.device,
        backend=plan.backend,
        source=info.source,
    )


def format_layout(rows: Sequence[LayoutRow]) -> str:
    """A fixed-width table of every rank, sorted by rank."""
    fields = list(asdict(rows[0]).keys())
    cells = [fields] + [[str(v) for v in asdict(r).values()] for r in sorted(rows, key=_rank)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(fields))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def _rank(row: LayoutRow) -> int:
    return row.rank


def validate_world(info: RankInfo, tp: int, pp: int) -> None:
    """The launched world must be exactly tp * pp ranks, and a tp group should fit in a node."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tp and pp must be >= 1 (got tp={tp}, pp={pp})")
    if info.world_size != tp * pp:
        raise ValueError(
            f"{info.source} started {info.world_size} ranks but tp*pp = {tp}*{pp} = {tp * pp}"
        )
    if info.local_world_size % tp and tp % info.local_world_size:
        print(
            f"shardserve launch: warning: {info.local_world_size} ranks per node do not divide "
            f"into tp groups of {tp}: tp traffic will cross nodes",
            file=sys.stderr,
        )


def is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, dist.DistStoreError) or "timed out" in text or "timeout" in text


def export_env(
    info: RankInfo, tp: int, pp: int, plan: DevicePlan, env: dict[str, str]
) -> dict[str, str]:
    """Write the normalized launch variables into `env` (torchrun's own are kept as they are)."""
    if info.source != "torchrun":
        env.update(info.env())
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    env.setdefault("LOCAL_WORLD_SIZE", str(info.local_world_size))
    env.update(
        SHARDSERVE_TP=str(tp),
        SHARDSERVE_PP=str(pp),
        SHARDSERVE_DEVICE=plan.device,
        SHARDSERVE_BACKEND=plan.backend,
        SHARDSERVE_LAUNCH_SOURCE=info.source,
    )
    return env


def init_world(
    info: RankInfo, tp: int, pp: int, *, backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S
) -> tuple[ParallelContext, DevicePlan]:
    """Join the launched world (env:// rendezvous) and build the tp x pp groups.

    Raises LaunchTimeout naming the rendezvous point when not every rank shows up in time.
    """
    validate_world(info, tp, pp)
    plan = choose_device(info.local_rank, backend)
    if plan.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(plan.device))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(info.local_world_size, 1)))
    export_env(info, tp, pp, plan, os.environ)  # type: ignore[arg-type]
    try:
        ctx = init_parallel(
            tp, pp, info.rank, backend=plan.backend, init_method="env://",
            device=plan.device, timeout_s=timeout_s,
        )
    except Exception as e:
        if is_timeout(e):
            raise LaunchTimeout(
                f"rank {info.rank}: rendezvous at {info.master_addr}:{info.master_port} timed out "
                f"after {timeout_s:g} s waiting for {info.world_size} ranks ({info.source}): {e}"
            ) from e
        raise
    return ctx, plan


def start_watchdog(
    info: RankInfo, *, timeout_s: float = 10.0, on_lost: Any = None
) -> Watchdog:
    """Start the peer-loss watchdog of this rank on its own connection to the rendezvous store."""
    store = connect_store(info.master_addr, info.master_port)
    return Watchdog(store, info.rank, info.world_size, timeout_s=timeout_s, on_lost=on_lost).start()


def gather_layout(ctx: ParallelContext, row: LayoutRow) -> list[LayoutRow]:
    rows: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(rows, row, group=ctx.control_group)
    return rows


def check_fabric(ctx: ParallelContext) -> dict[str, float]:
    """A real all_reduce over the tp group and a send/recv from each stage to the next.

    Returns what this rank observed; raises RuntimeError when a value is wrong.
    """
    dev = ctx.device
    t = torch.tensor([float(ctx.tp_rank + 1)], device=dev)
    if ctx.tp > 1:
        dist.all_reduce(t, group=ctx.tp_group)
    want_sum = ctx.tp * (ctx.tp + 1) / 2
    if t.item() != want_sum:
        raise RuntimeError(f"rank {ctx.rank}: tp all_reduce gave {t.item()}, expected {want_sum}")
    got = float("nan")
    if not ctx.is_first_stage:
        box = torch.empty(1, device=dev)
        dist.recv(box, ctx.prev_stage_rank)
        got = box.item()
        if got != float(ctx.prev_stage_rank):
            raise RuntimeError(f"rank {ctx.rank}: received {got} from stage {ctx.pp_rank - 1}")
    if not ctx.is_last_stage:
        dist.send(torch.tensor([float(ctx.rank)], device=dev), ctx.next_stage_rank)
    return {"tp_sum": t.item(), "recv_from_prev": got}


def hold(ctx: ParallelContext, seconds: float, beat_s: float = 1.0) -> None:
    """Idle like an engine: rank 0 broadcasts a heartbeat plan every `beat_s`, workers wait."""
    deadline = time.monotonic() + seconds
    while True:
        if ctx.is_driver:
            msg = "stop" if time.monotonic() >= deadline else "beat"
            box: list[Any] = [msg]
        else:
            box = [None]
        dist.broadcast_object_list(box, src=0, group=ctx.control_group)
        if box[0] == "stop":
            return
        if ctx.is_driver:
            time.sleep(beat_s)


def _finalize_mpi() -> None:
    """Close MPI (opened by mpi4py during discovery) before exec'ing another program."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():  # type: ignore[attr-defined]
        mpi.Finalize()  # type: ignore[attr-defined]


def exec_command(info: RankInfo, args: argparse.Namespace) -> int:
    """Print this rank's layout line, normalize the environment and exec the command."""
    validate_world(info, args.tp, args.pp)
    plan = choose_device(info.local_rank, args.backend)
    row = layout_row(info, args.tp, plan)
    say(f"shardserve launch: {row.line()} master={info.master_addr}:{info.master_port}",
        sys.stderr)
    env = export_env(info, args.tp, args.pp, plan, dict(os.environ))
    env["SHARDSERVE_TIMEOUT_S"] = str(args.timeout)
    _finalize_mpi()
    sys.stdout.flush()
    os.execvpe(args.command[0], args.command, env)
    return 127  # not reached


def run_check(info: RankInfo, args: argparse.Namespace) -> int:
    """Join the world, print the layout on rank 0, check the fabric, optionally hold."""
    ctx, plan = init_world(info, args.tp, args.pp, backend=args.backend, timeout_s=args.timeout)
    watchdog = start_watchdog(info, timeout_s=args.watchdog_timeout)
    say(f"shardserve launch: rank {info.rank} pid {os.getpid()} joined")
    rows = gather_layout(ctx, layout_row(info, args.tp, plan))
    if ctx.is_driver:
        say(format_layout(rows))
    seen = check_fabric(ctx)
    say(f"shardserve launch: rank {info.rank} check ok tp_sum={seen['tp_sum']:g} "
        f"recv_from_prev={seen['recv_from_prev']:g}")
    if args.hold > 0:
        hold(ctx, args.hold)
    watchdog.stop()
    dist.barrier(group=ctx.control_group)
    if ctx.is_driver:
        say(f"shardserve launch: all {ctx.world_size} ranks ok")
    dist.destroy_process_group()
    return 0


def run_launch(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Entry of the `launch` subcommand; a failure inside a joined world ends the process."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    args.command = command
    info = discover_ranks(environ)
    if command:
        return exec_command(info, args)
    try:
        return run_check(info, args)
    except Exception as e:  # noqa: BLE001 - reported with the rank, then a hard exit
        kind = "timeout" if isinstance(e, LaunchTimeout) or is_timeout(e) else "error"
        say(f"shardserve launch: rank {info.rank}: {kind}: {e}", sys.stderr)
        sys.stdout.flush()
        os._exit(EXIT_PEER_LOST if kind == "timeout" else 1)


@dataclass
class LaunchedWorld:
    """Rank 0's view of a world that torchrun/mpirun/srun started: same shape as LocalEngine."""

    engine: LLMEngine
    ctx: ParallelContext
    watchdog: Watchdog

    def close(self) -> None:
        """Stop the workers, then leave together (so no rank mistakes the exit for a death)."""
        self.watchdog.stop()
        self.engine.shutdown()
        _leave(self.ctx)


def _leave(ctx: ParallelContext) -> None:
    dist.barrier(group=ctx.control_group)
    dist.destroy_process_group()


def join_launched_world(
    spec: EngineSpec,
    environ: Mapping[str, str] | None = None,
    on_peer_lost: Any = None,
    watchdog_timeout_s: float = 10.0,
) -> LaunchedWorld | None:
    """Join the world an external launcher started and build this rank of `spec`'s model.

    Returns None when no launcher is present (the caller spawns local ranks instead). Rank 0
    gets a LaunchedWorld; every other rank follows step plans until shutdown and then exits
    the process with status 0 (SystemExit), so commands need no worker branch. `on_peer_lost`
    (a callable taking the reason) runs on rank 0 before the process exits on a dead peer.
    """
    from runtime.worker import run_rank

    info = discover_ranks(environ)
    if not info.launched:
        return None
    if info.rank != 0:
        # The launcher forwards SIGTERM to every rank; workers keep following rank 0, which
        # drains in-flight requests and then stops them (its death is the watchdog's business).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ctx, _ = init_world(info, spec.tp, spec.pp, backend=spec.backend, timeout_s=spec.timeout_s)
    watchdog = start_watchdog(info, timeout_s=watchdog_timeout_s, on_lost=on_peer_lost)
    try:
        engine = run_rank(spec, ctx)
    except Exception as e:
        if ctx.is_driver:
            watchdog.stop()
            raise
        say(f"shardserve: rank {ctx.rank}: {type(e).__name__}: {e}", sys.stderr)
        os._exit(1)
    if engine is not None:
        return LaunchedWorld(engine, ctx, watchdog)
    watchdog.stop()
    _leave(ctx)
    raise SystemExit(0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (ranks per stage)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (stages)")
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"])
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="rendezvous and collective timeout in seconds")
    p.add_argument("--watchdog-timeout", type=float, default=10.0,
                   help="seconds without a peer's heartbeat before every rank exits")
    p.add_argument("--hold", type=float, default=0.0,
                   help="without a command: stay up this long after the check, idling like "
                   "an engine (heartbeats from rank 0)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- COMMAND...: exec it with a normalized launch environment")
    p.set_defaults(func=run_launch)


def add_commands(subparsers: Any) -> None:
    """Register `launch` on the shardserve CLI."""
    p = subparsers.add_parser(
        "launch",
        help="run under torchrun/mpirun/srun: show the rank layout, check, or exec a command",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardserve launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_launch(args)


if __name__ == "__main__":
    sys.exit(main())


