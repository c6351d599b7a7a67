"""Shard -> verify (bit-exact against the source) -> reshard, on real tiny HF checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sharding.checkpoint import HFCheckpoint, cut_tensor
from sharding.manifest import FORMAT, is_shard_folder, rank_file_name
from sharding.reshard import reshard
from sharding.rules import rules_for
from sharding.shards import ShardError, ShardFolder
from sharding.sources import HFSource
from sharding.verify import verify_shards
from sharding.writer import write_shards
from tests.checkpoints import hf_config

# tp=3 splits 4 heads / 96 intermediate / 128 vocab unevenly; tp=4 on mistral (2 kv heads) and
# qwen2 (1 kv head) replicates kv heads; pp=4 puts one layer per stage.
LAYOUTS = {
    "llama": [(1, 1), (2, 2), (3, 1), (1, 4)],
    "mistral": [(4, 1), (2, 2), (3, 2)],
    "qwen2": [(4, 2), (3, 1), (1, 2)],
    "gpt2": [(2, 2), (3, 1), (1, 3)],
}
CASES = [(a, tp, pp) for a, layouts in LAYOUTS.items() for tp, pp in layouts]


def shard(src: Path, out: Path, tp: int, pp: int, **kw) -> Path:
    source = HFSource(src)
    try:
        write_shards(source, out, tp, pp, **kw)
    finally:
        source.close()
    return out


@pytest.mark.parametrize(("arch", "tp", "pp"), CASES, ids=[f"{a}-tp{t}-pp{p}" for a, t, p in CASES])
def test_shard_verifies_bit_exact(checkpoint_dir, tmp_path: Path, arch: str, tp: int,
                                  pp: int) -> None:
    src = checkpoint_dir(arch)
    out = shard(src, tmp_path / "out", tp, pp)
    report = verify_shards(out, src)
    assert report.ok, report.problems
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == FORMAT and (manifest["tp"], manifest["pp"]) == (tp, pp)
    assert len(manifest["files"]) == tp * pp
    # every stored slice of every rank was compared with the source
    assert report.compared == sum(f["num_tensors"] for f in manifest["files"])
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert not list(tmp_path.glob("out.tmp-*"))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_rank_files_load_with_safetensors(checkpoint_dir, tmp_path: Path, arch: str) -> None:
    """Each rank file is plain safetensors: HF names and layout, cut per the rules, metadata
    recording split dim, pieces and full shape; tied embeddings sit on the first and last stage."""
    src = checkpoint_dir(arch)
    tp, pp = 2, 2
    out = shard(src, tmp_path / "out", tp, pp)
    ckpt = HFCheckpoint(src)
    rules = rules_for(ckpt.config, tp, pp)
    for stage in range(pp):
        for t in range(tp):
            with safe_open(str(out / rank_file_name(stage, t)), framework="pt") as f:
                meta = f.metadata()
                expected = {n for n in ckpt.names()
                            if not rules.is_ignored(n) and stage in (rules.stages_of(n) or ())}
                assert set(f.keys()) == expected
                for name in f.keys():
                    cut = rules.cut(name, t)
                    info = json.loads(meta[name])
                    assert info == {"dim": cut.dim, "pieces": [list(p) for p in cut.pieces],
                                    "shape": ckpt.shape(name)}
                    assert torch.equal(f.get_tensor(name), cut_tensor(ckpt.read(name), cut))
    embed = rules.embed_name
    if rules.dims.tied:
        with safe_open(str(out / rank_file_name(pp - 1, 0)), framework="pt") as f:
            assert embed in f.keys()


def test_shard_folder_interface(checkpoint_dir, tmp_path: Path) -> None:
    src = checkpoint_dir("qwen2")
    out = shard(src, tmp_path / "out", 2, 2)
    assert is_shard_folder(out) and not is_shard_folder(src)
    folder = ShardFolder(out)
    assert (folder.tp, folder.pp, folder.dtype) == (2, 2, "float32")
    assert folder.config == json.loads((src / "config.json").read_text())
    rules = folder.rules()
    ckpt = HFCheckpoint(src)
    with folder.open_rank(1, 1) as shard_:
        assert shard_.stage_layers == rules.stage_layers
        for name in shard_.names():
            cut = rules.cut(name, 1)
            assert torch.equal(shard_.read(name, cut), ckpt.read(name, cut))
            assert shard_.shape(name) == ckpt.shape(name)
        name = "model.layers.3.self_attn.q_proj.weight"
        with pytest.raises(ShardError, match="does not match the runtime"):
            shard_.read(name, rules.cut(name, 0))
        with pytest.raises(KeyError):
            shard_.read("model.layers.0.self_attn.q_proj.weight")


def test_loaded_tensors_are_private(checkpoint_dir, tmp_path: Path) -> None:
    """Tensors read from a rank file share its (checked) memory map copy-on-write: writing to
    one leaves the file, and a second open of it, untouched."""
    out = shard(checkpoint_dir("llama"), tmp_path / "out", 2, 1)
    folder = ShardFolder(out)
    path = folder.rank_path(0, 1)
    before = path.read_bytes()
    with folder.open_rank(0, 1) as shard_:
        t = shard_.read("model.embed_tokens.weight")
        kept = t.clone()
        t.add_(1.0)
    assert path.read_bytes() == before
    with folder.open_rank(0, 1) as shard_:
        assert torch.equal(shard_.read("model.embed_tokens.weight"), kept)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_conversion(checkpoint_dir, tmp_path: Path, dtype: torch.dtype) -> None:
    src = checkpoint_dir("llama")
    out = shard(src, tmp_path / "out", 2, 1, dtype=dtype)
    folder = ShardFolder(out)
    assert folder.dtype == str(dtype).removeprefix("torch.")
    with folder.open_rank(0, 0) as r:
        assert all(r.read(n).dtype == dtype for n in r.names())
    report = verify_shards(out, src)  # compares with the source converted to `dtype`
    assert report.ok and report.compared > 0, report.problems


def test_reshard_chain_verifies_against_source(checkpoint_dir, tmp_path: Path) -> None:
    """(2,2) -> (1,2) -> (2,1) from shard files alone, each step bit-exact against the source."""
    src = checkpoint_dir("mistral")
    a = shard(src, tmp_path / "a", 2, 2)
    b, c = tmp_path / "b", tmp_path / "c"
    reshard(a, b, 1, 2)
    reshard(b, c, 2, 1)
    for folder, layout in ((a, (2, 2)), (b, (1, 2)), (c, (2, 1))):
        report = verify_shards(folder, src)
        assert report.ok, report.problems
        f = ShardFolder(folder)
        assert (f.tp, f.pp) == layout
    manifest = json.loads((c / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "shards"
    assert manifest["source"]["origin"]["origin"]["path"] == str(src.resolve())
    # same layout, same bytes: resharding back to (2, 2) reproduces the first folder's files
    d = tmp_path / "d"
    reshard(c, d, 2, 2)
    for t in range(2):
        for p in range(2):
            name = rank_file_name(p, t)
            assert (d / name).read_bytes() == (a / name).read_bytes()


def test_reshard_with_stage_layers(checkpoint_dir, tmp_path: Path) -> None:
    src = checkpoint_dir("gpt2")
    a = shard(src, tmp_path / "a", 1, 2, stage_layers=[1, 3])
    assert ShardFolder(a).stage_layers == [1, 3]
    reshard(a, tmp_path / "b", 2, 2, stage_layers=[3, 1])
    assert ShardFolder(tmp_path / "b").stage_layers == [3, 1]
    assert verify_shards(tmp_path / "b", src).ok


def test_bin_checkpoint(tmp_path: Path) -> None:
    """A `pytorch_model.bin` source (read with weights_only=True)."""
    import transformers as tf

    torch.manual_seed(1)
    cfg = hf_config("gpt2", architectures=["GPT2LMHeadModel"])
    model = tf.AutoModelForCausalLM.from_config(cfg)
    src = tmp_path / "bin"
    src.mkdir()
    cfg.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    out = shard(src, tmp_path / "out", 2, 2)
    report = verify_shards(out, src)
    assert report.ok and report.compared > 0, report.problems


def test_multi_file_safetensors_with_index(tmp_path: Path) -> None:
    import transformers as tf

    torch.manual_seed(2)
    model = tf.AutoModelForCausalLM.from_config(hf_config("llama"))
    src = tmp_path / "multi"
    model.save_pretrained(src, max_shard_size="50KB")
    assert (src / "model.safetensors.index.json").is_file()
    assert len(list(src.glob("model-*.safetensors"))) > 1
    out = shard(src, tmp_path / "out", 3, 2)
    report = verify_shards(out, src)
    assert report.ok and report.compared > 0, report.problems
    identity = json.loads((out / "manifest.json").read_text())["source"]
    assert len(identity["files"]) == len(list(src.glob("model-*.safetensors")))


def test_tokenizer_files_copied(checkpoint_dir, tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "src"
    shutil.copytree(checkpoint_dir("llama"), src)
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "tokenizer_config.json").write_text("{}")
    out = shard(src, tmp_path / "out", 1, 1)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()


class CountingSource(HFSource):
    """Counts tensor reads, to show the writer streams each tensor exactly once."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads: list[str] = []

    def read_into(self, name, buf):
        self.reads.append(name)
        return super().read_into(name, buf)


