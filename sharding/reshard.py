"""Reshard: turn one shard folder into another layout without the original checkpoint.

`ShardSource` makes a shard folder look like a full checkpoint (`TensorSource`): each tensor is
re-assembled from the tp ranks of one stage that holds it, on demand and one at a time, and fed
to the same streaming writer that shards HF checkpoints.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, BinaryIO

import torch

from sharding.checkpoint import cut_tensor
from sharding.manifest import MANIFEST, ShardError
from sharding.plan import covers, parse_cut_meta
from sharding.rules import Cut
from sharding.shards import ShardFolder
from sharding.stformat import (
    ST_DTYPES,
    FormatError,
    TensorInfo,
    nbytes,
    read_header,
    read_tensor,
)
from sharding.writer import Summary, write_shards

_BY_NAME = {str(v).removeprefix("torch."): v for v in ST_DTYPES.values()}


def load_rank_tables(folder: ShardFolder) -> dict[int, dict[str, tuple[TensorInfo, Cut]]]:
    """Per global rank: tensor name -> (where its bytes are, its stored cut)."""
    tables: dict[int, dict[str, tuple[TensorInfo, Cut]]] = {}
    for rf in folder.manifest.files:
        path = folder.path / rf.file
        try:
            infos, meta = read_header(path)
            tables[rf.pp_rank * folder.tp + rf.tp_rank] = {
                n: (info, parse_cut_meta(meta[n])[0]) for n, info in infos.items()}
        except FormatError as e:
            raise ShardError(str(e)) from e
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(f"{path}: missing or malformed shard metadata ({e!r})") from e
    return tables


class ShardSource:
    """A shard folder as a `TensorSource` (full tensors re-assembled from the rank files)."""

    def __init__(self, path: str | Path, verify_checksum: bool = True) -> None:
        self.folder = ShardFolder(path)
        self.path = self.folder.path
        self.config = self.folder.config
        if verify_checksum:
            for rf in self.folder.manifest.files:
                self.folder.check_file(rf.pp_rank, rf.tp_rank)
        self.tables = load_rank_tables(self.folder)
        self._handles: dict[int, BinaryIO] = {}
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def names(self) -> list[str]:
        return list(self.folder.manifest.tensors)

    def _entry(self, name: str) -> dict[str, Any]:
        return self.folder.manifest.tensors[name]

    def shape(self, name: str) -> list[int]:
        return list(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _BY_NAME[self._entry(name)["dtype"]]

    def file(self, rank: int) -> BinaryIO:
        if rank not in self._handles:
            rf = self.folder.manifest.files[rank]
            self._handles[rank] = open(self.folder.path / rf.file, "rb")
        return self._handles[rank]

    def read(self, name: str, cut: Cut | None = None) -> torch.Tensor:
        """The full tensor `name` re-assembled from its first stage's tp ranks (then cut)."""
        buf = torch.empty(nbytes(self.shape(name), self.dtype(name)), dtype=torch.uint8)
        full = self.read_into(name, buf)
        return cut_tensor(full, cut) if cut is not None else full

    def read_into(self, name: str, buf: torch.Tensor) -> torch.Tensor:
        """Re-assemble `name` into uint8 buffer `buf` (see TensorSource); row cuts are read
        straight into place, column cuts through a reused scratch buffer. Not thread-safe."""
        stage = self._entry(name)["stages"][0]
        shape, dtype = self.shape(name), self.dtype(name)
        flat = buf[: nbytes(shape, dtype)]
        full = flat.view(dtype).reshape(shape)
        row_bytes = nbytes(shape[1:], dtype)
        seen: list[tuple[int, int]] = []
        for rank in range(stage * self.folder.tp, (stage + 1) * self.folder.tp):
            if name not in self.tables[rank]:
                raise ShardError(f"{self.folder.path / self.folder.manifest.files[rank].file}: "
                                 f"lacks tensor {name}")
            info, stored = self.tables[rank][name]
            if stored.dim is None:
                return read_tensor(self.file(rank), info, buf=buf)
            if stored.pieces == ((0, shape[stored.dim]),):  # one rank holds all of it
                return read_tensor(self.file(rank), info, buf=buf)
            offset = 0
            if stored.dim == 0:
                for a, b in stored.pieces:
                    read_tensor(self.file(rank), info, offset, offset + b - a,
                                buf=flat[a * row_bytes: b * row_bytes])
                    offset += b - a
            else:
                part = read_tensor(self.file(rank), info, buf=self._scratch_for(info))
                for a, b in stored.pieces:
                    full.narrow(stored.dim, a, b - a).copy_(part.narrow(stored.dim, offset, b - a))
                    offset += b - a
            seen += stored.pieces
        if not covers(seen, shape[stored.dim]):
            raise ShardError(f"{self.path}: the ranks of stage {stage} do not cover {name}")
        return full

    def _scratch_for(self, info: TensorInfo) -> torch.Tensor:
        size = info.stop - info.start
        if self._scratch.numel() < size:
            self._scratch = torch.empty(size, dtype=torch.uint8)
        return self._scratch

    def identity(self) -> dict[str, Any]:
        m = self.folder.manifest
        digest = hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()
        return {"kind": "shards", "path": str(self.path.resolve()), "manifest_sha256": digest,
                "layout": {"tp": m.tp, "pp": m.pp, "stage_layers": m.stage_layers},
                "origin": m.source}

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()


def reshard(old: str | Path, new: str | Path, tp: int, pp: int,
            stage_layers: list[int] | None = None, dtype: torch.dtype | None = None,
            force: bool = False, progress: bool | None = None) -> Summary:
    """Write shard folder `new` with a tp x pp layout from shard folder `old` alone."""
    source = ShardSource(old)
    try:
        return write_shards(source, new, tp, pp, stage_layers, dtype, force, progress)
    finally:
        source.close()
