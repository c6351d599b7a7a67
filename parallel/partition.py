"""How a dimension is split over ranks. Splits need not be even: the first `n % parts` ranks
get one extra unit, so any tp up to the number of units works."""

from __future__ import annotations

from dataclasses import dataclass


def split_sizes(n: int, parts: int) -> list[int]:
    """Balanced sizes of `n` units over `parts` ranks (larger pieces first)."""
    if parts < 1:
        raise ValueError(f"cannot split over {parts} parts")
    if n < parts:
        raise ValueError(f"cannot split {n} units over {parts} ranks")
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of piece `index` of `split_sizes(n, parts)`."""
    sizes = split_sizes(n, parts)
    start = sum(sizes[:index])
    return start, start + sizes[index]


@dataclass(frozen=True)
class HeadLayout:
    """Which attention heads one tp rank owns.

    Query heads are split as evenly as possible. A rank keeps every kv head that one of its query
    heads reads, so when tp exceeds the kv heads (or splits are uneven) a kv head is replicated on
    each rank that needs it. `kv_index` maps each local query head to its local kv head.
    """

    q_start: int
    q_stop: int
    kv_start: int
    kv_stop: int
    kv_index: tuple[int, ...]

    @property
    def num_q(self) -> int:
        return self.q_stop - self.q_start

    @property
    def num_kv(self) -> int:
        return self.kv_stop - self.kv_start


def head_layout(num_heads: int, num_kv_heads: int, tp: int, tp_rank: int) -> HeadLayout:
    """Head ownership of `tp_rank` for GQA/MHA attention with `num_heads` query heads."""
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if tp > num_heads:
        raise ValueError(f"tp={tp} exceeds the {num_heads} attention heads")
    group = num_heads // num_kv_heads
    q_start, q_stop = split_range(num_heads, tp, tp_rank)
    kv_start = q_start // group
    kv_stop = (q_stop - 1) // group + 1
    kv_index = tuple(h // group - kv_start for h in range(q_start, q_stop))
    return HeadLayout(q_start, q_stop, kv_start, kv_stop, kv_index)
