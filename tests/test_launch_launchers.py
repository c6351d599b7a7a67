"""The same tp=2, pp=2 job launched by torchrun, mpirun, Slurm (srun and sbatch, on a real local
cluster) and torchrun across two network-namespace "hosts": every rank finds its place, the
fabric works (tp all_reduce, pp send/recv), and generation is token-identical to transformers."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import cluster
from tests.checkpoints import reference_generate

PROMPTS = [[1, 5, 9, 20], [3, 17, 4]]
NEW_TOKENS = 8
LAUNCH = ("launch", "--tp", "2", "--pp", "2", "--timeout", "30")


def generate_args(model: Path) -> list[str]:
    args = ["generate", "--model", str(model), "--tp", "2", "--pp", "2", "--json", "--ignore-eos",
            "--max-tokens", str(NEW_TOKENS)]
    for p in PROMPTS:
        args += ["--token-ids", ",".join(map(str, p))]
    return args


def launched_generate(model: Path) -> list[str]:
    return cluster.cli(*LAUNCH, "--", *cluster.cli(*generate_args(model)))


@pytest.fixture(scope="module")
def model(checkpoint_dir) -> Path:
    return checkpoint_dir("llama")


@pytest.fixture(scope="module")
def reference(model: Path) -> list[list[int]]:
    return reference_generate(model, PROMPTS, NEW_TOKENS)[0]


def assert_layout(out: str, source: str, nodes: dict[int, int] | None = None) -> None:
    """Rank 0's table lists every rank in the grid, and each rank's fabric check passed."""
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3], out
    for r in rows:
        rank, tp_rank, pp_rank, node = map(int, r[:4])
        assert (tp_rank, pp_rank) == (rank % 2, rank // 2), r
        assert r[-1] == source and r[-2] == "gloo", r
        if nodes is not None:
            assert node == nodes[rank], r
    checks = [line for line in out.splitlines() if " check ok " in line]
    assert len(checks) == 4, out
    for line in checks:
        rank = int(line.split("rank ")[1].split()[0])
        assert "tp_sum=3 " in line, line
        want = "nan" if rank < 2 else f"{rank - 2:g}"
        assert line.endswith(f"recv_from_prev={want}"), line
    assert "all 4 ranks ok" in out


def assert_generation(out: str, reference: list[list[int]]) -> None:
    report = cluster.json_line(out)
    assert [r["token_ids"] for r in report["results"]] == reference
    assert (report["tp"], report["pp"]) == (2, 2)


def torchrun(*args: str) -> list[str]:
    return [cluster.PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
            *args]


# --- torchrun ----------------------------------------------------------------------------------
def test_torchrun_layout_and_fabric() -> None:
    out = cluster.run(torchrun("-m", "launcher.cli", *LAUNCH))
    assert out.returncode == 0, out.stdout + out.stderr
    assert_layout(out.stdout, "torchrun")


def test_torchrun_generation_matches_transformers(model: Path, reference: list[list[int]]) -> None:
    out = cluster.run(torchrun("-m", "launcher.cli", *LAUNCH, "--", *cluster.cli(
        *generate_args(model))))
    assert out.returncode == 0, out.stdout + out.stderr
    assert_generation(out.stdout, reference)
    assert out.stderr.count("source=torchrun") == 4


# --- mpirun ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mpirun() -> list[str]:
    reason = cluster.unavailable("mpi")
    if reason:
        pytest.skip(reason)
    return ["mpirun", "-n", "4", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]


def test_mpirun_layout_and_fabric(mpirun: list[str]) -> None:
    out = cluster.run([*mpirun, *cluster.cli(*LAUNCH)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert_layout(out.stdout, "mpi")


def test_mpirun_generation_matches_transformers(mpirun: list[str], model: Path,
                                                reference: list[list[int]]) -> None:
    out = cluster.run([*mpirun, *launched_generate(model)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert_generation(out.stdout, reference)
    assert out.stderr.count("source=mpi") == 4


# --- Slurm -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm() -> Iterator[None]:
    reason = cluster.unavailable("slurm")
    if reason:
        pytest.skip(reason)
    with cluster.slurm_cluster(nodes=2):
        yield


SRUN = ["srun", "--nodes", "2", "--ntasks-per-node", "2", "--kill-on-bad-exit=1"]


def test_srun_two_nodes_layout_and_fabric(slurm: None) -> None:
    out = cluster.run([*SRUN, *cluster.cli(*LAUNCH)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert_layout(out.stdout, "slurm", nodes={0: 0, 1: 0, 2: 1, 3: 1})  # pp across nodes


def test_srun_generation_matches_transformers(slurm: None, model: Path,
                                              reference: list[list[int]]) -> None:
    out = cluster.run([*SRUN, *launched_generate(model)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert_generation(out.stdout, reference)
    assert out.stderr.count("source=slurm") == 4


def test_sbatch_multinode_script(slurm: None, model: Path, reference: list[list[int]],
                                 tmp_path: Path) -> None:
    log = tmp_path / "job.out"
    env = cluster.env_for_ranks({"SHARDSERVE": f"{cluster.PY} -m launcher.cli"})
    sub = subprocess.run(
        ["sbatch", "--parsable", "-N", "2", "--ntasks-per-node", "2", "-o", str(log),
         "--chdir", str(cluster.REPO), str(cluster.REPO / "slurm" / "multinode.sbatch"),
         *generate_args(model)],
        capture_output=True, text=True, env=env, timeout=30)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    cluster.wait_for(lambda: not subprocess.run(["squeue", "-hj", job], capture_output=True,
                                                text=True).stdout.strip(), 90, f"job {job}")
    state = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    text = log.read_text()
    assert "JobState=COMPLETED" in state.stdout, text
    assert "tp=2 pp=2 nodes=n1,n2" in text
    assert_generation(text, reference)


# --- two hosts (network namespaces) ------------------------------------------------------------
@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[str, str]]:
    reason = cluster.unavailable("netns")
    if reason:
        pytest.skip(reason)
    with cluster.netns_hosts() as names:
        yield names


def test_two_hosts_torchrun_c10d(hosts: tuple[str, str], model: Path,
                                 reference: list[list[int]]) -> None:
    """torchrun --nnodes 2 with c10d rendezvous on hosta; tp inside a host, pp across hosts."""
    with socket.socket() as s:  # a port number; it is bound inside the namespace, not here
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = {}
    for ns, host in zip(hosts, ("hosta", "hostb"), strict=True):
        cmd = [cluster.PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
               "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"hosta:{port}",
               "--rdzv-id", f"job{port}", "-m", "launcher.cli", *LAUNCH, "--",
               *cluster.cli(*generate_args(model))]
        procs[host] = subprocess.Popen(cluster.in_host(ns, host, cmd), cwd=cluster.REPO,
                                       env=cluster.env_for_ranks(), text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    outs = {h: p.communicate(timeout=120) for h, p in procs.items()}
    print(f"two-host generation finished in {time.monotonic() - t0:.1f} s")
    for h, p in procs.items():
        assert p.returncode == 0, f"{h}: {outs[h]}"
    stdout = "".join(o[0] for o in outs.values())
    stderr = "".join(o[1] for o in outs.values())
    assert_generation(stdout, reference)
    lines = [line for line in stderr.splitlines() if line.startswith("shardserve launch: rank=")]
    placed = {int(line.split("rank=")[1].split()[0]): line.split("host=")[1].split()[0]
              for line in lines}
    assert sorted(placed) == [0, 1, 2, 3]
    assert placed[0] == placed[1] != placed[2] == placed[3]  # one pp stage per host
