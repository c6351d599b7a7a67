"""Helpers for launch tests: install/start OpenMPI, Slurm and network namespaces through
.ci/setup-cluster.sh, run commands as launched worlds, and watch ranks die.

Run as a program it is a rank of a test job: ``python -m tests.cluster idle-engine --model M
--tp 2 --pp 2 --seconds 60`` joins the launched world with the real engine and idles (rank 0
steps the engine, which heartbeats the workers) until the time is up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / ".ci" / "setup-cluster.sh"
PY = sys.executable
_installed: dict[str, str | None] = {}


def cli(*args: str) -> list[str]:
    """The shardserve CLI as a command line for this interpreter."""
    return [PY, "-m", "launcher.cli", *args]


def env_for_ranks(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for launched ranks: repo importable, one thread each, no stale launch vars."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def setup(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run .ci/setup-cluster.sh with this interpreter as the one that gets mpi4py."""
    return subprocess.run(["bash", str(SETUP), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHON": PY})


def unavailable(what: str) -> str | None:
    """Why `what` ("mpi", "slurm", "netns") cannot be set up here, or None when it can.

    Installs the packages on first use (root + apt); only a real impossibility is a reason.
    """
    if os.geteuid() != 0:
        return f"{what} tests need root to install and start system services"
    if "install" not in _installed:
        out = setup("install")
        _installed["install"] = None if out.returncode == 0 else (
            f".ci/setup-cluster.sh install failed: {out.stderr.strip()[-500:]}")
    if _installed["install"]:
        return _installed["install"]
    tools = {"mpi": ["mpirun"], "slurm": ["srun", "slurmctld", "munged"],
             "netns": ["ip", "unshare"]}
    missing = [t for t in tools[what] if not shutil.which(t)]
    return f"missing after install: {missing}" if missing else None


@contextlib.contextmanager
def slurm_cluster(nodes: int) -> Iterator[None]:
    """A real local Slurm (munge + slurmctld + `nodes` slurmd) for the duration of the block."""
    out = setup("slurm-up", str(nodes), timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"slurm-up failed: {out.stdout}\n{out.stderr}")
    try:
        yield
    finally:
        setup("slurm-down", timeout=60)


@contextlib.contextmanager
def netns_hosts() -> Iterator[tuple[str, str]]:
    """Two network namespaces ssA/ssB acting as hosts `hosta` (10.201.0.1) and `hostb`."""
    out = setup("netns-up", timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"netns-up failed: {out.stdout}\n{out.stderr}")
    try:
        yield ("ssA", "ssB")
    finally:
        setup("netns-down", timeout=60)


def in_host(ns: str, hostname: str, cmd: Sequence[str]) -> list[str]:
    """`cmd` run inside namespace `ns` with its own UTS namespace named `hostname`."""
    inner = f"hostname {shlex.quote(hostname)} && exec {shlex.join(cmd)}"
    return ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", inner]


def run(cmd: Sequence[str], timeout: float = 120, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run a launcher command from the repo root and return its output."""
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env or env_for_ranks())


def json_line(text: str) -> dict:
    """The one JSON object line in `text` (what `generate --json` prints on rank 0)."""
    objs = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert len(objs) == 1, f"expected one JSON line, got {len(objs)} in:\n{text}"
    return objs[0]


@dataclass
class Rank:
    """One rank process started by `start_ranks`, with its output captured line by line."""

    rank: int
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    exited_at: float | None = None

    def pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
        self.proc.wait()
        self.exited_at = time.monotonic()

    def saw(self, text: str) -> bool:
        return any(text in line for line in self.lines)


def start_ranks(cmd: Sequence[str], world: int, port: int,
                extra_env: dict[str, str] | None = None) -> list[Rank]:
    """Start `world` copies of `cmd` with torchrun-style variables and no agent behind them,
    so that only shardserve's own failure handling can bring survivors down."""
    ranks = []
    for r in range(world):
        env = env_for_ranks({"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                             "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                             "MASTER_PORT": str(port), **(extra_env or {})})
        proc = subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        rank = Rank(r, proc)
        threading.Thread(target=rank.pump, daemon=True).start()
        ranks.append(rank)
    return ranks


def wait_for(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def idle_engine(argv: Sequence[str] | None = None) -> int:
    """A rank of a launched world running the real engine idle for --seconds."""
    from launcher.launch import join_launched_world
    from runtime.worker import EngineSpec

    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--watchdog-timeout", type=float, default=5.0)
    a = p.parse_args(argv)
    # one write per line: under torchrun all ranks share one pipe, and print's separate write
    # of the newline let two ranks' lines run together
    sys.stdout.write(f"rank {os.environ.get('RANK')} pid {os.getpid()} starting\n")
    sys.stdout.flush()
    world = join_launched_world(EngineSpec(a.model, a.tp, a.pp, timeout_s=20),
                                watchdog_timeout_s=a.watchdog_timeout)
    assert world is not None, "not inside a launched world"
    print("rank 0 engine ready", flush=True)
    deadline = time.monotonic() + a.seconds
    while time.monotonic() < deadline:
        world.engine.step()
        time.sleep(0.2)
    world.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "idle-engine":
        sys.exit(idle_engine(sys.argv[2:]))
    sys.exit("usage: python -m tests.cluster idle-engine --model M [--tp T --pp P]")
