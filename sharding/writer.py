"""Streaming shard writer: one pass over a `TensorSource`, one rank file per (pp, tp) rank.

Every rank file's header is computed up front (shapes and dtypes are known before any byte is
read), then each source tensor is visited once (memory-mapped, or read into a reused buffer), cut
per rank, converted in small row chunks when needed and appended to the rank files while their
sha256 is updated. Peak memory stays near the largest source tensor. Output goes to a temporary
sibling folder renamed into place at the very end.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from sharding.manifest import Manifest, RankFile, ShardError, rank_file_name
from sharding.plan import Entry, Plan, make_plan
from sharding.sources import TOKENIZER_FILES, TensorSource
from sharding.stformat import header_bytes, nbytes, tensor_bytes

# Rows gathered at a time for column cuts / dtype conversions, and bytes hashed then written at
# a time: small enough that what was just gathered or hashed is still in the CPU cache.
CHUNK_BYTES = 1024 * 1024
IO_BYTES = 1024 * 1024
# Mapping (or reading) the next tensor while the last one is written holds two tensors in memory;
# above this size that would break the budget (1.5 x largest tensor + 500 MB), so big tensors go
# one by one.
PREFETCH_MAX_BYTES = 256 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """CLI/manifest dtype name -> torch dtype (None keeps the source's dtypes)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use fp32, bf16 or fp16")
    return DTYPES[name]


@dataclass
class Summary:
    """What one shard run did."""

    out: Path
    tensors: int
    bytes: int
    seconds: float
    plan: Plan = field(repr=False)

    def line(self) -> str:
        rate = self.bytes / max(self.seconds, 1e-9) / 1e9
        layers = ",".join(map(str, self.plan.rules.stage_layers))
        return (f"sharded {self.tensors} tensors, {self.bytes / 1e9:.3f} GB in "
                f"{self.seconds:.2f} s ({rate:.2f} GB/s) -> {self.out} "
                f"(tp={self.plan.rules.tp}, pp={self.plan.rules.pp}, stage layers {layers})")


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total: int, enabled: bool | None = None) -> None:
        self.total, self.done, self.start, self.last = max(total, 1), 0, time.time(), 0.0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def update(self, n: int) -> None:
        self.done += n
        now = time.time()
        if self.enabled and (now - self.last > 0.2 or self.done >= self.total):
            self.last = now
            frac = min(self.done / self.total, 1.0)
            rate = self.done / max(now - self.start, 1e-9) / 1e9
            bar = "#" * int(frac * 30)
            gb = self.done / 1e9
            sys.stderr.write(f"\r[{bar:<30}] {frac:6.1%} {gb:7.2f} GB {rate:5.2f} GB/s")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


class RankWriter:
    """Appends the planned tensors of one rank, in order, to its file and hashes the bytes.

    Same-dtype whole tensors and row (dim-0) slices are hashed and written straight from the
    source tensor's memory (a memory map of the source file: no copy in user space); column
    cuts and dtype conversions are gathered row chunk by row chunk into one reused buffer."""

    def __init__(self, path: Path, pp_rank: int, tp_rank: int, entries: list[Entry]) -> None:
        import hashlib

        meta = {"format": "pt", "shardserve": json.dumps({"pp_rank": pp_rank, "tp_rank": tp_rank})}
        meta.update({e.name: e.meta_json() for e in entries})
        header, offsets = header_bytes([(e.name, e.dtype, e.shape) for e in entries], meta)
        self.path, self.pp_rank, self.tp_rank = path, pp_rank, tp_rank
        self.entries = entries
        self.expected = len(header) + (offsets[-1][1] if offsets else 0)
        self.hash = hashlib.sha256()
        self.file: BinaryIO = open(path, "wb", buffering=0)
        self.staging = torch.empty(0, dtype=torch.uint8)
        self.written = 0
        self._emit(memoryview(header))
        self.next = 0

    def _emit(self, data: memoryview) -> None:
        """Hash and append `data`, a piece at a time (hashlib and write release the GIL, so the
        rank threads run on all cores; the piece just hashed is still in cache for the write)."""
        for off in range(0, len(data), IO_BYTES):
            piece = data[off: off + IO_BYTES]
            self.hash.update(piece)
            while piece:
                n = self.file.write(piece)
                if not n:
                    raise OSError(f"{self.path}: write made no progress")
                piece = piece[n:]
        self.written += len(data)

    def write_tensor(self, entry: Entry, full: torch.Tensor) -> int:
        """Append `entry`'s slice of `full` (contiguous); returns the payload bytes written."""
        if self.entries[self.next] is not entry:
            raise RuntimeError(f"{self.path}: tensors out of order at {entry.name}")
        self.next += 1
        before = self.written
        if full.dtype == entry.dtype and (entry.cut.dim in (None, 0) or full.dim() == 0):
            flat = tensor_bytes(full.contiguous())
            if entry.cut.dim is None or full.dim() == 0:
                self._emit(flat)
            else:
                row = len(flat) // max(full.shape[0], 1)
                for a, b in entry.cut.pieces:
                    self._emit(flat[a * row: b * row])
        else:
            for chunk in cut_chunks(full, entry, self._staging):
                self._emit(tensor_bytes(chunk))
        return self.written - before

    def _staging(self, nbytes: int) -> torch.Tensor:
        if self.staging.numel() < nbytes:
            self.staging = torch.empty(nbytes, dtype=torch.uint8)
        return self.staging[:nbytes]

    def close(self) -> RankFile:
        self.file.close()
        if self.written != self.expected or self.next != len(self.entries):
            raise RuntimeError(f"{self.path}: wrote {self.written} bytes, planned {self.expected}")
        return RankFile(self.pp_rank, self.tp_rank, self.path.name, self.written,
                        self.hash.hexdigest(), len(self.entries))


