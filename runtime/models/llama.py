"""Llama-family decoder (Llama, Mistral, Qwen2): GQA, RoPE, SwiGLU, RMSNorm, optional q/k/v bias.

One instance holds one pipeline stage of one tp rank; parameter names are the HF names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from parallel import ParallelContext, head_layout, split_sizes
from parallel.layers import (
    ColumnParallelLinear,
    MergedColumns,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from parallel.native import CpuOps
from runtime.models.attention import AttentionBatch, KVCache, kv_group_size, paged_attention
from runtime.models.rope import apply_rope, inv_freq_and_scale, rope_cos_sin


@dataclass
class LlamaConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    layer_windows: tuple[int | None, ...]  # per layer; None: full attention
    max_position_embeddings: int
    hf: dict[str, Any]

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
        heads = cfg["num_attention_heads"]
        qwen = cfg.get("model_type") == "qwen2"
        return cls(
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", qwen)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            layer_windows=layer_windows(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            hf=cfg,
        )


def layer_windows(cfg: dict[str, Any]) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention), as transformers applies them:
    Mistral slides on every layer; Qwen2 only with `use_sliding_window`, and only on the
    layers its `layer_types` call sliding (by default those from `max_window_layers` on);
    Llama never."""
    n, window = cfg["num_hidden_layers"], cfg.get("sliding_window")
    arch = (cfg.get("architectures") or [""])[0]
    kind = cfg.get("model_type") or {"MistralForCausalLM": "mistral",
                                     "Qwen2ForCausalLM": "qwen2"}.get(arch)
    if kind == "mistral":
        return (window,) * n
    if kind != "qwen2" or window is None or not cfg.get("use_sliding_window", False):
        return (None,) * n
    types = cfg.get("layer_types") or [
        "sliding_attention" if i >= cfg.get("max_window_layers", 28) else "full_attention"
        for i in range(n)]
    return tuple(window if t == "sliding_attention" else None for t in types)


