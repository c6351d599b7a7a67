"""Rank discovery: who am I in the world, and where is the rendezvous, under any launcher.

Order (first match wins), so that a launcher nested in another resolves to the innermost one:

1. torchrun / torch.distributed.elastic: ``RANK`` + ``WORLD_SIZE`` (+ ``LOCAL_RANK``,
   ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``GROUP_RANK``).
2. MPI: Open MPI's ``OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE``, or ``PMI_RANK/PMI_SIZE``
   / ``PMIX_RANK`` outside Slurm (MPICH/hydra, Intel MPI). Rank 0 picks the rendezvous address
   (its host's address + a free port) and broadcasts it with mpi4py when importable;
   ``MASTER_ADDR``/``MASTER_PORT`` override it.
3. Slurm: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, local size from
   ``SLURM_STEP_TASKS_PER_NODE``; master = first host of the step's node list (expanded with
   ``scontrol show hostnames``), port derived from the job and step ids; ``MASTER_ADDR`` /
   ``MASTER_PORT`` override both.
4. Otherwise a single process (source ``"local"``): the caller spawns its local ranks itself.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

DEFAULT_PORT = 29500


class DiscoveryError(RuntimeError):
    """The environment names a launcher but its variables are inconsistent or incomplete."""


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the launched world and the rendezvous point of that world."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "mpi" | "slurm" | "local"
    node_rank: int = 0

    @property
    def launched(self) -> bool:
        """True when an external launcher started the ranks (the caller must not spawn)."""
        return self.source != "local"

    def env(self) -> dict[str, str]:
        """torchrun-style variables describing this rank, so ``init_method="env://"`` works."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "SHARDSERVE_LAUNCH_SOURCE": self.source,
        }


@dataclass(frozen=True)
class DevicePlan:
    """Device and collective backend of one rank."""

    device: str  # "cuda:N" or "cpu"
    backend: str  # "nccl" or "gloo"


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError as e:
                raise DiscoveryError(f"{name}={value!r} is not an integer") from e
    if default is None:
        raise DiscoveryError(f"none of {', '.join(names)} is set")
    return default


def _check(info: RankInfo) -> RankInfo:
    if not 0 <= info.rank < info.world_size:
        raise DiscoveryError(f"{info.source}: rank {info.rank} outside world of {info.world_size}")
    if not 0 <= info.local_rank < max(info.local_world_size, 1):
        raise DiscoveryError(
            f"{info.source}: local rank {info.local_rank} outside {info.local_world_size}"
        )
    if not 0 < info.master_port < 65536:
        raise DiscoveryError(f"{info.source}: bad master port {info.master_port}")
    return info


def free_port(host: str = "") -> int:
    """A TCP port that was free a moment ago on this host (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def host_address() -> str:
    """This host's address as other nodes should reach it (falls back to the hostname)."""
    name = socket.gethostname()
    try:
        addr = socket.gethostbyname(name)
    except OSError:
        return name
    return name if addr.startswith("127.") else addr


def from_torchrun(env: Mapping[str, str]) -> RankInfo | None:
    """torchrun (elastic agent) variables, or None when absent."""
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    world = _int(env, "WORLD_SIZE")
    if "MASTER_ADDR" not in env and world > 1:
        raise DiscoveryError("RANK/WORLD_SIZE are set but MASTER_ADDR is not")
    local_world = _int(env, "LOCAL_WORLD_SIZE", default=world)
    return _check(
        RankInfo(
            rank=_int(env, "RANK"),
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK", default=_int(env, "RANK") % local_world),
            local_world_size=local_world,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", default=DEFAULT_PORT),
            source=env.get("SHARDSERVE_LAUNCH_SOURCE", "torchrun"),
            node_rank=_int(env, "GROUP_RANK", default=0),
        )
    )


def _mpi_rendezvous(env: Mapping[str, str], rank: int) -> tuple[str, int]:
    """Rank 0's address and a free port there, agreed on by all ranks through mpi4py."""
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        return env["MASTER_ADDR"], _int(env, "MASTER_PORT")
    try:
        from mpi4py import MPI
    except ImportError as e:
        if _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", default=0) == _int(
            env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", default=-1
        ):  # every rank on this host: a port derived from the MPI job id is enough
            return "127.0.0.1", _hash_port(env.get("OMPI_MCA_ess_base_jobid", "mpi"))
        raise DiscoveryError(
            "MPI launch across hosts needs mpi4py (pip install mpi4py) or MASTER_ADDR/MASTER_PORT"
        ) from e
    comm = MPI.COMM_WORLD
    choice = (env.get("MASTER_ADDR") or host_address(), free_port()) if rank == 0 else None
    addr, port = comm.bcast(choice, root=0)
    return addr, _int(env, "MASTER_PORT", default=port)