def cut_chunks(full: torch.Tensor, entry: Entry,
               buffer: Callable[[int], torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """`cut_tensor(full, entry.cut).to(entry.dtype)` as contiguous row chunks of bounded size,
    so neither the cut nor the dtype conversion ever copies a whole large tensor. Each chunk is
    gathered into `buffer(nbytes)` (reused: a chunk is valid until the next one is made)."""
    cut = entry.cut
    get = buffer or (lambda n: torch.empty(n, dtype=torch.uint8))
    if full.dim() == 0:
        full = full.reshape(1)
    blocks = [full.narrow(0, a, b - a) for a, b in cut.pieces] if cut.dim == 0 else [full]
    row_elems = max(1, full[0].numel() if full.shape[0] else 1)
    step = max(1, CHUNK_BYTES // (row_elems * max(full.element_size(), entry.dtype.itemsize)))
    for block in blocks:
        for r in range(0, block.shape[0], step):
            part = block.narrow(0, r, min(step, block.shape[0] - r))
            shape = list(part.shape)
            if cut.dim is not None and cut.dim > 0:
                shape[cut.dim] = sum(b - a for a, b in cut.pieces)
            out = get(nbytes(shape, entry.dtype)).view(entry.dtype).reshape(shape)
            if cut.dim is not None and cut.dim > 0:
                at = 0
                for a, b in cut.pieces:
                    out.narrow(cut.dim, at, b - a).copy_(part.narrow(cut.dim, a, b - a))
                    at += b - a
            else:
                out.copy_(part)
            yield out


def _check_out(out: Path, source_path: Path, force: bool) -> None:
    src, dst = source_path.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise ShardError(f"{out}: output folder would overwrite the source {source_path}")
    if out.exists() and not force:
        raise ShardError(f"{out}: already exists (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise ShardError(f"{out}: exists and is not a folder")


def _copy_side_files(src: Path, dst: Path) -> None:
    shutil.copyfile(src / "config.json", dst / "config.json")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _drain(futures: list[Future[int]], progress: Progress) -> None:
    for fut in futures:
        progress.update(fut.result())


def _stream(source: TensorSource, plan: Plan, tmp: Path, progress: Progress) -> list[RankFile]:
    """Get each tensor once (mapped, or read into one of two reused buffers, one when tensors are
    big; buffers a mapping source never touches cost no memory) while per-rank threads cut,
    convert, hash and write the previous one; a rank's tensors are written in plan order."""
    tp = plan.rules.tp
    writers = [RankWriter(tmp / rank_file_name(p, t), p, t, plan.ranks[p * tp + t])
               for p in range(plan.rules.pp) for t in range(tp)]
    pools = [ThreadPoolExecutor(1, thread_name_prefix=f"shard-rank{r}")
             for r in range(len(writers))]
    count = 2 if plan.largest_source_bytes <= PREFETCH_MAX_BYTES else 1
    buffers = [torch.empty(plan.largest_source_bytes, dtype=torch.uint8) for _ in range(count)]
    inflight: deque[list[Future[int]]] = deque()
    try:
        for i, (name, holders) in enumerate(plan.holders.items()):
            if len(inflight) == len(buffers):
                _drain(inflight.popleft(), progress)  # frees the buffer read into next
            full = source.read_into(name, buffers[i % len(buffers)])
            inflight.append([pools[rank].submit(writers[rank].write_tensor, entry, full)
                             for rank, entry in holders])
        while inflight:
            _drain(inflight.popleft(), progress)
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        for w in writers:
            w.file.close()
    return [w.close() for w in writers]


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def write_shards(source: TensorSource, out: str | Path, tp: int, pp: int,
                 stage_layers: list[int] | None = None, dtype: torch.dtype | None = None,
                 force: bool = False, progress: bool | None = None) -> Summary:
    """Shard `source` for a tp x pp layout into folder `out` (atomically); see docs/sharding.md."""
    out = Path(out)
    _check_out(out, source.path, force)
    plan = make_plan(source, tp, pp, stage_layers, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    start = time.time()
    try:
        bar = Progress(plan.total_bytes, progress)
        files = _stream(source, plan, tmp, bar)
        bar.finish()
        _copy_side_files(source.path, tmp)
        manifest = Manifest(plan.architecture, tp=plan.rules.tp, pp=plan.rules.pp,
                            stage_layers=plan.rules.stage_layers, dtype=plan.dtype, files=files,
                            tensors=plan.tensors, source=source.identity(), ignored=plan.ignored)
        manifest.save(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(f.bytes for f in files)
    return Summary(out, len(plan.tensors), total, time.time() - start, plan)

