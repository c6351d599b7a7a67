"""Rotary position embeddings, including the `rope_scaling` variants of Llama-family configs."""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """The rope settings of an HF config, old (`rope_theta` + `rope_scaling`) or new style."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _llama3(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def inv_freq_and_scale(cfg: dict[str, Any], head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim / 2,) and the attention scaling factor for an HF config.

    default, linear and llama3 are computed here; other types (yarn, longrope, dynamic) use
    transformers' own initialisers so they match the reference exactly.
    """
    p = rope_parameters(cfg)
    kind = p["rope_type"]
    base = float(p["rope_theta"])
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / p["factor"], 1.0
    if kind == "llama3":
        return _llama3(inv, p), 1.0
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope type {kind!r}")
    hf_cfg = AutoConfig.for_model(**cfg)
    inv, scale = ROPE_INIT_FUNCTIONS[kind](hf_cfg, torch.device("cpu"))
    return inv.float(), float(scale)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of shape (batch, seq, 1, head_dim), computed in fp32 like the
    reference. The sin's first half is negated so that `apply_rope` rotates with one roll."""
    freqs = positions.float().unsqueeze(-1) * inv_freq  # (batch, seq, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)
    sin = emb.sin() * scale
    sin[..., : freqs.shape[-1]].neg_()
    return (emb.cos() * scale).to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim). The reference's x * cos + rotate_half(x) * sin, with
    rotate_half(x) * sin == roll(x, half) * signed_sin exactly (negation is exact)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin
