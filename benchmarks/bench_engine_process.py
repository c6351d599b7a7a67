"""What the engine-process boundary costs: TTFT and inter-token latency of a tiny model driven
(a) directly (engine.step() in the caller's thread, no client), (b) through the in-process
client (engine loop in a thread), (c) through the engine-process client (engine loop in its own
process, a Pipe in between, one message per step). Same checkpoint, rounds alternated.

    python -m benchmarks.bench_engine_process [--rounds 3] [--requests 16] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from runtime.engine_client import EngineClient, StepBatch, token_of
from runtime.types import EngineConfig, SamplingParams
from runtime.worker import EngineSpec


class DirectClient:
    """No client at all: add_request and step() in the caller's thread (the floor)."""

    def __init__(self, local: Any) -> None:
        self.local, self.engine = local, local.engine

    def add(self, rid: str, prompt: list[int], params: SamplingParams) -> None:
        self.engine.add_request(rid, prompt, params)

    def recv(self, timeout_s: float) -> list[StepBatch]:
        outs = self.engine.step()
        return [StepBatch([token_of(o) for o in outs], [], {})]

    def close(self) -> None:
        self.local.close()


def run_batch(client: Any, prompts: list[list[int]], new: int, tag: str
              ) -> tuple[list[float], list[float]]:
    """Submit `prompts` at once; TTFTs and inter-token gaps (s) as the caller sees them."""
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    start: dict[str, float] = {}
    last: dict[str, float] = {}
    ttft, gaps = [], []
    for i, p in enumerate(prompts):
        rid = f"{tag}-{i}"
        start[rid] = time.perf_counter()
        client.add(rid, p, params)
    done = 0
    while done < len(prompts):
        for batch in client.recv(1.0):
            now = time.perf_counter()
            for rid, token, finished, _, _ in batch.tokens:
                if token is not None:
                    if rid in last:
                        gaps.append(now - last[rid])
                    else:
                        ttft.append(now - start[rid])
                    last[rid] = now
                done += finished
    return ttft, gaps


def measure(client: Any, requests: int, concurrency: int, new: int, prompt_len: int
            ) -> dict[str, float]:
    ttft: list[float] = []
    gaps: list[float] = []
    run_batch(client, [[1] * prompt_len], 4, "warm")
    for b in range(requests // concurrency):
        prompts = [[(7 * b + 3 * i + k) % 100 + 1 for k in range(prompt_len)]
                   for i in range(concurrency)]
        t, g = run_batch(client, prompts, new, f"r{b}")
        ttft += t
        gaps += g
    q = statistics.quantiles
    return {"ttft_p50_ms": statistics.median(ttft) * 1e3, "itl_p50_ms": statistics.median(gaps)
            * 1e3, "itl_p99_ms": q(gaps, n=100)[98] * 1e3}


def round_trip_ms(client: Any, n: int = 200) -> float:
    """Median time for a command to reach the engine loop and its answer (a stats batch) to
    come back: the boundary itself, without model work."""
    times = []
    for _ in range(n):
        client.recv(0)  # drop idle ticks
        t0 = time.perf_counter()
        client.request_stats()
        while not client.recv(1.0):
            pass
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def start(kind: str, spec: EngineSpec) -> Any:
    from launcher.engine_process import EngineProcessClient
    from launcher.local import start_local_engine
    from runtime.engine_client import InProcessClient

    if kind == "process":
        return EngineProcessClient.start(spec, "bench")
    local = start_local_engine(spec)
    return DirectClient(local) if kind == "direct" else InProcessClient(local, "bench")


def stop(client: Any) -> None:
    if isinstance(client, EngineClient):
        client.shutdown()
        try:
            while True:
                client.recv(1.0)
        except Exception:  # EngineStopped: the engine is down
            pass
    client.close()


def main() -> None:
    from tests.checkpoints import make_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--arch", default="llama")
    args = ap.parse_args()
    ckpt = make_checkpoint(Path(tempfile.mkdtemp()) / args.arch, args.arch)
    spec = EngineSpec(str(ckpt), 1, 1, engine=EngineConfig(num_blocks=256))
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    trips: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for kind in ("direct", "thread", "process"):
            client = start(kind, spec)
            for conc in (1, 8):
                results.setdefault((kind, conc), []).append(
                    measure(client, args.requests, conc, args.new_tokens, args.prompt_len))
            if kind != "direct":
                trips.setdefault(kind, []).append(round_trip_ms(client))
            stop(client)
    print(f"tiny {args.arch} (tp=1, pp=1), {args.new_tokens} new tokens, prompts of "
          f"{args.prompt_len}; median over {args.rounds} rounds")
    print("| client | conc | TTFT p50 ms | ITL p50 ms | ITL p99 ms |\n|---|--:|--:|--:|--:|")
    for (kind, conc), rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"| {kind} | {conc} | {med['ttft_p50_ms']:.2f} | {med['itl_p50_ms']:.2f} | "
              f"{med['itl_p99_ms']:.2f} |")
    for kind, values in trips.items():
        print(f"{kind}: command -> engine loop -> batch back, idle engine: "
              f"{statistics.median(values):.3f} ms")


if __name__ == "__main__":
    main()