def from_mpi(env: Mapping[str, str]) -> RankInfo | None:
    """Open MPI / PMI variables, or None when absent (PMI under Slurm is left to Slurm)."""
    if "OMPI_COMM_WORLD_RANK" in env:
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0)
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", default=1)
        node = rank // max(local_world, 1)  # OMPI has no node index; assumes by-slot mapping
    elif ("PMI_RANK" in env or "PMIX_RANK" in env) and "SLURM_PROCID" not in env:
        rank = _int(env, "PMI_RANK", "PMIX_RANK")
        world = _int(env, "PMI_SIZE")
        local = _int(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK", default=0)
        local_world = _int(env, "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE", default=1)
        node = rank // max(local_world, 1)
    else:
        return None
    addr, port = _mpi_rendezvous(env, rank) if world > 1 else ("127.0.0.1", free_port())
    return _check(RankInfo(rank, world, local, local_world, addr, port, "mpi", node))


def parse_tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's compressed task counts: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise DiscoveryError(f"cannot parse Slurm tasks-per-node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def expand_hostlist(nodelist: str) -> list[str]:
    """Slurm node list -> host names, with ``scontrol show hostnames`` when available."""
    if shutil.which("scontrol"):
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}")
    return hosts


def _slurm_node_addr(host: str) -> str:
    """The address of a Slurm node: its name when it resolves, else the NodeAddr Slurm uses."""
    try:
        socket.gethostbyname(host)
        return host
    except OSError:
        pass
    if shutil.which("scontrol"):
        out = subprocess.run(
            ["scontrol", "-o", "show", "node", host], capture_output=True, text=True, timeout=30
        )
        m = re.search(r"\bNodeAddr=(\S+)", out.stdout)
        if m:
            return m.group(1)
    raise DiscoveryError(f"Slurm master node {host!r} does not resolve; set MASTER_ADDR")


def _hash_port(key: str) -> int:
    digest = hashlib.sha256(key.encode()).digest()
    return 20000 + int.from_bytes(digest[:4], "big") % 20000


def from_slurm(
    env: Mapping[str, str], resolve: Callable[[str], str] = _slurm_node_addr
) -> RankInfo | None:
    """Slurm task variables (srun), or None when absent."""
    if "SLURM_PROCID" not in env:
        return None
    world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    node = _int(env, "SLURM_NODEID", default=0)
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        counts = parse_tasks_per_node(per_node)
        local_world = counts[node] if node < len(counts) else counts[-1]
    else:
        local_world = _int(env, "SLURM_NTASKS_PER_NODE", default=world)
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
        addr = resolve(expand_hostlist(nodelist)[0])
    job = f"{env.get('SLURM_JOB_ID', '0')}.{env.get('SLURM_STEP_ID', '0')}"
    port = _int(env, "MASTER_PORT", default=_hash_port(job))
    rank = _int(env, "SLURM_PROCID")
    local = _int(env, "SLURM_LOCALID", default=rank % max(local_world, 1))
    return _check(RankInfo(rank, world, local, local_world, addr, port, "slurm", node))


def discover_ranks(environ: Mapping[str, str] | None = None) -> RankInfo:
    """Find this process's rank under torchrun, MPI or Slurm (in that order), else local."""
    env = os.environ if environ is None else environ
    for probe in (from_torchrun, from_mpi, from_slurm):
        info = probe(env)
        if info is not None:
            return info
    return RankInfo(0, 1, 0, 1, "127.0.0.1", free_port(), "local")


def choose_device(
    local_rank: int, backend: str = "auto", cuda_available: bool | None = None
) -> DevicePlan:
    """CUDA device = local rank (modulo the visible count) and NCCL with CUDA, else CPU + gloo."""
    has_cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if backend == "auto":
        backend = "nccl" if has_cuda else "gloo"
    if backend not in ("nccl", "gloo"):
        raise DiscoveryError(f"unknown backend {backend!r} (auto, nccl or gloo)")
    if backend == "nccl" and not has_cuda:
        raise DiscoveryError("backend nccl needs CUDA, which is not available")
    if has_cuda and backend == "nccl":
        count = torch.cuda.device_count() if cuda_available is None else max(local_rank + 1, 1)
        return DevicePlan(f"cuda:{local_rank % max(count, 1)}", backend)
    return DevicePlan("cpu", backend)
