"""GPT-2: learned positions, LayerNorm, fused q/k/v, GELU (tanh) MLP, tied LM head.

Conv1D weights are held as ordinary (out, in) linear weights; the loader transposes them.
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
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from runtime.models.attention import AttentionBatch, KVCache, paged_attention

_ACTS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


@dataclass
class GPT2Config:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    layer_norm_eps: float
    activation: str
    hf: dict[str, Any]

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> GPT2Config:
        act = cfg.get("activation_function", "gelu_new")
        if act not in _ACTS:
            raise ValueError(f"unsupported GPT-2 activation {act!r}; supported: {sorted(_ACTS)}")
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
            raise ValueError("GPT-2 variants with per-layer attention scaling are not supported")
        return cls(
            hidden_size=cfg["n_embd"], num_layers=cfg["n_layer"], num_heads=cfg["n_head"],
            intermediate_size=cfg.get("n_inner") or 4 * cfg["n_embd"],
            vocab_size=cfg["vocab_size"], max_positions=cfg["n_positions"],
            layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-5), activation=act, hf=cfg,
        )


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, ctx: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.head_dim = cfg.hidden_size // cfg.num_heads
        layouts = [head_layout(cfg.num_heads, cfg.num_heads, ctx.tp, r) for r in range(ctx.tp)]
        self.heads = layouts[ctx.tp_rank].num_q
        self.register_buffer("kv_index", torch.arange(self.heads), persistent=False)
        self.kv_group: int | None = 1
        qkv_sizes = [3 * hl.num_q * self.head_dim for hl in layouts]
        g, r = ctx.tp_group, ctx.tp_rank
        self.c_attn = ColumnParallelLinear(cfg.hidden_size, qkv_sizes, r, g, bias=True,
                                           dtype=dtype)
        self.c_proj = RowParallelLinear(self.heads * self.head_dim, cfg.hidden_size, g,
                                        bias=True, dtype=dtype)
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, batch: AttentionBatch, cache: KVCache) -> torch.Tensor:
        b, s, _ = x.shape  # (batch, seq, hidden)
        qkv = batch.tokenwise(self.c_attn, x)  # (batch, seq, 3 * heads * head_dim)
        q, k, v = qkv.view(b, s, 3, self.heads, self.head_dim).unbind(2)
        out = paged_attention(q, k, v, cache, batch, self.kv_index, self.scale,
                              self.kv_group)
        return batch.tokenwise(self.c_proj, out.reshape(b, s, self.heads * self.head_dim))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config, ctx: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__()
        sizes = split_sizes(cfg.intermediate_size, ctx.tp)
        g, r = ctx.tp_group, ctx.tp_rank
        self.c_fc = ColumnParallelLinear(cfg.hidden_size, sizes, r, g, bias=True, dtype=dtype)
        self.c_proj = RowParallelLinear(sizes[r], cfg.hidden_size, g, bias=True, dtype=dtype)
        self.act = _ACTS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config, ctx: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.attn = GPT2Attention(cfg, ctx, dtype)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.mlp = GPT2MLP(cfg, ctx, dtype)

    def forward(self, x: torch.Tensor, batch: AttentionBatch, cache: KVCache) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), batch, cache)
        return x + batch.tokenwise(self.mlp, self.ln_2(x))


class GPT2Body(nn.Module):
    """The `transformer.` prefix of HF names."""

    def __init__(self, cfg: GPT2Config, ctx: ParallelContext, layers: range,
                 dtype: torch.dtype) -> None:
        super().__init__()
        if ctx.is_first_stage:
            self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx.tp,
                                              ctx.tp_rank, ctx.tp_group, dtype=dtype)
            self.wpe = nn.Embedding(cfg.max_positions, cfg.hidden_size, dtype=dtype)
        self.h = nn.ModuleDict({str(i): GPT2Block(cfg, ctx, dtype) for i in layers})
        if ctx.is_last_stage:
            self.ln_f = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)


class GPT2LMHeadModel(nn.Module):
    """One pipeline stage of GPT-2 on one tp rank."""

    config_class = GPT2Config

    def __init__(self, cfg: GPT2Config, ctx: ParallelContext, layers: range,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.layer_ids = list(layers)
        self.transformer = GPT2Body(cfg, ctx, layers, dtype)
        if ctx.is_last_stage:
            self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, ctx.tp, ctx.tp_rank,
                                          ctx.tp_group, dtype=dtype)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, tokens: torch.Tensor | None, hidden: torch.Tensor | None,
                batch: AttentionBatch, caches: dict[int, KVCache]) -> torch.Tensor:
        """tokens: (batch, seq) on the first stage, else hidden: (batch, seq, hidden_size)."""
        if tokens is not None:
            x = self.transformer.wte(tokens) + self.transformer.wpe(batch.positions)
        else:
            x = hidden
        for i in self.layer_ids:
            x = self.transformer.h[str(i)](x, batch, caches[i])
        return x

    def compute_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """(batch, hidden_size) -> (batch, vocab) on the last stage."""
        return self.lm_head(self.transformer.ln_f(last_hidden))
