"""Sharding benchmark on a generated ~1B-parameter Llama checkpoint (random bf16 weights).

Prints, all measured in this run on this machine:
- `shardserve shard` (tp x pp) seconds, GB/s, peak RSS of the sharding process, and its GB/s
  relative to a plain `shutil.copyfile` of the same source bytes (target >= 0.5);
- the time for every rank to load its weights from the shard folder (each rank in its own
  process, sha256 check included) vs `transformers` `from_pretrained` of the source (target: >= 2x
  faster).

Usage: python benchmarks/bench_sharding.py [--layers 22] [--tp 2] [--pp 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# TinyLlama-1.1B's shape: 22 layers of 2048 hidden, 32 heads / 4 kv heads, 5632 intermediate.
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4,
    "num_hidden_layers": 22, "vocab_size": 32000, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}


def llama_shapes(cfg: dict) -> list[tuple[str, list[int]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    out = [("model.embed_tokens.weight", [v, h])]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h]),
                (p + "self_attn.q_proj.weight", [h, h]), (p + "self_attn.k_proj.weight", [kv, h]),
                (p + "self_attn.v_proj.weight", [kv, h]), (p + "self_attn.o_proj.weight", [h, h]),
                (p + "mlp.gate_proj.weight", [i, h]), (p + "mlp.up_proj.weight", [i, h]),
                (p + "mlp.down_proj.weight", [h, i])]
    return out + [("model.norm.weight", [h]), ("lm_head.weight", [v, h])]


def make_checkpoint(path: Path, layers: int, dtype_name: str = "bfloat16",
                    **overrides: object) -> tuple[int, int]:
    """Stream random tensors of a Llama (CONFIG with `overrides`) into path/model.safetensors,
    never holding more than one tensor; returns (params, largest tensor bytes)."""
    import torch

    from sharding.stformat import header_bytes, tensor_bytes

    dtype = getattr(torch, dtype_name)
    cfg = dict(CONFIG, num_hidden_layers=layers, torch_dtype=dtype_name, **overrides)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    shapes = llama_shapes(cfg)
    header, _ = header_bytes([(n, dtype, s) for n, s in shapes], {"format": "pt"})
    gen = torch.Generator().manual_seed(0)
    params = largest = 0
    with open(path / "model.safetensors", "wb") as f:
        f.write(header)
        for _, shape in shapes:
            t = torch.randn(shape, generator=gen, dtype=dtype).mul_(0.02)
            if len(shape) == 1:
                t.fill_(1.0)
            f.write(tensor_bytes(t))
            params += t.numel()
            largest = max(largest, t.numel() * t.element_size())
    return params, largest


# Runs `-m module args...` or `-c code args...` and reports the peak RSS of this process image
# (VmHWM, which starts afresh at exec; ru_maxrss would include the forked parent's pages).
WRAPPER = """
import runpy, sys
kind, target, *rest = sys.argv[1:]
try:
    if kind == "-m":
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *rest]
        exec(compile(target, "<child>", "exec"), {"__name__": "__main__"})
finally:
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")]
    print("VMHWM", int(hwm[0].split()[1]) * 1024, file=sys.stderr)
"""


def run_child(args: list[str]) -> tuple[str, float, int]:
    """Run `python -m ...` / `python -c ...` in a child process; returns (stdout, wall seconds,
    peak RSS bytes of the child). The child's CPU seconds (user + sys) go to LAST_CPU."""
    start = time.time()
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *args], cwd=ROOT, stdout=fo,
                                stderr=fe, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    if proc.returncode:
        raise RuntimeError(f"{args} failed ({proc.returncode}): {err[-2000:]}")
    LAST_CPU[0] = usage.ru_utime + usage.ru_stime
    peaks = [int(line.split()[1]) for line in err.splitlines() if line.startswith("VMHWM ")]
    return out, time.time() - start, peaks[-1]


LAST_CPU = [0.0]


def timed_copy(files: list[Path], dst: Path) -> tuple[float, float]:
    """Copy `files` into `dst` (then remove it): (wall seconds, CPU seconds user + sys)."""
    import resource

    dst.mkdir()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.time()
    for f in files:
        shutil.copyfile(f, dst / f.name)
    seconds = time.time() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    shutil.rmtree(dst)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return seconds, cpu


# Both loaders map files lazily; `touch` reads one byte per page of every tensor so that the
# figures compare weights actually in memory (the shard loader also checks the sha256 first).
TOUCH = """
import torch
def touch(ts):
    return sum(int(t.detach().reshape(-1).view(torch.uint8)[::4096].sum()) for t in ts)
"""

# argv: folder pp_rank tp_rank [sync]; with "sync" the rank says "ready" once imported and
# starts loading when the parent says "go", so that all ranks load at the same moment (as after
# a launcher's barrier) rather than one rank's load racing the others' interpreter starts.
CHILD_LOAD_RANK = TOUCH + """
import sys, time
from sharding.shards import ShardFolder
if sys.argv[4:] == ["sync"]:
    print("ready", flush=True)
    sys.stdin.readline()
t = time.time()
folder = ShardFolder(sys.argv[1])
with folder.open_rank(int(sys.argv[2]), int(sys.argv[3])) as r:
    touch(r.read(name) for name in r.names())
print(time.time() - t)
"""

