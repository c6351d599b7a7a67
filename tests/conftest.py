"""Shared fixtures: tiny random checkpoints (built once per session) and their references."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory):
    """Factory: the path of a tiny random checkpoint of `arch`, built once per session."""
    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_checkpoint(root / arch, arch)
        return made[arch]

    return get


@pytest.fixture
def client(server):
    """A tritonclient gRPC client of the module's `server` fixture."""
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.close()
