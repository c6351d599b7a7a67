"""Start-up errors: named clearly, on every rank, never a hang."""

from __future__ import annotations

import pytest

from launcher.local import start_local_engine
from runtime.worker import EngineSpec, RankStartupError
from sharding.rules import UnsupportedArchitecture


def test_unsupported_architecture_names_the_supported_ones(tmp_path) -> None:
    from sharding.rules import architecture_of

    with pytest.raises(UnsupportedArchitecture, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        architecture_of({"architectures": ["BertModel"]})


def test_layout_errors_come_before_spawning(checkpoint_dir) -> None:
    with pytest.raises(ValueError, match="tp=5"):
        start_local_engine(EngineSpec(str(checkpoint_dir("llama")), 5, 1, "fp32"))


def test_startup_error_names_the_rank(checkpoint_dir, tmp_path) -> None:
    """A tensor only the last stage needs is missing: rank 1 fails, rank 0 reports it by number
    and every process ends."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = checkpoint_dir("llama")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RankStartupError, match=r"rank 1: LoadError: .*model\.norm\.weight"):
        start_local_engine(EngineSpec(str(bad), 1, 2, "fp32"))