CHILD_FROM_PRETRAINED = TOUCH + """
import sys, time, transformers
t = time.time()
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
lazy = time.time() - t
touch(m.parameters())
print(time.time() - t, lazy)
"""


def load_all_ranks(out: Path, tp: int, pp: int) -> tuple[float, float]:
    """Every rank loads its file in its own process; once all have started up (imports done)
    they are told to go at once: (wall s from "go" until the last is done, slowest rank's s)."""
    procs = [subprocess.Popen([sys.executable, "-c", CHILD_LOAD_RANK, str(out), str(p), str(t),
                               "sync"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
             for p in range(pp) for t in range(tp)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    start = time.time()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outs = [proc.communicate()[0] for proc in procs]
    wall = time.time() - start
    if any(proc.returncode for proc in procs):
        raise RuntimeError("a rank failed to load")
    return wall, max(float(o.split()[0]) for o in outs)


def load_each_rank_alone(out: Path, tp: int, pp: int) -> float:
    """The slowest rank when each loads on its own (as on separate machines): seconds."""
    times = []
    for p in range(pp):
        for t in range(tp):
            stdout, _, _ = run_child(["-c", CHILD_LOAD_RANK, str(out), str(p), str(t)])
            times.append(float(stdout.split()[0]))
    return max(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="copy/shard rounds (best is used)")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sharding-", dir=args.workdir))
    try:
        bench(work, args.layers, args.tp, args.pp, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


def bench(work: Path, layers: int, tp: int, pp: int, rounds: int) -> None:
    src, out = work / "src", work / "out"
    t = time.time()
    params, largest = make_checkpoint(src, layers)
    files = [src / "model.safetensors"]
    size = sum(f.stat().st_size for f in files)
    print(f"checkpoint: {params / 1e9:.2f}B params, {size / 1e9:.2f} GB bf16, largest tensor "
          f"{largest / 1e6:.0f} MB (generated in {time.time() - t:.1f} s)")

    # This machine's page cache is noisy (a VM: first-touch of memory is slow), so copy and
    # shard alternate for a few rounds and the best of each is compared.
    copies, shards, peaks, copy_cpu, shard_cpu = [], [], [], [], []
    for r in range(rounds):
        if r:  # free the last output first, so that copy and shard find the same free memory
            shutil.rmtree(out)
        wall_s, cpu_s = timed_copy(files, work / "copy")
        copies.append(wall_s)
        copy_cpu.append(cpu_s)
        stdout, wall, peak = run_child(["-m", "launcher.cli", "shard", str(src), str(out),
                                        "--tp", str(tp), "--pp", str(pp)])
        summary = stdout.strip().splitlines()[-1]
        shards.append(float(summary.split(" in ")[1].split(" s ")[0]))
        peaks.append(peak)
        shard_cpu.append(LAST_CPU[0])
    copy_s, shard_s, peak = min(copies), min(shards), max(peaks)
    written = sum(f.stat().st_size for f in out.glob("rank-*.safetensors"))
    budget = 1.5 * largest + 500e6
    print(f"shard tp={tp} pp={pp}: best {shard_s:.2f} s of {_fmt(shards)} (interpreter start "
          f"excluded), {size / shard_s / 1e9:.2f} GB/s of source, "
          f"{written / shard_s / 1e9:.2f} GB/s written")
    print(f"plain copy of the same bytes: best {copy_s:.2f} s of {_fmt(copies)}, "
          f"{size / copy_s / 1e9:.2f} GB/s -> shard/copy throughput ratio "
          f"{copy_s / shard_s:.2f} (target >= 0.5)")
    print(f"CPU seconds (user + sys): shard {_fmt(shard_cpu)} (interpreter start included), "
          f"copy {_fmt(copy_cpu)}; the wall-clock ratio swings with other load on this machine")
    print(f"peak RSS of the shard process: {peak / 1e6:.0f} MB (max over runs); budget 1.5 x "
          f"largest tensor + 500 MB = {budget / 1e6:.0f} MB -> "
          f"{'within' if peak <= budget else 'OVER'}")
    print(f"  last run: {summary}")

    wall_load, slowest = load_all_ranks(out, tp, pp)
    alone = load_each_rank_alone(out, tp, pp)
    fp_out, _, _ = run_child(["-c", CHILD_FROM_PRETRAINED, str(src)])
    fp_s, fp_lazy = (float(x) for x in fp_out.split()[:2])
    print(f"load, weights in memory: all {tp * pp} ranks from shards at once (one process each, "
          f"started together once imported, sha256 checked) {slowest:.2f} s (slowest rank; "
          f"{wall_load:.2f} s until the last exited) vs transformers from_pretrained {fp_s:.2f} s "
          f"({fp_lazy:.2f} s before its lazily mapped weights are read) -> "
          f"{fp_s / slowest:.1f}x faster (target >= 2x)")
    print(f"  each rank alone (as on its own machine): slowest {alone:.2f} s -> "
          f"{fp_s / alone:.1f}x faster than from_pretrained")


if __name__ == "__main__":
    main()
