"""Decode throughput: shardserve's engine vs `transformers` generate, same checkpoint, same run.

    python -m benchmarks.bench_decode [--params 200m|tiny] [--tp 1 --pp 1] [--dtype bf16]

Decode tokens/s excludes prefill on both sides: for transformers it is (N - 1) tokens over
time(generate N) - time(generate 1); for the engine, its own decode-step timing. Both run in
this process, one after the other, for `--rounds` rounds; each round's ratio compares two runs
taken seconds apart, and the median over rounds is reported (this shared 2-core VM's speed
drifts by 30% over minutes, which a single pair of runs cannot tell from a real difference).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

SIZES = {  # ~200M parameters: 12 layers of 1024 hidden, vocab 32000, GQA 16/4
    "200m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                 num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_model(out: Path, size: str, dtype: str) -> int:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**SIZES[size], max_position_embeddings=2048, initializer_range=0.05)
    model = tf.LlamaForCausalLM(cfg).to(DTYPES[dtype])
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def prompts(batch: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(10, 900, (batch, length), generator=g).tolist()


def load_hf(path: Path, dtype: str):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    return model.to("cuda") if torch.cuda.is_available() else model  # where the engine runs


def hf_decode_tps(model, batch: int, plen: int, new: int) -> float:
    ids = torch.tensor(prompts(batch, plen), device=model.device)

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
        if ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(2)  # warm-up
    full, one = timed(new), timed(1)
    return batch * (new - 1) / (full - one)


def engine_decode_tps(engine, batch: int, plen: int, new: int) -> float:
    from runtime.types import SamplingParams

    params = SamplingParams(max_tokens=new, ignore_eos=True)
    engine.generate(prompts(batch, plen), SamplingParams(max_tokens=2, ignore_eos=True))
    engine.generate(prompts(batch, plen), params)
    t = engine.timings
    return t["decode_tokens"] / t["decode_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", choices=sorted(SIZES), default="200m")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--model", type=Path, help="reuse a checkpoint instead of generating one")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or Path(tmp) / "model"
        if args.model is None:
            n = make_model(path, args.params, args.dtype)
            print(f"model: Llama {n / 1e6:.0f}M parameters, {args.dtype}, "
                  f"torch threads {torch.get_num_threads()}")
        rounds = run_rounds(args, path)
    print(f"{'batch':>5} {'shardserve tok/s':>17} {'transformers tok/s':>19} {'ratio':>6}"
          f"   (tp={args.tp} pp={args.pp}; medians of {args.rounds} rounds)")
    for b, pairs in rounds.items():
        ours, hf = (statistics.median(x) for x in zip(*pairs, strict=True))
        ratios = ", ".join(f"{o / h:.2f}" for o, h in pairs)
        print(f"{b:>5} {ours:>17.1f} {hf:>19.1f} {statistics.median(o / h for o, h in pairs):>6.2f}"
              f"   per round: {ratios}")


def run_rounds(args: argparse.Namespace, path: Path) -> dict[int, list[tuple[float, float]]]:
    """Per batch size, one (shardserve, transformers) tokens/s pair per round."""
    from launcher.local import start_local_engine
    from runtime.types import EngineConfig
    from runtime.worker import EngineSpec

    batches = [int(b) for b in args.batches.split(",")]
    hf_model = load_hf(path, args.dtype)
    threads = torch.get_num_threads()  # start_local_engine gives rank 0 a share of the cores
    local = start_local_engine(EngineSpec(str(path), args.tp, args.pp, args.dtype,
                                          EngineConfig(kv_cache_bytes=512 * 2**20)))
    out: dict[int, list[tuple[float, float]]] = {b: [] for b in batches}
    try:
        for _ in range(args.rounds):
            for b in batches:
                rank_threads = torch.get_num_threads()
                torch.set_num_threads(threads)  # transformers gets every core
                hf = hf_decode_tps(hf_model, b, args.prompt_len, args.new_tokens)
                torch.set_num_threads(rank_threads)
                ours = engine_decode_tps(local.engine, b, args.prompt_len, args.new_tokens)
                out[b].append((ours, hf))
    finally:
        local.close()
    return out


if __name__ == "__main__":
    main()
