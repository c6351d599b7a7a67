"""Loading straight from HF checkpoints: multi-file safetensors, .bin, and the load report."""

from __future__ import annotations

import pytest
import torch

from parallel import ParallelContext
from runtime.loader import LoadError, load_stage
from runtime.models.registry import model_class
from sharding.checkpoint import HFCheckpoint
from sharding.rules import rules_for
from tests.checkpoints import hf_config, make_checkpoint, reference_generate


@pytest.mark.parametrize("layout", ["sharded-safetensors", "bin"])
def test_multi_file_and_bin_checkpoints_generate_like_transformers(tmp_path, layout) -> None:
    import transformers as tf

    from launcher.local import start_local_engine
    from runtime.types import SamplingParams
    from runtime.worker import EngineSpec

    torch.manual_seed(1)
    model = tf.AutoModelForCausalLM.from_config(hf_config("llama")).eval()
    kw = {"max_shard_size": "60KB"} if layout == "sharded-safetensors" else {
        "safe_serialization": False}
    model.save_pretrained(tmp_path, **kw)
    assert len(HFCheckpoint(tmp_path).files()) > (1 if layout != "bin" else 0)
    prompts = [[3, 4, 5, 6], [9, 8]]
    ref, _ = reference_generate(tmp_path, prompts, 6)
    local = start_local_engine(EngineSpec(str(tmp_path), 2, 1, "fp32"))
    try:
        got = local.engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    finally:
        local.close()
    assert [r.token_ids for r in got] == ref


def _stage(path, cfg):
    rules = rules_for(cfg, 1, 1)
    cls = model_class(cfg)
    model = cls(cls.config_class.from_hf(cfg), ParallelContext.single(), rules.layers_of_stage(0))
    return model, rules


def test_load_report_lists_missing_and_unexpected(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path / "m", "llama")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2)
    tensors["model.rotary_emb.inv_freq"] = torch.zeros(2)  # known buffer: ignored
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    ckpt = HFCheckpoint(path)
    model, rules = _stage(path, ckpt.config)
    report = load_stage(model, ckpt, rules, 0, 0, strict=False)
    assert report.missing == ["model.layers.1.mlp.up_proj.weight"]
    assert report.unexpected == ["model.layers.0.mlp.extra_proj.weight"]
    with pytest.raises(LoadError, match="missing: .*up_proj.*unexpected: .*extra_proj"):
        load_stage(model, ckpt, rules, 0, 0)
