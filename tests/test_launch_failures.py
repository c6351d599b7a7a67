"""A SIGKILLed rank takes the whole tp=2, pp=2 world down: every survivor exits with a non-zero
status within 30 s, whether the dead rank is a worker or rank 0. The ranks are plain processes
with torchrun-style variables and no agent (nothing but shardserve's own failure handling can
stop them), plus one run under torchrun itself. Exit times are measured and printed."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from launcher.watchdog import EXIT_PEER_LOST
from tests import cluster

LIMIT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_and_time(ranks: list[cluster.Rank], victim: int,
                  sig: signal.Signals = signal.SIGKILL) -> dict[int, float]:
    """Signal rank `victim`; seconds until each other rank exited (all asserted non-zero)."""
    t0 = time.monotonic()
    ranks[victim].proc.send_signal(sig)
    survivors = [r for r in ranks if r.rank != victim]
    try:
        cluster.wait_for(lambda: all(r.exited_at is not None for r in survivors), LIMIT_S + 5,
                         "survivors to exit")
    finally:
        for r in ranks:
            if r.proc.poll() is None:
                r.proc.kill()
    times = {r.rank: r.exited_at - t0 for r in survivors if r.exited_at is not None}
    print(f"{sig.name} rank {victim}: exit after " +
          ", ".join(f"rank {k} {v:.1f} s (status {ranks[k].proc.returncode})"
                    for k, v in sorted(times.items())))
    for r in survivors:
        assert r.proc.returncode != 0, f"rank {r.rank} exited 0:\n" + "\n".join(r.lines)
        assert times[r.rank] < LIMIT_S, f"rank {r.rank} took {times[r.rank]:.1f} s"
    return times


def start_and_wait(cmd: Sequence[str], ready: str) -> list[cluster.Rank]:
    ranks = cluster.start_ranks(cmd, 4, free_port())
    try:
        cluster.wait_for(lambda: any(r.saw(ready) for r in ranks) or
                         any(r.exited_at is not None for r in ranks), 60, ready)
        assert all(r.exited_at is None for r in ranks), [r.lines for r in ranks]
    except BaseException:
        for r in ranks:
            r.proc.kill()
        raise
    return ranks


@pytest.mark.parametrize("victim", [3, 0])
def test_kill_rank_while_holding(victim: int) -> None:
    """`shardserve launch --hold`: an idle world with rank 0 heartbeating the workers."""
    cmd = cluster.cli("launch", "--tp", "2", "--pp", "2", "--hold", "120",
                      "--watchdog-timeout", "5", "--timeout", "60")
    ranks = start_and_wait(cmd, "check ok")
    cluster.wait_for(lambda: sum(r.saw("check ok") for r in ranks) == 4, 30, "all checks")
    kill_and_time(ranks, victim)


def test_frozen_rank_is_caught_by_the_watchdog() -> None:
    """A SIGSTOPped worker keeps its sockets open, so collectives would wait for their 60 s
    timeout; its heartbeats stop, and the watchdog ends every rank (status 75) in seconds."""
    cmd = cluster.cli("launch", "--tp", "2", "--pp", "2", "--hold", "120",
                      "--watchdog-timeout", "4", "--timeout", "60")
    ranks = start_and_wait(cmd, "check ok")
    cluster.wait_for(lambda: sum(r.saw("check ok") for r in ranks) == 4, 30, "all checks")
    times = kill_and_time(ranks, 1, signal.SIGSTOP)
    assert max(times.values()) < 15
    assert ranks[0].proc.returncode == EXIT_PEER_LOST
    assert any("rank 1 sent no heartbeat" in line for line in ranks[0].lines), ranks[0].lines


@pytest.fixture(scope="module")
def model(checkpoint_dir) -> Path:
    return checkpoint_dir("llama")


@pytest.mark.parametrize("victim", [2, 0])
def test_kill_rank_of_idle_engine(model: Path, victim: int) -> None:
    """The real engine on rank 0 (idle steps send heartbeats), workers in their step loop."""
    cmd = [cluster.PY, "-m", "tests.cluster", "idle-engine", "--model", str(model),
           "--seconds", "120"]
    ranks = start_and_wait(cmd, "engine ready")
    kill_and_time(ranks, victim)


def test_kill_worker_under_torchrun(model: Path) -> None:
    """Under torchrun: a SIGKILLed worker ends torchrun (non-zero) and every other rank."""
    cmd = [cluster.PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "-m", "tests.cluster", "idle-engine", "--model", str(model), "--seconds", "120"]
    proc = subprocess.Popen(cmd, cwd=cluster.REPO, env=cluster.env_for_ranks(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    agent = cluster.Rank(-1, proc)
    threading.Thread(target=agent.pump, daemon=True).start()
    try:
        cluster.wait_for(lambda: agent.saw("engine ready") or agent.exited_at is not None, 60,
                         "engine ready")
        # parsed from the whole output: lines of ranks sharing torchrun's pipe can interleave
        pids = {int(rank): int(pid) for rank, pid in
                re.findall(r"rank (\d+) pid (\d+) starting", "\n".join(agent.lines))}
        assert sorted(pids) == [0, 1, 2, 3], agent.lines
        t0 = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        cluster.wait_for(lambda: agent.exited_at is not None and not any(
            os.path.exists(f"/proc/{p}") for p in pids.values()), LIMIT_S + 5, "torchrun exit")
    finally:
        if proc.poll() is None:
            proc.kill()
    took = agent.exited_at - t0
    print(f"torchrun: killed rank 1, torchrun and all ranks gone after {took:.1f} s "
          f"(status {proc.returncode})")
    assert proc.returncode != 0 and took < LIMIT_S


def test_missing_rank_is_reported_as_rendezvous_timeout() -> None:
    """Only 3 of 4 ranks start: each reports a rendezvous timeout (not a hang) and exits 75."""
    port = free_port()
    t0 = time.monotonic()
    ranks = cluster.start_ranks(cluster.cli("launch", "--tp", "2", "--pp", "2", "--timeout", "3"),
                                4, port)
    ranks[3].proc.kill()  # never joins
    cluster.wait_for(lambda: all(r.exited_at is not None for r in ranks[:3]), 30, "timeouts")
    print(f"rendezvous timeout reported after {time.monotonic() - t0:.1f} s")
    for r in ranks[:3]:
        assert r.proc.returncode == EXIT_PEER_LOST, r.lines
        assert any(f"rank {r.rank}: timeout:" in line and "timed out" in line
                   for line in r.lines), r.lines