class RMSNorm(nn.Module):
    native: CpuOps | None = None  # fused CPU kernels, see parallel.native.attach_native

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None and x.is_contiguous():
            return self.native.rms_norm(x, self.weight, self.eps)[0]
        # F.rms_norm computes in fp32 and rounds once to x's dtype: bit-identical to the
        # reference's x.float() -> normalise -> .to(dtype), in one op instead of three
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def add_norm(self, x: torch.Tensor,
                 residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual stream's add fused into the norm
        that reads it; without a residual, (norm(x), x)."""
        if residual is None:
            return self(x), x
        if self.native is not None and x.is_contiguous() and residual.is_contiguous():
            return self.native.rms_norm(x, self.weight, self.eps, residual)
        total = x + residual
        return self(total), total


class LlamaAttention(nn.Module):
    native: CpuOps | None = None  # fused CPU kernels, see parallel.native.attach_native

    def __init__(self, cfg: LlamaConfig, ctx: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__()
        hl = head_layout(cfg.num_heads, cfg.num_kv_heads, ctx.tp, ctx.tp_rank)
        self.heads, self.kv_heads, self.head_dim = hl.num_q, hl.num_kv, cfg.head_dim
        self.register_buffer("kv_index", torch.tensor(hl.kv_index), persistent=False)
        self.kv_group = kv_group_size(list(hl.kv_index))
        q_sizes = [head_layout(cfg.num_heads, cfg.num_kv_heads, ctx.tp, r).num_q * cfg.head_dim
                   for r in range(ctx.tp)]
        kv_sizes = [head_layout(cfg.num_heads, cfg.num_kv_heads, ctx.tp, r).num_kv * cfg.head_dim
                    for r in range(ctx.tp)]
        g, r, b = ctx.tp_group, ctx.tp_rank, cfg.attention_bias
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, q_sizes, r, g, bias=b, dtype=dtype)
        self.k_proj = ColumnParallelLinear(cfg.hidden_size, kv_sizes, r, g, bias=b, dtype=dtype)
        self.v_proj = ColumnParallelLinear(cfg.hidden_size, kv_sizes, r, g, bias=b, dtype=dtype)
        self.o_proj = RowParallelLinear(q_sizes[r], cfg.hidden_size, g, dtype=dtype)
        self.qkv = MergedColumns(self.q_proj, self.k_proj, self.v_proj)
        self.scale = cfg.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
        batch: AttentionBatch, cache: KVCache,
    ) -> torch.Tensor:
        b, s, _ = x.shape  # (batch, seq, hidden)
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        if self.native is not None and s == 1 and cache[0].dtype == x.dtype:
            return self._native_decode(self.native, x, cos_sin, batch, cache)
        qkv = batch.tokenwise(self.qkv.fused, x)  # (batch, seq, (heads + 2 kv_heads) * head_dim)
        # q and k side by side: one RoPE for both
        qk = apply_rope(qkv[..., : (h + kvh) * d].view(b, s, h + kvh, d), *cos_sin)
        q, k = qk.split([h, kvh], dim=2)
        v = qkv[..., (h + kvh) * d :].view(b, s, kvh, d)
        out = paged_attention(q, k, v, cache, batch, self.kv_index, self.scale,
                              self.kv_group)
        return batch.tokenwise(self.o_proj, out.reshape(b, s, self.heads * self.head_dim))

    def _native_decode(self, ops: CpuOps, x: torch.Tensor,
                       cos_sin: tuple[torch.Tensor, torch.Tensor], batch: AttentionBatch,
                       cache: KVCache) -> torch.Tensor:
        """One new token per row: qkv, then two fused kernels (RoPE + cache store; attention
        straight over the paged cache, no gathered copy of the context), then o_proj."""
        b, d = x.shape[0], self.head_dim
        qkv = self.qkv.fused(x.view(b, -1))  # (batch, (heads + 2 kv_heads) * head_dim)
        cos, sin = (t.reshape(b, d) for t in cos_sin)
        q = ops.rope_store(qkv, cos, sin, cache[0], cache[1], batch.slot_mapping.reshape(b),
                           self.heads, self.kv_heads)
        out = ops.decode_attention(q, cache[0], cache[1], batch.block_tables,
                                   batch.positions.reshape(b), self.kv_index, self.scale,
                                   batch.sliding_window)
        return self.o_proj(out.view(b, 1, self.heads * d))  # (batch, 1, hidden)


class LlamaMLP(nn.Module):
    native: CpuOps | None = None  # fused CPU kernels, see parallel.native.attach_native

    def __init__(self, cfg: LlamaConfig, ctx: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__()
        sizes = split_sizes(cfg.intermediate_size, ctx.tp)
        g, r, b = ctx.tp_group, ctx.tp_rank, cfg.mlp_bias
        self.gate_proj = ColumnParallelLinear(cfg.hidden_size, sizes, r, g, bias=b, dtype=dtype)
        self.up_proj = ColumnParallelLinear(cfg.hidden_size, sizes, r, g, bias=b, dtype=dtype)
        self.down_proj = RowParallelLinear(sizes[r], cfg.hidden_size, g, bias=b, dtype=dtype)
        self.gate_up = MergedColumns(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.down_proj(self.native.silu_mul(self.gate_up.fused(x)))
        gate, up = self.gate_up(x)  # (batch, seq, intermediate / tp) each
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, ctx: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, ctx, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(cfg, ctx, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                cos_sin: tuple[torch.Tensor, torch.Tensor], batch: AttentionBatch,
                cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output, not yet added to the residual stream (None
        before the first layer: x is the stream). Returns (this MLP's output, the stream);
        the adds are fused into the norms that read the stream."""
        h, residual = self.input_layernorm.add_norm(x, residual)
        h, residual = self.post_attention_layernorm.add_norm(
            self.self_attn(h, cos_sin, batch, cache), residual)
        return batch.tokenwise(self.mlp, h), residual


class LlamaBody(nn.Module):
    """The `model.` prefix of HF names: embedding, this stage's layers, final norm."""

    def __init__(self, cfg: LlamaConfig, ctx: ParallelContext, layers: range,
                 dtype: torch.dtype) -> None:
        super().__init__()
        if ctx.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(
                cfg.vocab_size, cfg.hidden_size, ctx.tp, ctx.tp_rank, ctx.tp_group, dtype=dtype
            )
        # keyed by global layer index so parameter names match the checkpoint's
        self.layers = nn.ModuleDict({str(i): LlamaDecoderLayer(cfg, ctx, dtype) for i in layers})
        if ctx.is_last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class LlamaForCausalLM(nn.Module):
    """One pipeline stage of a Llama-family causal LM on one tp rank."""

    config_class = LlamaConfig

    def __init__(self, cfg: LlamaConfig, ctx: ParallelContext, layers: range,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.layer_ids = list(layers)
        self.model = LlamaBody(cfg, ctx, layers, dtype)
        if ctx.is_last_stage:
            self.lm_head = ParallelLMHead(
                cfg.hidden_size, cfg.vocab_size, ctx.tp, ctx.tp_rank, ctx.tp_group, dtype=dtype
            )
        inv_freq, self.rope_scale = inv_freq_and_scale(cfg.hf, cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, tokens: torch.Tensor | None, hidden: torch.Tensor | None,
                batch: AttentionBatch, caches: dict[int, KVCache]) -> torch.Tensor:
        """tokens: (batch, seq) on the first stage, else hidden: (batch, seq, hidden_size).
        Returns this stage's output hidden states (batch, seq, hidden_size)."""
        x = self.model.embed_tokens(tokens) if tokens is not None else hidden
        cos_sin = rope_cos_sin(batch.positions, self.inv_freq, self.rope_scale, x.dtype)
        residual = None
        for i in self.layer_ids:
            # the step's masks are built once per window and shared by the layers using it
            batch.sliding_window = self.cfg.layer_windows[i]
            x, residual = self.model.layers[str(i)](x, residual, cos_sin, batch, caches[i])
        return x if residual is None else x + residual

    def compute_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """(batch, hidden_size) -> full-vocabulary logits (batch, vocab), on the last stage."""
        return self.lm_head(self.model.norm(last_hidden))
