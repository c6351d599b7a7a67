"""Bad input to shard / verify / reshard / load: one clear line, non-zero exit, nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from launcher.cli import main
from sharding.manifest import rank_file_name
from sharding.shards import ShardError, ShardFolder
from sharding.sources import HFSource
from sharding.writer import write_shards
from tests.checkpoints import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed (e.g. save_pretrained's progress)
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_failure(code: int, err: str, out_dir: Path, *needles: str) -> None:
    """Non-zero exit, a single error line mentioning `needles`, and no output left behind."""
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(f"{out_dir.name}.tmp-*"))


@pytest.fixture
def src(checkpoint_dir, tmp_path: Path) -> Path:
    """A private copy of the llama checkpoint that a test may damage."""
    path = tmp_path / "src"
    shutil.copytree(checkpoint_dir("llama"), path)
    return path


def test_missing_source(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "shard", str(tmp_path / "nope"), str(tmp_path / "out"),
                           "--tp", "1")
    assert_clean_failure(code, err, tmp_path / "out", "nope", "not a directory")


def test_missing_config(capsys, src: Path, tmp_path: Path) -> None:
    (src / "config.json").unlink()
    code, _, err = run_cli(capsys, "shard", str(src), str(tmp_path / "out"), "--tp", "1")
    assert_clean_failure(code, err, tmp_path / "out", "config.json")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_source_file(capsys, src: Path, tmp_path: Path, damage: str) -> None:
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    code, _, err = run_cli(capsys, "shard", str(src), str(tmp_path / "out"), "--tp", "2")
    assert_clean_failure(code, err, tmp_path / "out", "model.safetensors")


def test_index_names_missing_file(capsys, tmp_path: Path) -> None:
    import torch
    import transformers as tf

    from tests.checkpoints import hf_config

    torch.manual_seed(0)
    src = tmp_path / "multi"
    tf.AutoModelForCausalLM.from_config(hf_config("llama")).save_pretrained(
        src, max_shard_size="50KB")
    victim = sorted(src.glob("model-*.safetensors"))[1]
    victim.unlink()
    code, _, err = run_cli(capsys, "shard", str(src), str(tmp_path / "out"), "--tp", "2")
    assert_clean_failure(code, err, tmp_path / "out", victim.name)


def test_incomplete_source(capsys, src: Path, tmp_path: Path) -> None:
    weights = load_file(src / "model.safetensors")
    del weights["model.layers.2.mlp.up_proj.weight"]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli(capsys, "shard", str(src), str(tmp_path / "out"), "--tp", "2")
    assert_clean_failure(code, err, tmp_path / "out", "incomplete", "layer 2", "up_proj")


def test_unsupported_architecture(capsys, src: Path, tmp_path: Path) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "shard", str(src), str(tmp_path / "out"), "--tp", "1")
    assert_clean_failure(code, err, tmp_path / "out", "BertForMaskedLM", "LlamaForCausalLM")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tp", "5"], "tp=5"),  # 4 heads
        (["--tp", "0"], "tp=0"),
        (["--tp", "1", "--pp", "5"], "pp=5"),  # 4 layers
        (["--tp", "1", "--pp", "0"], "pp=0"),
        (["--tp", "1", "--pp", "2", "--stage-layers", "1,1"], "sum"),
        (["--tp", "1", "--pp", "3", "--stage-layers", "2,2"], "3"),
        (["--tp", "1", "--pp", "2", "--stage-layers", "4,0"], "positive"),
    ],
    ids=["tp-over-heads", "tp-zero", "pp-over-layers", "pp-zero", "stage-sum", "stage-count",
         "stage-zero"],
)
def test_bad_layout(capsys, checkpoint_dir, tmp_path: Path, args: list[str], needle: str) -> None:
    code, _, err = run_cli(capsys, "shard", str(checkpoint_dir("llama")), str(tmp_path / "out"),
                           *args)
    assert_clean_failure(code, err, tmp_path / "out", needle)


def test_stage_layers_not_numbers(capsys, checkpoint_dir, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["shard", str(checkpoint_dir("llama")), str(tmp_path / "out"), "--tp", "1",
              "--pp", "2", "--stage-layers", "a,b"])
    assert exc.value.code != 0
    assert "--stage-layers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(capsys, checkpoint_dir, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    src = str(checkpoint_dir("gpt2"))
    code, _, err = run_cli(capsys, "shard", src, str(out), "--tp", "2")
    assert code != 0 and "--force" in err and (out / "keep.txt").is_file()
    code, stdout, _ = run_cli(capsys, "shard", src, str(out), "--tp", "2", "--force")
    assert code == 0 and "sharded" in stdout and "GB/s" in stdout
    assert not (out / "keep.txt").exists() and ShardFolder(out).tp == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_over_source_refused(capsys, src: Path) -> None:
    before = sorted(p.name for p in src.iterdir())
    code, _, err = run_cli(capsys, "shard", str(src), str(src), "--tp", "1", "--force")
    assert code != 0 and "overwrite the source" in err
    assert sorted(p.name for p in src.iterdir()) == before


def test_interrupted_write_leaves_nothing(checkpoint_dir, tmp_path: Path) -> None:
    class Failing(HFSource):
        count = 0

        def read_into(self, name, buf):
            self.count += 1
            if self.count == 10:
                raise KeyboardInterrupt
            return super().read_into(name, buf)

    with pytest.raises(KeyboardInterrupt):
        write_shards(Failing(checkpoint_dir("qwen2")), tmp_path / "out", 2, 2)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def shards(checkpoint_dir, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    assert main(["shard", str(checkpoint_dir("mistral")), str(out), "--tp", "2", "--pp", "2"]) == 0
    return out


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def test_checksum_mismatch_at_load_names_file(shards: Path) -> None:
    victim = shards / rank_file_name(1, 0)
    _flip_byte(victim)
    folder = ShardFolder(shards)
    folder.open_rank(0, 0).close()  # other ranks still open
    with pytest.raises(ShardError, match=f"{victim.name}.*checksum mismatch"):
        folder.open_rank(1, 0)


def test_truncated_shard_at_load_names_file(shards: Path) -> None:
    victim = shards / rank_file_name(0, 1)
    victim.write_bytes(victim.read_bytes()[:-8])
    with pytest.raises(ShardError, match=f"{victim.name}: size .* manifest says"):
        ShardFolder(shards).open_rank(0, 1)


def test_checksum_mismatch_in_verify_and_reshard(capsys, checkpoint_dir, shards: Path,
                                                 tmp_path: Path) -> None:
    victim = shards / rank_file_name(0, 1)
    _flip_byte(victim)
    code, out, err = run_cli(capsys, "verify", str(shards))
    assert code == 1 and "FAILED" in out and victim.name in err and "checksum" in err
    code, _, err = run_cli(capsys, "reshard", str(shards), str(tmp_path / "new"), "--tp", "1")
    assert_clean_failure(code, err, tmp_path / "new", victim.name, "checksum")


def test_verify_finds_missing_file_and_extra_tensor(capsys, shards: Path) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["tensors"]["model.norm.weight"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, "verify", str(shards))
    assert code == 1 and "extra tensor model.norm.weight" in err
    (shards / rank_file_name(1, 1)).unlink()
    code, _, err = run_cli(capsys, "verify", str(shards))
    assert code == 1 and f"{rank_file_name(1, 1)}: missing" in err


def test_verify_against_other_source_fails(capsys, shards: Path, tmp_path: Path) -> None:
    other = make_checkpoint(tmp_path / "other", "mistral", seed=7)
    code, _, err = run_cli(capsys, "verify", str(shards), "--source", str(other))
    assert code == 1 and "differs from the source" in err


def test_not_a_shard_folder(capsys, checkpoint_dir) -> None:
    code, _, err = run_cli(capsys, "verify", str(checkpoint_dir("llama")))
    assert code == 2 and "manifest.json" in err and len(err.strip().splitlines()) == 1


def test_cli_process_exit_status(checkpoint_dir, tmp_path: Path) -> None:
    """The real `python -m launcher.cli` process: summary on success, exit 2 on bad input."""
    cmd = [sys.executable, "-m", "launcher.cli"]
    src = str(checkpoint_dir("gpt2"))
    ok = subprocess.run([*cmd, "shard", src, str(tmp_path / "a"), "--tp", "2"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "sharded" in ok.stdout and ok.stderr == ""
    bad = subprocess.run([*cmd, "shard", src, str(tmp_path / "b"), "--tp", "9"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "tp=9" in bad.stderr and not (tmp_path / "b").exists()


def test_write_failure_in_rank_thread_leaves_nothing(capsys, checkpoint_dir, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk error while a rank thread writes: one error line, no output, no temp folder."""
    from sharding import writer

    calls = {"n": 0}
    original = writer.RankWriter.write_tensor

    def failing(self, entry, full):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError(28, "No space left on device")
        return original(self, entry, full)

    monkeypatch.setattr(writer.RankWriter, "write_tensor", failing)
    code, _, err = run_cli(capsys, "shard", str(checkpoint_dir("gpt2")), str(tmp_path / "out"),
                           "--tp", "2", "--pp", "2")
    assert_clean_failure(code, err, tmp_path / "out", "No space left")


def test_sigterm_mid_write_leaves_nothing(capsys, checkpoint_dir, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal

    calls = {"n": 0}
    original = HFSource.read_into

    def terminated(self, name, buf):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, name, buf)

    monkeypatch.setattr(HFSource, "read_into", terminated)
    with pytest.raises(SystemExit) as exc:
        main(["shard", str(checkpoint_dir("llama")), str(tmp_path / "out"), "--tp", "2"])
    assert exc.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
