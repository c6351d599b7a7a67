"""Linear kernels: plain `F.linear`, or oneDNN with the weight pre-packed once after loading.

On CPU, bf16 `F.linear` reorders the weight into oneDNN's blocked layout on every call; for a
decode step (a few rows of activations against every weight) that reorder costs more than the
matmul. Packing each weight once at start-up removes it: batch-1 decode reads the weights about
twice as fast, with the same results as `F.linear` (same oneDNN kernel, same accumulation).
fp32 stays on `F.linear` (oneDNN's fp32 path sums in another order, and fp32 is the parity
reference); fp16 needs CPU features (avx512_fp16 / avx_ne_convert) that are checked by packing.
"""

from __future__ import annotations

import torch


def _packing_ops_present() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def can_prepack(weight: torch.Tensor) -> bool:
    """Whether `weight` (out, in) would run faster, and identically, as a pre-packed oneDNN
    weight: a CPU bf16/fp16 matrix on a build with the oneDNN linear ops."""
    return (weight.device.type == "cpu" and weight.dim() == 2
            and weight.dtype in (torch.bfloat16, torch.float16) and _packing_ops_present())


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """The oneDNN-packed copy of `weight`, or None where this CPU or dtype cannot use one."""
    if not can_prepack(weight):
        return None
    try:
        # The batch-size hint picks the blocked layout; 1 (decode) is also fine for prefill.
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)
    except RuntimeError:  # e.g. fp16 without avx512_fp16: this CPU has no such kernel
        return None


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias, through the packed weight when there is one."""
    if packed is None:
        return torch.nn.functional.linear(x, weight, bias)
    return packed_linear(x, packed, bias)


def packed_linear(x: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for a weight packed by `prepack`; x: (..., in_features)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
