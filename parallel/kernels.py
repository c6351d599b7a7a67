"""Linear kernels: plain `F.linear`, or oneDNN with the weight pre-packed once after loading.

On CPU, bf16 `F.linear` reorders the weight into oneDNN's blocked layout on every call; for a
decode step (a few rows of activations against every weight) that reorder costs more than the
matmul. Packing each weight once at start-up removes it: batch-1 decode reads the weights about
twice as fast, with the same results as `F.linear` (same oneDNN kernel, same accumulation).
fp32 stays on `F.linear` (oneDNN's fp32 path sums in another order, and fp32 is the parity
reference); fp16 needs CPU features (avx512_fp16 / avx_ne_convert) that are checked by packing.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

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


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25  # Linux; MADV_COLLAPSE since 6.1


def _mappings() -> list[tuple[int, int]]:
    """This process's virtual memory areas (start, end)."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        lo, hi = line.split(" ", 1)[0].split("-")
        spans.append((int(lo, 16), int(hi, 16)))
    return spans


def huge_page_span(ptr: int, nbytes: int, spans: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The 2 MiB-aligned range that covers [ptr, ptr + nbytes) as far as the mapping holding
    it allows (a huge page may also hold the allocator's header next to the data), or None."""
    for lo, hi in spans:
        if lo <= ptr < hi:
            start = ptr // HUGE_PAGE * HUGE_PAGE
            if start < lo:
                start += HUGE_PAGE
            end = -(-(ptr + nbytes) // HUGE_PAGE) * HUGE_PAGE
            if end > hi:
                end -= HUGE_PAGE
            return (start, end) if end > start else None
    return None


def move_to_huge_pages(packed: list[torch.Tensor]) -> int:
    """Back packed weights with transparent huge pages (madvise HUGEPAGE + COLLAPSE); returns
    the bytes now on huge pages. A decode step streams every weight once: with 4 KiB pages
    that is a TLB miss every 4 KiB, and the same GEMVs run ~10% faster on 2 MiB pages. Best
    effort: 0 where the kernel cannot (THP off, kernel before 6.1, not Linux)."""
    if not packed or not Path("/proc/self/maps").exists():
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    spans, covered = _mappings(), 0
    for t in packed:
        if not t.is_mkldnn:
            continue
        span = huge_page_span(torch.ops.mkldnn.data_ptr(t), torch.ops.mkldnn._nbytes(t), spans)
        if span is None:
            continue
        start, end = span
        if (libc.madvise(start, end - start, _MADV_HUGEPAGE) == 0
                and libc.madvise(start, end - start, _MADV_COLLAPSE) == 0):
            covered += end - start
    return covered
