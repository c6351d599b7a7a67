"""`shardserve generate`: batch generation on one machine, through the same engine API the server
uses. It starts the model's ranks itself (gloo on CPU, NCCL with CUDA)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from launcher.errors import CommandError
from runtime.engine import GenerationResult, LLMEngine
from runtime.types import EngineConfig, SamplingParams
from runtime.worker import EngineSpec, default_layout

USER_ERRORS = (ValueError, OSError, RuntimeError)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for prompts with a tp x pp model")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="text prompts")
    p.add_argument("--model", required=True, help="HF checkpoint directory or shard folder")
    p.add_argument("--tp", type=int, help="tensor-parallel ranks (default: a shard folder's, or 1)")
    p.add_argument("--pp", type=int, help="pipeline stages (default: a shard folder's, or 1)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: the checkpoint's")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--token-ids", action="append", default=[], metavar="1,2,3",
                   help="a prompt as token ids (repeat once per prompt)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _token_prompts(args: argparse.Namespace) -> list[list[int]]:
    out = []
    for text in args.token_ids:
        try:
            out.append([int(t) for t in text.split(",") if t.strip()])
        except ValueError:
            raise CommandError(f"--token-ids {text!r}: expected comma-separated integers") from None
    return out


def _encode(engine: LLMEngine, args: argparse.Namespace) -> list[list[int]]:
    prompts = _token_prompts(args)
    if args.prompts:
        if engine.tokenizer is None:
            raise CommandError(f"{args.model} has no tokenizer: give prompts with --token-ids")
        prompts += [engine.tokenizer.encode(p) for p in args.prompts]
    return prompts


def _report(engine: LLMEngine, prompts: list[str | list[int]], results: list[GenerationResult],
            load_s: float, args: argparse.Namespace) -> dict[str, Any]:
    t = engine.timings
    decode_tps = t["decode_tokens"] / t["decode_s"] if t["decode_s"] else 0.0
    rows = []
    for prompt, r in zip(prompts, results, strict=True):
        text = engine.tokenizer.decode(r.token_ids) if engine.tokenizer else None
        rows.append({"prompt": prompt, "prompt_token_ids": r.prompt_token_ids,
                     "token_ids": r.token_ids, "text": text, "finish_reason": r.finish_reason})
    return {"model": args.model, "tp": args.tp, "pp": args.pp, "dtype": engine.dtype,
            "results": rows,
            "load_s": round(load_s, 4), "prefill_s": round(t["prefill_s"], 4),
            "decode_s": round(t["decode_s"], 4), "decode_tokens_per_s": round(decode_tps, 2)}


def run(args: argparse.Namespace) -> int:
    from launcher.launch import join_launched_world
    from launcher.local import start_local_engine

    if not args.prompts and not args.token_ids:
        raise CommandError("give at least one PROMPT or --token-ids")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            ignore_eos=args.ignore_eos)
    try:
        params.validate()
    except ValueError as e:
        raise CommandError(str(e)) from None
    tp, pp = default_layout(args.model)
    args.tp, args.pp = args.tp or tp, args.pp or pp
    spec = EngineSpec(args.model, args.tp, args.pp, args.dtype, EngineConfig(),
                      backend=args.backend)
    t0 = time.perf_counter()
    try:
        local = join_launched_world(spec) or start_local_engine(spec)
    except USER_ERRORS as e:
        raise CommandError(str(e)) from None
    load_s = time.perf_counter() - t0
    try:
        prompts = _encode(local.engine, args)
        results = local.engine.generate(prompts, params)
    except ValueError as e:
        raise CommandError(str(e)) from None
    finally:
        local.close()
    shown: list[str | list[int]] = [*map(list, _token_prompts(args)), *args.prompts]
    report = _report(local.engine, shown, results, load_s, args)
    if args.json:
        print(json.dumps(report))
    else:
        for row in report["results"]:
            shown_out = row["text"] if row["text"] is not None else row["token_ids"]
            print(f"{row['prompt']!r} -> {shown_out}")
        print(f"load {report['load_s']}s, prefill {report['prefill_s']}s, decode "
              f"{report['decode_s']}s ({report['decode_tokens_per_s']} tokens/s)")
    return 0
