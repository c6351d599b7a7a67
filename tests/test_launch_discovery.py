"""Rank discovery from real launcher environments (as dicts) and device/backend choice."""

from __future__ import annotations

import pytest

from launcher.discovery import (
    DiscoveryError,
    choose_device,
    discover_ranks,
    expand_hostlist,
    from_slurm,
    parse_tasks_per_node,
)
from launcher.launch import LayoutRow, format_layout, validate_world


def test_torchrun_variables_win_over_mpi_and_slurm() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "GROUP_RANK": "1", "MASTER_ADDR": "hosta", "MASTER_PORT": "29511",
           "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "SLURM_PROCID": "2"}
    info = discover_ranks(env)
    assert (info.source, info.rank, info.world_size, info.local_rank) == ("torchrun", 3, 4, 1)
    assert (info.local_world_size, info.node_rank) == (2, 1)
    assert (info.master_addr, info.master_port) == ("hosta", 29511)
    assert info.env()["RANK"] == "3" and info.launched


def test_torchrun_without_master_is_an_error() -> None:
    with pytest.raises(DiscoveryError, match="MASTER_ADDR"):
        discover_ranks({"RANK": "0", "WORLD_SIZE": "2"})


def test_openmpi_with_explicit_rendezvous() -> None:
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
           "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "4000", "SLURM_PROCID": "0"}
    info = discover_ranks(env)
    assert (info.source, info.rank, info.world_size, info.local_rank) == ("mpi", 5, 8, 1)
    assert (info.local_world_size, info.node_rank, info.master_port) == (4, 1, 4000)


def test_pmi_under_slurm_is_left_to_slurm() -> None:
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
           "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1",
           "SLURM_JOB_ID": "7"}
    assert discover_ranks(env).source == "slurm"


@pytest.mark.parametrize("spec,want", [("4", [4]), ("2(x3),1", [2, 2, 2, 1]),
                                       ("3,1", [3, 1]), ("1(x2)", [1, 1])])
def test_parse_tasks_per_node(spec: str, want: list[int]) -> None:
    assert parse_tasks_per_node(spec) == want


def test_parse_tasks_per_node_rejects_garbage() -> None:
    with pytest.raises(DiscoveryError):
        parse_tasks_per_node("two")


def test_expand_hostlist_builtin_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("launcher.discovery.shutil.which", lambda _: None)
    assert expand_hostlist("gpu[08-10,12],cpu1") == ["gpu08", "gpu09", "gpu10", "gpu12", "cpu1"]


def test_slurm_layout_master_and_port() -> None:
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "2(x3)", "SLURM_JOB_NODELIST": "node[3-5]",
           "SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0"}
    resolved: list[str] = []
    info = from_slurm(env, resolve=lambda h: resolved.append(h) or f"addr-of-{h}")
    assert info is not None and resolved == ["node3"]
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 6, 1, 2)
    assert (info.master_addr, info.node_rank) == ("addr-of-node3", 1)
    other_step = from_slurm({**env, "SLURM_STEP_ID": "1"}, resolve=lambda h: h)
    assert other_step is not None and other_step.master_port != info.master_port
    assert 20000 <= info.master_port < 40000
    pinned = from_slurm({**env, "MASTER_ADDR": "m", "MASTER_PORT": "5555"})
    assert pinned is not None and (pinned.master_addr, pinned.master_port) == ("m", 5555)


def test_no_launcher_means_local() -> None:
    info = discover_ranks({})
    assert (info.source, info.rank, info.world_size, info.launched) == ("local", 0, 1, False)


def test_inconsistent_rank_is_reported() -> None:
    with pytest.raises(DiscoveryError, match="outside world"):
        discover_ranks({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "x"})


def test_device_choice() -> None:
    assert choose_device(3, cuda_available=False) == choose_device(0, "gloo", False)
    assert choose_device(3, cuda_available=False).backend == "gloo"
    plan = choose_device(3, cuda_available=True)
    assert (plan.device, plan.backend) == ("cuda:3", "nccl")
    assert choose_device(1, "gloo", cuda_available=True).device == "cpu"
    with pytest.raises(DiscoveryError, match="CUDA"):
        choose_device(0, "nccl", cuda_available=False)


def test_world_must_match_grid_and_layout_table() -> None:
    info = discover_ranks({"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "h"})
    validate_world(info, 2, 2)
    with pytest.raises(ValueError, match="tp\\*pp"):
        validate_world(info, 2, 1)
    rows = [LayoutRow(r, r % 2, r // 2, 0, "h", r, "cpu", "gloo", "torchrun") for r in (2, 0)]
    table = format_layout(rows).splitlines()
    assert table[0].split()[:3] == ["rank", "tp_rank", "pp_rank"]
    assert [line.split()[0] for line in table[1:]] == ["0", "2"]
