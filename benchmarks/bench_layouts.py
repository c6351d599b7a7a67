"""Layout benchmark: generate a random Llama checkpoint and run `shardserve bench` on it.

    python -m benchmarks.bench_layouts [--params 30m|200m|tiny] [--dtype fp32] [--keep DIR] \
        -- [shardserve bench arguments, e.g. --layouts 1x1,2x1,1x2,2x2 --out bench-results]

The checkpoint is random (no download); every figure comes with the 1x1 baseline of the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
    "30m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, vocab_size=8000),
    "200m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                 num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
}


def make_model(out: Path, size: str, dtype: str) -> int:
    """Save a random Llama of `size` to `out`; returns its parameter count."""
    import torch
    import transformers as tf

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**SIZES[size], max_position_embeddings=2048, initializer_range=0.05)
    model = tf.LlamaForCausalLM(cfg).to(dtypes[dtype])
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", choices=sorted(SIZES), default="30m")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--keep", type=Path, help="write (or reuse) the checkpoint here")
    args = ap.parse_args(ours)

    from launcher.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "model"
        if not (path / "config.json").is_file():
            n = make_model(path, args.params, args.dtype)
            print(f"model: random Llama, {n / 1e6:.0f}M parameters, {args.dtype}", flush=True)
        return cli(["bench", "--model", str(path), "--dtype", args.dtype, *rest])


if __name__ == "__main__":
    sys.exit(main())