def test_each_source_tensor_read_once(checkpoint_dir, tmp_path: Path) -> None:
    src = CountingSource(checkpoint_dir("mistral"))
    write_shards(src, tmp_path / "out", 2, 2)
    assert sorted(src.reads) == sorted(src.names())


def _bench_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sharding.py"
    spec = importlib.util.spec_from_file_location("bench_sharding", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_memory_stays_near_largest_tensor(tmp_path: Path) -> None:
    """Sharding a ~0.7 GB fp32 checkpoint (largest tensor 67 MB) in a child process keeps its
    peak RSS within 1.5 x largest tensor + 500 MB, well below holding the checkpoint."""
    bench = _bench_module()
    src = tmp_path / "src"
    _, largest = bench.make_checkpoint(src, 12, "float32", hidden_size=1024,
                                       intermediate_size=2816, num_attention_heads=16,
                                       vocab_size=16384)
    size = (src / "model.safetensors").stat().st_size
    out, _, peak = bench.run_child(["-m", "launcher.cli", "shard", str(src), str(tmp_path / "o"),
                                    "--tp", "2", "--pp", "2", "--dtype", "bf16"])
    assert "sharded" in out
    assert peak <= 1.5 * largest + 500e6, (peak, largest)
    assert peak < size, (peak, size)
