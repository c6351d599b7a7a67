"""The fused CPU kernels (parallel/csrc/cpu_ops.cpp) against the torch ops they replace, their
build cache and errors, and a bf16 engine with the kernels on vs off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from launcher.local import start_local_engine
from parallel.native import CpuOps, NativeBuildError, build_library, load_cpu_ops
from runtime.models.attention import AttentionBatch, decode_attention, kv_group_size
from runtime.models.rope import apply_rope, rope_cos_sin
from runtime.types import EngineConfig, SamplingParams
from runtime.worker import EngineSpec
from tests.checkpoints import make_checkpoint

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(scope="module")
def ops() -> CpuOps:
    return load_cpu_ops()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(ops: CpuOps, dtype: torch.dtype, with_residual: bool) -> None:
    torch.manual_seed(1)
    x, res = torch.randn(2, 5, 96, dtype=dtype), torch.randn(2, 5, 96, dtype=dtype)
    w = torch.randn(96, dtype=dtype)
    out, total = ops.rms_norm(x, w, 1e-5, res if with_residual else None)
    want_total = x + res if with_residual else x
    if with_residual:
        assert torch.equal(total, want_total)  # the add rounds like torch's
    else:
        assert total.data_ptr() == x.data_ptr()  # x itself, not a copy
    want = w * F.rms_norm(want_total, (96,), eps=1e-5)
    # only the fp32 sum of squares is ordered differently: at most one rounding step apart
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out, want, atol=tol * want.abs().max().item(), rtol=0)
    if dtype != torch.float32:  # rounding to 8/11 bits hides the order almost everywhere
        assert (out != want).float().mean() < 0.05


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(ops: CpuOps, dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    gate_up = torch.randn(3, 2, 2 * 40, dtype=dtype) * 4
    gate, up = gate_up.split(40, -1)
    got = ops.silu_mul(gate_up)
    assert got.shape == (3, 2, 40)
    torch.testing.assert_close(got, F.silu(gate) * up, atol=0, rtol=1e-2 if dtype != torch.float32
                               else 1e-6)


def _rope_inputs(dtype: torch.dtype, b: int = 3, heads: int = 4, kv_heads: int = 2, d: int = 16):
    torch.manual_seed(3)
    qkv = torch.randn(b, (heads + 2 * kv_heads) * d, dtype=dtype)
    positions = torch.tensor([5, 17, 0])[:b]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    cos, sin = rope_cos_sin(positions.view(b, 1), inv_freq, 1.0, dtype)  # (b, 1, 1, d)
    return qkv, positions, cos, sin


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_store_is_bit_identical_to_torch(ops: CpuOps, dtype: torch.dtype) -> None:
    """RoPE rounds at the same points as apply_rope; k and v land in their slots, and a
    padding token (slot -1) stores nothing."""
    b, h, kvh, d = 3, 4, 2, 16
    qkv, _, cos, sin = _rope_inputs(dtype)
    k_cache, v_cache = torch.zeros(8, 4, kvh, d, dtype=dtype), torch.zeros(8, 4, kvh, d,
                                                                            dtype=dtype)
    slots = torch.tensor([9, 30, -1])
    q = ops.rope_store(qkv, cos.view(b, d), sin.view(b, d), k_cache, v_cache, slots, h, kvh)
    qk = apply_rope(qkv[:, : (h + kvh) * d].view(b, 1, h + kvh, d), cos, sin)[:, 0]
    assert torch.equal(q, qk[:, :h])
    flat_k, flat_v = k_cache.view(-1, kvh, d), v_cache.view(-1, kvh, d)
    assert torch.equal(flat_k[[9, 30]], qk[:2, h:])
    assert torch.equal(flat_v[[9, 30]], qkv[:2, (h + kvh) * d :].view(2, kvh, d))
    assert int((flat_k != 0).any(-1).any(-1).sum()) == 2  # nothing else written


def _paged(dtype: torch.dtype, kv_heads: int, d: int = 16, block: int = 4):
    torch.manual_seed(4)
    k_cache = torch.randn(32, block, kv_heads, d, dtype=dtype)
    v_cache = torch.randn(32, block, kv_heads, d, dtype=dtype)
    tables = torch.tensor([[3, 7, 1, 0, 2, 4], [9, 10, 11, 12, 13, 14], [20, 0, 0, 0, 0, 0]])
    return k_cache, v_cache, tables


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_index", [[0, 0, 1, 1], [0, 1, 2, 3], [0, 0, 0, 0],
                                      [0, 0, 1, 1, 1]])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize(("rows", "threads"), [(3, None), (1, 2), (1, 3)])
def test_decode_attention_matches_the_torch_path(ops: CpuOps, dtype: torch.dtype,
                                                 kv_index: list[int], window: int | None,
                                                 rows: int, threads: int | None) -> None:
    """Same result as gathering each row's context and running `decode_attention` (GQA, MHA,
    one kv head, an irregular uneven-tp head map; with and without a sliding window), reading
    each row's blocks through its own table and stopping at its own position. A single row is
    split over the threads by kv heads (2 or 3 spans, uneven for 4 kv heads over 3)."""
    heads, kv_heads, d = len(kv_index), max(kv_index) + 1, 16
    k_cache, v_cache, tables = _paged(dtype, kv_heads, d)
    positions, tables = torch.tensor([5, 17, 0])[-rows:], tables[-rows:].contiguous()
    b, length = rows, int(positions.max()) + 1
    q = torch.randn(b, heads, d, dtype=dtype)
    idx = torch.tensor(kv_index)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        got = ops.decode_attention(q, k_cache, v_cache, tables, positions, idx, d**-0.5, window)
    finally:
        torch.set_num_threads(before)
    batch = AttentionBatch(positions=positions.view(b, 1), slot_mapping=torch.zeros(b, 1).long(),
                           block_tables=tables, last_index=torch.zeros(b).long(), kv_len=length,
                           fresh=False, sliding_window=window)
    ctx = batch.context_slots(4).flatten()
    keys = k_cache.view(-1, kv_heads, d)[ctx].view(b, length, kv_heads, d)
    values = v_cache.view(-1, kv_heads, d)[ctx].view(b, length, kv_heads, d)
    group = kv_group_size(kv_index)
    bias = batch.decode_bias(length, heads // (group or 1))
    want = decode_attention(q.view(b, 1, heads, d), keys, values, bias, idx, group, d**-0.5)
    # both sum in fp32 and round once
    atol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want.view(b, heads, d), atol=atol, rtol=0)
    # the row at position 0 sees exactly its one key: its output is that value
    first_slot = tables[-1, 0] * 4
    if rows == 3:
        assert torch.equal(got[2, 0], v_cache.view(-1, kv_heads, d)[first_slot, kv_index[0]])


def test_bad_inputs_get_errors_naming_the_problem(ops: CpuOps) -> None:
    k_cache, v_cache, tables = _paged(torch.float32, 2)
    q = torch.randn(3, 4, 16)
    idx = torch.tensor([0, 0, 1, 1])
    with pytest.raises(RuntimeError, match="position 99 outside the block table's 24 slots"):
        ops.decode_attention(q, k_cache, v_cache, tables, torch.tensor([1, 99, 0]), idx, 1.0, 0)
    bad_table = tables.clone()
    bad_table[1, 2] = 32
    with pytest.raises(RuntimeError, match="block 32 outside the cache's 32 blocks"):
        ops.decode_attention(q, k_cache, v_cache, bad_table, torch.tensor([1, 9, 0]), idx, 1.0, 0)
    with pytest.raises(RuntimeError, match="kv head 2 outside the cache's 2"):
        ops.decode_attention(q, k_cache, v_cache, tables, torch.tensor([1, 2, 0]),
                             torch.tensor([0, 0, 1, 2]), 1.0, 0)
    with pytest.raises(RuntimeError, match="one kv head per query head"):
        ops.decode_attention(q, k_cache, v_cache, tables, torch.tensor([1, 2, 0]), idx[:3], 1.0,
                             0)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)
    qkv, _, cos, sin = _rope_inputs(torch.float32)
    with pytest.raises(RuntimeError, match="qkv must be"):
        ops.rope_store(qkv[:, :-1].contiguous(), cos.view(3, 16), sin.view(3, 16), k_cache,
                       v_cache, torch.tensor([0, 1, 2]), 4, 2)
    with pytest.raises(RuntimeError, match="slot 128 outside the cache's 128 slots"):
        ops.rope_store(qkv, cos.view(3, 16), sin.view(3, 16), k_cache, v_cache,
                       torch.tensor([0, 128, 2]), 4, 2)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.silu_mul(torch.randn(4, 6).t())


def test_build_is_cached_and_a_missing_compiler_is_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The library is compiled once per source/torch/CPU key and then reused; without a
    compiler the build raises NativeBuildError (the engine then keeps the torch ops)."""
    first = build_library(tmp_path / "ext")
    mtime = first.stat().st_mtime_ns
    assert build_library(tmp_path / "ext") == first and first.stat().st_mtime_ns == mtime
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(NativeBuildError, match=r"no C\+\+ compiler \('no-such-compiler-xyz'\)"):
        build_library(tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_a_failed_compile_is_reported_and_not_retried(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that fails: the error carries its output, and later starts (other ranks,
    the next engine) get the same answer at once instead of compiling again."""
    compiler = tmp_path / "broken-cxx"
    compiler.write_text("#!/bin/sh\necho 'fatal error: the compiler broke' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    with pytest.raises(NativeBuildError, match="compiling cpu_ops.cpp failed:\n.*compiler broke"):
        build_library(tmp_path / "ext")
    compiler.write_text("#!/bin/sh\ntouch " + str(tmp_path / "ran") + "\nexit 1\n")
    with pytest.raises(NativeBuildError, match="an earlier build of cpu_ops.cpp failed"):
        build_library(tmp_path / "ext")
    assert not (tmp_path / "ran").exists()


def _bf16_run(path: Path, tp: int, pp: int, native: bool, prompts: list[list[int]],
              tokens: int):
    cfg = EngineConfig(num_blocks=64, block_size=4, native_kernels=native)
    local = start_local_engine(EngineSpec(str(path), tp, pp, "bf16", cfg))
    try:
        params = SamplingParams(max_tokens=tokens, ignore_eos=True, return_logits=True)
        results = local.engine.generate(prompts, params)
        attached = sum(getattr(m, "native", None) is not None
                       for m in local.engine.runner.model.modules())
    finally:
        local.close()
    return [r.token_ids for r in results], [torch.stack(r.logits) for r in results], attached


PROMPTS = [[3, 5, 7, 9, 11, 13, 17], [11, 12], [40, 4, 6]]


@pytest.mark.parametrize(("arch", "tp", "pp", "overrides"), [
    ("llama", 1, 1, {}), ("llama", 2, 1, {}), ("llama", 3, 1, {}), ("llama", 1, 2, {}),
    ("qwen2", 1, 1, {}), ("mistral", 1, 1, {"sliding_window": 4}),
])
def test_bf16_engine_with_kernels_matches_torch_ops(tmp_path: Path, arch: str, tp: int, pp: int,
                                                    overrides: dict) -> None:
    """Greedy tokens identical, logits within bf16 noise, kernels on vs off: GQA with llama3
    RoPE, tp 2 and an uneven tp 3 (irregular head maps), two pipeline stages (the residual
    stream completed at the stage boundary), qkv bias (qwen2), a sliding window shorter than
    the context (mistral). Decode crosses several 4-token cache blocks."""
    path = make_checkpoint(tmp_path / arch, arch, **overrides)
    ids, logits, attached = _bf16_run(path, tp, pp, True, PROMPTS, 10)
    plain_ids, plain_logits, plain_attached = _bf16_run(path, tp, pp, False, PROMPTS, 10)
    assert attached > 0 and plain_attached == 0
    assert ids == plain_ids
    assert len({tuple(t) for t in ids}) > 1 and all(len(set(t)) > 1 for t in ids)
    for got, want in zip(logits, plain_logits, strict=True):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, atol=2e-2 * max(1.0, scale), rtol=0)


def test_kernels_are_off_for_fp32(checkpoint_dir) -> None:
    """fp32 is the parity reference: it keeps the torch ops."""
    local = start_local_engine(EngineSpec(str(checkpoint_dir("llama")), 1, 1, "fp32",
                                          EngineConfig(num_blocks=16)))
    try:
        assert not any(getattr(m, "native", None) is not None
                       for m in local.engine.runner.model.modules())
    finally:
        local.close()
