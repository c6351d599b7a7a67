"""`shardserve generate` end to end, as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.checkpoints import reference_generate

ROOT = Path(__file__).resolve().parents[1]


def shardserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_generate_json_matches_transformers(checkpoint_dir) -> None:
    path = checkpoint_dir("qwen2")
    prompts = [[3, 5, 7, 9], [11, 12, 13, 14, 15, 16]]
    ref, _ = reference_generate(path, prompts, 8)
    id_args = [a for p in prompts for a in ("--token-ids", ",".join(map(str, p)))]
    out = shardserve("generate", "--model", str(path), "--tp", "2", "--pp", "2", "--max-tokens",
                     "8", "--ignore-eos", "--json", *id_args)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [r["token_ids"] for r in report["results"]] == ref
    assert [r["prompt_token_ids"] for r in report["results"]] == prompts
    for key in ("load_s", "prefill_s", "decode_s", "decode_tokens_per_s"):
        assert report[key] > 0, key


def test_generate_text_with_tokenizer(tmp_path) -> None:
    """Text prompts go through the checkpoint's tokenizer: the prompt ids are its encoding and
    the text is exactly its decoding of the generated ids."""
    from transformers import AutoTokenizer

    from configs.demo import build_demo_model

    path = build_demo_model(tmp_path / "demo", layers=2, hidden=64)
    out = shardserve("generate", "--model", str(path), "--tp", "2", "--max-tokens", "6",
                     "--ignore-eos", "--json", "The quick brown fox")
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)["results"][0]
    assert row["prompt"] == "The quick brown fox" and len(row["token_ids"]) == 6
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert row["prompt_token_ids"] == tokenizer.encode("The quick brown fox")
    assert row["text"] == tokenizer.decode(row["token_ids"])
    assert row["text"]  # six tokens of the demo vocabulary decode to some text


def test_generate_errors_are_one_line(checkpoint_dir, tmp_path) -> None:
    llama = str(checkpoint_dir("llama"))
    cases = [
        (["--model", str(tmp_path / "nope"), "--token-ids", "1"], "not a directory"),
        (["--model", llama, "--tp", "8", "--token-ids", "1"], "tp=8"),
        (["--model", llama, "--pp", "9", "--token-ids", "1"], "pp=9"),
        (["--model", llama, "--token-ids", "1,x"], "comma-separated"),
        (["--model", llama, "hello"], "no tokenizer"),
        (["--model", llama, "--token-ids", "1", "--top-p", "2"], "top_p"),
    ]
    for args, message in cases:
        out = shardserve("generate", *args)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_generate_from_shards_takes_their_layout_and_dtype(checkpoint_dir, tmp_path) -> None:
    """No --tp/--pp/--dtype: a bf16 shard folder runs at its own layout, in bf16, and matches a
    bf16 run straight from the checkpoint."""
    src, out = str(checkpoint_dir("llama")), str(tmp_path / "shards")
    made = shardserve("shard", src, out, "--tp", "2", "--pp", "2", "--dtype", "bf16")
    assert made.returncode == 0, made.stderr
    common = ["--max-tokens", "6", "--ignore-eos", "--json", "--token-ids", "5,6,7"]
    sharded = shardserve("generate", "--model", out, *common)
    assert sharded.returncode == 0, sharded.stderr
    report = json.loads(sharded.stdout)
    assert (report["tp"], report["pp"], report["dtype"]) == (2, 2, "bfloat16")
    direct = shardserve("generate", "--model", src, "--tp", "2", "--pp", "2", "--dtype", "bf16",
                        *common)
    assert direct.returncode == 0, direct.stderr
    assert report["results"][0]["token_ids"] == json.loads(direct.stdout)["results"][0]["token_ids"]
