"""Fast paths against their plain references: pre-packed oneDNN linears (single and merged),
grouped decode attention, and a bf16 engine with packing on vs off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from launcher.local import start_local_engine
from parallel.kernels import can_prepack, packed_linear, prepack
from parallel.layers import ColumnParallelLinear, MergedColumns, RowParallelLinear, prepack_linears
from runtime.models.attention import decode_attention, kv_group_size
from runtime.types import EngineConfig, SamplingParams
from runtime.worker import EngineSpec

BF16_PACKS = can_prepack(torch.empty(2, 2, dtype=torch.bfloat16))
needs_packing = pytest.mark.skipif(not BF16_PACKS, reason="no oneDNN bf16 linear on this CPU")


@needs_packing
@pytest.mark.parametrize("shape", [(1, 96), (5, 96), (2, 3, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(shape: tuple[int, ...], bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 96, generator=g).bfloat16()
    b = torch.randn(40, generator=g).bfloat16() if bias else None
    x = torch.randn(*shape, generator=g).bfloat16()
    packed = prepack(w)
    assert packed is not None
    assert torch.equal(packed_linear(x, packed, b), F.linear(x, w, b))


def test_fp32_is_never_packed() -> None:
    """fp32 is the parity reference: it stays on F.linear."""
    assert prepack(torch.randn(8, 8)) is None


def _column(out: int, seed: int, bias: bool) -> ColumnParallelLinear:
    layer = ColumnParallelLinear(64, [out], 0, None, bias=bias, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out, 64, generator=g))
        if bias:
            layer.bias.copy_(torch.randn(out, generator=g))
    return layer


@needs_packing
@pytest.mark.parametrize("bias", [False, True])
def test_merged_columns_match_their_parts_and_release_weights(bias: bool) -> None:
    model = torch.nn.Module()
    model.q, model.k, model.v = _column(48, 1, bias), _column(16, 2, bias), _column(16, 3, bias)
    model.o = RowParallelLinear(48, 64, None, dtype=torch.bfloat16)
    model.qkv = MergedColumns(model.q, model.k, model.v)
    x = torch.randn(3, 2, 64).bfloat16()
    expected = model.qkv(x)  # unfused: each part's own F.linear
    assert len(prepack_linears(model)) == 2  # q/k/v as one matrix, plus o
    got = model.qkv(x)
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape
        assert torch.equal(g, e)
    assert all(p.weight.numel() == 0 for p in (model.q, model.k, model.v, model.o))
    assert prepack_linears(model) == []  # idempotent


def _sdpa_reference(q, keys, values, mask, kv_index, scale):
    k = keys.index_select(2, kv_index).transpose(1, 2)
    v = values.index_select(2, kv_index).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("kv_index", [[0, 0, 1, 1, 2, 2], [0, 1, 2, 3], [0, 0, 1, 1, 1], [0]],
                         ids=["gqa3", "mha", "irregular", "single"])
def test_decode_attention_matches_sdpa(kv_index: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    batch, kv_len, d = 3, 11, 8
    kvh = max(kv_index) + 1
    q = torch.randn(batch, 1, len(kv_index), d, generator=g)
    keys = torch.randn(batch, kv_len, kvh, d, generator=g)
    values = torch.randn(batch, kv_len, kvh, d, generator=g)
    lengths = torch.tensor([11, 4, 7])  # rows shorter than kv_len see only their own context
    mask = (torch.arange(kv_len) < lengths[:, None]).view(batch, 1, 1, kv_len)
    idx = torch.tensor(kv_index)
    group = kv_group_size(kv_index)
    kvh_used = kvh if group is not None else len(kv_index)
    bias = torch.zeros(batch, 1, 1, kv_len).masked_fill(~mask, float("-inf"))
    bias = bias.expand(batch, kvh_used, 1, kv_len).reshape(-1, 1, kv_len)
    got = decode_attention(q, keys, values, bias, idx, group, d**-0.5)
    want = _sdpa_reference(q, keys, values, mask, idx, d**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (kv_group_size(kv_index) is None) == (kv_index == [0, 0, 1, 1, 1])


def _bf16_run(path, tp: int, prepack_weights: bool):
    cfg = EngineConfig(num_blocks=64, prepack_weights=prepack_weights)
    local = start_local_engine(EngineSpec(str(path), tp, 1, "bf16", cfg))
    try:
        params = SamplingParams(max_tokens=8, ignore_eos=True, return_logits=True)
        results = local.engine.generate([[3, 5, 7, 9, 11], [11, 12], [40, 4, 6]], params)
        packed = sum(getattr(m, "packed", None) is not None
                     for m in local.engine.runner.model.modules())
    finally:
        local.close()
    return [r.token_ids for r in results], [torch.stack(r.logits) for r in results], packed


@needs_packing
@pytest.mark.parametrize(("arch", "tp"), [("llama", 1), ("llama", 2), ("qwen2", 1), ("gpt2", 1)])
def test_bf16_engine_with_packed_weights_matches_unpacked(checkpoint_dir, arch: str,
                                                          tp: int) -> None:
    path = checkpoint_dir(arch)
    ids, logits, packed = _bf16_run(path, tp, True)
    plain_ids, plain_logits, plain_packed = _bf16_run(path, tp, False)
    assert packed > 0 and plain_packed == 0
    assert ids == plain_ids
    for got, want in zip(logits, plain_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=0)


@pytest.mark.parametrize("key", ["prepack_weights", "native_kernels"])
@pytest.mark.parametrize(("text", "expected"), [("", True), ("false", False), ("TRUE", True),
                                                ("0", False), ("maybe", None)])
def test_engine_switches_in_a_model_config(tmp_path, key: str, text: str,
                                           expected: bool | None) -> None:
    """`parameters { key: "prepack_weights" ... }` (and `native_kernels`) in config.pbtxt reach
    the engine config; anything but true/false is refused naming the model and the parameter."""
    from tritonclient.grpc import model_config_pb2 as mc

    from serving.backends.llm import LLMSettings
    from serving.config import set_param
    from serving.types import ServingError

    (tmp_path / "config.json").write_text("{}")
    config = mc.ModelConfig(name="giant")
    if text:
        set_param(config, key, text)
    if expected is None:
        with pytest.raises(ServingError, match=f"'giant': parameter '{key}' must be"):
            LLMSettings.from_config(config, tmp_path)
    else:
        assert getattr(LLMSettings.from_config(config, tmp_path).engine, key) is expected


def test_tokenwise_maps_only_real_tokens() -> None:
    """A padded prefill batch runs its per-token matmuls on real tokens only."""
    from runtime.models.attention import AttentionBatch

    slots = torch.tensor([[0, 1, 2], [8, -1, -1]])  # row 1 has one real token, two padding
    batch = AttentionBatch(positions=torch.tensor([[0, 1, 2], [0, 0, 0]]), slot_mapping=slots,
                           block_tables=torch.tensor([[0], [2]]), last_index=torch.tensor([2, 0]),
                           kv_len=3, fresh=True)
    x = torch.randn(2, 3, 4)
    seen: list[int] = []
    w = torch.randn(5, 4)

    def fn(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.shape[0])
        return t @ w.T

    y = batch.tokenwise(fn, x)
    assert seen == [4] and y.shape == (2, 3, 5)
    torch.testing.assert_close(y[0], x[0] @ w.T)
    torch.testing.assert_close(y[1, 0], x[1, 0] @ w.T)
    assert not y[1, 1:].any()


def test_huge_page_span_stays_inside_the_mapping() -> None:
    from parallel.kernels import HUGE_PAGE as H
    from parallel.kernels import huge_page_span

    spans = [(0x1000, 3 * H + 0x5000), (10 * H, 14 * H)]
    # the first huge page would start before the mapping (at 0): the span starts at H
    assert huge_page_span(0x2000, 2 * H, spans) == (H, 3 * H)
    assert huge_page_span(10 * H + 64, 3 * H, spans) == (10 * H, 14 * H)
    assert huge_page_span(0x2000, 0x1000, spans) is None  # no whole huge page inside
    assert huge_page_span(5 * H, H, spans) is None  # not mapped


@needs_packing
def test_packed_weights_move_to_huge_pages_unchanged() -> None:
    """Collapsing packed weights onto 2 MiB pages changes where they live, not what they give."""
    from pathlib import Path

    from parallel.kernels import move_to_huge_pages

    torch.manual_seed(5)
    w = torch.randn(4096, 1024, dtype=torch.bfloat16)  # 8 MiB: several whole huge pages
    packed, x = prepack(w), torch.randn(3, 1024, dtype=torch.bfloat16)
    before = packed_linear(x, packed)
    covered = move_to_huge_pages([packed])
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert covered >= 6 * 2**20
    assert torch.equal(packed_linear(x, packed), before)
    assert torch.equal(before, F.linear(x, w))
