"""Flags the docs name, each shown to have its documented effect: `generate`'s sampling flags
and `--dtype fp16`, `shard --progress` / `--stage-layers`, `reshard --dtype`, a `.bin` index as a
source, `repo add`'s flags, `launch --backend`; and the check (scripts/check_docs_flags.py)
that every `--flag` in README.md and docs/*.md is mentioned by some test.

Serve flags: test_documented_flags_serve.py; config.pbtxt parameters:
test_documented_flags_params.py; bench and analyze: test_documented_flags_tools.py."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.cli import main
from tests.checkpoints import hf_config, reference_generate

ROOT = Path(__file__).resolve().parents[1]
P, Q = [3, 5, 7, 9], [11, 12, 13, 14, 15]
HOT = "1.5"  # a temperature that makes sampling leave the argmax often


def shardserve(*args: str, env: dict[str, str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`shardserve ARGS` as a user runs it (a subprocess of this checkout)."""
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def generate_json(model: Path, prompts: list[list[int]], *flags: str) -> dict[str, Any]:
    """`shardserve generate --json` for token-id prompts; the parsed report."""
    ids = [a for p in prompts for a in ("--token-ids", ",".join(map(str, p)))]
    out = shardserve("generate", "--model", str(model), "--json", *flags, *ids)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@functools.lru_cache(maxsize=2)
def _hf_model(model: Path) -> Any:
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


def teacher_logits(model: Path, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """transformers' fp32 logits (len(tokens), vocab) that each of `tokens` was drawn from."""
    hf = _hf_model(model)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0]
    return logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)]


# --- the docs check itself ---------------------------------------------------------------------
def test_every_documented_flag_is_mentioned_by_a_test() -> None:
    """CI enforcement of scripts/check_docs_flags.py on the real docs and tests."""
    out = subprocess.run([sys.executable, "scripts/check_docs_flags.py"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok: ")


def test_docs_check_finds_an_untested_flag(tmp_path: Path) -> None:
    """The checker reports a documented flag no test names, matches whole flags only
    (`--shape` is not covered by `--shapes`), and passes once a test names it."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import check_docs_flags as check
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "README.md").write_text("run `tool --shape X --nproc-per-node 2`\n")
    (tmp_path / "docs" / "a.md").write_text("`--params tiny`, `--shapes 1x1`, `--new-tokens 2`\n")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "bench_serving.py").write_text('"--params" "--shapes"\n')
    (tmp_path / "tests" / "test_x.py").write_text('args = ["--shapes", "1"]\n')
    found = check.problems(tmp_path)
    assert any(line.startswith("--shape (README.md)") for line in found), found
    assert any(line.startswith("--new-tokens") and "does not define it" in line
               for line in found), found
    assert not any(line.startswith(("--shapes", "--params", "--nproc-per-node"))
                   for line in found), found
    (tmp_path / "tests" / "test_y.py").write_text('args = ["--shape", "X:1"]\n')
    (tmp_path / "benchmarks" / "bench_serving.py").write_text('"--params" "--shapes" '
                                                              '"--new-tokens"\n')
    assert [line for line in check.problems(tmp_path) if "allow-listed but" not in line] == []


# --- generate ----------------------------------------------------------------------------------
def test_generate_temperature_top_k_and_seed(checkpoint_dir) -> None:
    """`--temperature 1.5 --top-k 3 --seed 7`: every token is one of the 3 most likely under
    transformers' logits, some are not the most likely (sampled, not greedy), two requests
    with the same seed draw the same tokens, and `--seed 8` draws others."""
    path = checkpoint_dir("llama")
    common = ["--max-tokens", "24", "--ignore-eos", "--temperature", HOT, "--top-k", "3"]
    seven = [r["token_ids"] for r in generate_json(path, [P, P, Q], *common,
                                                   "--seed", "7")["results"]]
    eight = generate_json(path, [P], *common, "--seed", "8")["results"][0]["token_ids"]
    assert seven[0] == seven[1]
    assert eight != seven[0]
    off_argmax = 0
    for prompt, tokens in ((P, seven[0]), (Q, seven[2]), (P, eight)):
        logits = teacher_logits(path, prompt, tokens)
        top3 = logits.topk(3, dim=-1).indices
        for i, t in enumerate(tokens):
            assert t in top3[i].tolist(), (prompt, i, t, top3[i])
        off_argmax += sum(t != int(a) for t, a in zip(tokens, logits.argmax(-1), strict=True))
    assert off_argmax > 0


def test_generate_top_p(checkpoint_dir) -> None:
    """`--top-p 0.5` at temperature 1.5: every token lies in the nucleus of transformers'
    logits / 1.5 (smallest set of most likely tokens whose probability reaches 0.5)."""
    path = checkpoint_dir("llama")
    report = generate_json(path, [P, Q], "--max-tokens", "24", "--ignore-eos",
                           "--temperature", HOT, "--top-p", "0.5", "--seed", "3")
    for prompt, row in zip((P, Q), report["results"], strict=True):
        tokens = row["token_ids"]
        probs = (teacher_logits(path, prompt, tokens) / float(HOT)).softmax(-1)
        for i, t in enumerate(tokens):
            ranked = probs[i].sort(descending=True)
            before = ranked.values.cumsum(0) - ranked.values  # mass of the more likely tokens
            nucleus = ranked.indices[before <= 0.5 + 1e-4].tolist()
            assert t in nucleus, (prompt, i, t, nucleus)


def test_generate_dtype_fp16(checkpoint_dir) -> None:
    """`--dtype fp16` runs the fp32 checkpoint in float16, greedy tokens equal to transformers
    in float16."""
    import transformers as tf

    path = checkpoint_dir("llama")
    report = generate_json(path, [P, Q], "--dtype", "fp16", "--max-tokens", "8", "--ignore-eos")
    assert report["dtype"] == "float16"
    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).eval()
    for prompt, row in zip((P, Q), report["results"], strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert row["token_ids"] == out[0, len(prompt):].tolist()


# --- shard / reshard ---------------------------------------------------------------------------
def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_shard_progress_flags_and_stage_layers(capsys, checkpoint_dir, tmp_path: Path) -> None:
    """stderr is not a terminal here: no bar by default or with `--no-progress`, a bar that
    reaches 100% with `--progress`; `--stage-layers 1,3` puts 1 and 3 layers on the stages."""
    src = str(checkpoint_dir("llama"))
    layout = ["--tp", "1", "--pp", "2", "--stage-layers", "1,3"]
    bars = {}
    for name, extra in (("default", []), ("no", ["--no-progress"]), ("yes", ["--progress"])):
        code, stdout, err = _run(capsys, "shard", src, str(tmp_path / name), *layout, *extra)
        assert code == 0, err
        assert "GB/s" in stdout  # the one summary line
        bars[name] = err
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["stage_layers"] == [1, 3]
    assert bars["default"] == "" and bars["no"] == ""
    assert bars["yes"].startswith("\r[") and "100.0%" in bars["yes"], bars["yes"]


def test_reshard_dtype(capsys, checkpoint_dir, tmp_path: Path) -> None:
    """`reshard --dtype bf16` converts an fp32 shard folder: every stored tensor is bf16 and
    `verify --source` finds each equal to the source tensor rounded to bf16."""
    from sharding.shards import ShardFolder

    src = str(checkpoint_dir("llama"))
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(capsys, "shard", src, str(a), "--tp", "2")[0] == 0
    assert ShardFolder(a).dtype == "float32"
    code, _, err = _run(capsys, "reshard", str(a), str(b), "--tp", "1", "--pp", "2",
                        "--dtype", "bf16")
    assert code == 0, err
    folder = ShardFolder(b)
    assert (folder.tp, folder.pp, folder.dtype) == (1, 2, "bfloat16")
    for pp_rank in range(2):
        with folder.open_rank(pp_rank, 0) as shard:
            assert {shard.read(n).dtype for n in shard.names()} == {torch.bfloat16}
    code, stdout, err = _run(capsys, "verify", str(b), "--source", src)
    assert code == 0, err + stdout


def _bin_index_checkpoint(path: Path, files: int = 3) -> Path:
    """A Llama saved the way older transformers did: pytorch_model-0000i-of-0000n.bin files
    plus pytorch_model.bin.index.json (transformers 5 writes safetensors only)."""
    import transformers as tf

    torch.manual_seed(5)
    cfg = hf_config("llama", architectures=["LlamaForCausalLM"])
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    state = model.state_dict()
    names = sorted(state)
    weight_map = {}
    for i in range(files):
        file = f"pytorch_model-{i + 1:05d}-of-{files:05d}.bin"
        part = {n: state[n].clone() for n in names[i::files]}
        torch.save(part, path / file)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return path


def test_bin_index_source_shards_and_generates(capsys, tmp_path: Path) -> None:
    """A `pytorch_model.bin.index.json` checkpoint: `shard` + `verify --source` are
    bit-exact, and `generate` straight from it (tp=2) equals transformers greedy."""
    from sharding.checkpoint import HFCheckpoint

    src = _bin_index_checkpoint(tmp_path / "bin")
    assert len(HFCheckpoint(src).files()) == 3
    assert not list(src.glob("*.safetensors"))
    out = tmp_path / "shards"
    code, _, err = _run(capsys, "shard", str(src), str(out), "--tp", "2", "--pp", "2")
    assert code == 0, err
    code, stdout, err = _run(capsys, "verify", str(out), "--source", str(src))
    assert code == 0, err + stdout
    identity = json.loads((out / "manifest.json").read_text())["source"]
    assert sorted(f["name"] for f in identity["files"]) == sorted(
        p.name for p in src.glob("pytorch_model-*.bin"))
    ref, _ = reference_generate(src, [P, Q], 6)
    report = generate_json(src, [P, Q], "--tp", "2", "--max-tokens", "6", "--ignore-eos")
    assert [r["token_ids"] for r in report["results"]] == ref


# --- repo add ----------------------------------------------------------------------------------
def test_repo_add_flags(capsys, checkpoint_dir, tmp_path: Path) -> None:
    """`repo add` writes what its flags say, as the LLM backend reads it: `--tp/--pp/--dtype`,
    each `--param KEY=VALUE` into the engine settings, `--copy` puts the checkpoint in the
    version folder, and an existing entry is replaced only with `--force`."""
    from serving.backends.llm import LLMSettings
    from serving.repository import ModelRepository

    ck = checkpoint_dir("llama")
    repo = tmp_path / "repo"
    code, stdout, err = _run(capsys, "repo", "add", str(repo), "big", "--model", str(ck),
                             "--tp", "2", "--pp", "2", "--dtype", "bf16",
                             "--param", "num_blocks=7", "--param", "max_prefill_tokens=9",
                             "--param", "microbatches=1", "--param", "dist_backend=gloo")
    assert code == 0, err
    config = ModelRepository(repo).config("big")
    s = LLMSettings.from_config(config, repo / "big" / "1")
    assert (s.model, s.tp, s.pp, s.dtype, s.dist_backend) == (ck.resolve(), 2, 2, "bf16", "gloo")
    assert (s.engine.num_blocks, s.engine.max_prefill_tokens, s.engine.microbatches) == (7, 9, 1)
    assert not any((repo / "big" / "1").iterdir())  # referenced, not copied

    code, _, err = _run(capsys, "repo", "add", str(repo), "big", "--model", str(ck), "--copy")
    assert code == 2 and "--force" in err
    code, _, err = _run(capsys, "repo", "add", str(repo), "big", "--model", str(ck), "--copy",
                        "--force")
    assert code == 0, err
    s = LLMSettings.from_config(ModelRepository(repo).config("big"), repo / "big" / "1")
    assert s.model == (repo / "big" / "1").resolve() and (s.tp, s.pp, s.dtype) == (1, 1, None)
    for f in ck.iterdir():
        assert (repo / "big" / "1" / f.name).read_bytes() == f.read_bytes()
    assert _run(capsys, "repo", "add", str(repo), "x", "--model", str(ck),
                "--param", "oops")[0] == 2


# --- launch ------------------------------------------------------------------------------------
def test_launch_backend_flag() -> None:
    """`launch --backend gloo -- CMD` exports SHARDSERVE_BACKEND=gloo to CMD; `--backend nccl`
    exports nccl where CUDA is present and is refused (naming CUDA) where it is not."""
    show = [sys.executable, "-c", "import os; print(os.environ['SHARDSERVE_BACKEND'])"]
    gloo = shardserve("launch", "--backend", "gloo", "--", *show)
    assert gloo.returncode == 0, gloo.stderr
    assert gloo.stdout.strip() == "gloo"
    assert "backend=gloo" in gloo.stderr
    nccl = shardserve("launch", "--backend", "nccl", "--", *show)
    if torch.cuda.is_available():
        assert nccl.returncode == 0 and nccl.stdout.strip() == "nccl", nccl.stderr
    else:
        assert nccl.returncode != 0 and nccl.stdout == ""
        assert "backend nccl needs CUDA" in nccl.stderr, nccl.stderr
