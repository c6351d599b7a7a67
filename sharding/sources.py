"""Tensor sources the shard writer streams from: the `TensorSource` protocol and its HF
checkpoint implementation (the shard-folder one lives in `sharding.reshard`).

A source hands out one full tensor at a time, so the writer's memory stays near the largest
tensor whatever the checkpoint size.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch

from sharding.checkpoint import CheckpointError, HFCheckpoint, cut_tensor
from sharding.rules import Cut
from sharding.stformat import FormatError, TensorInfo, read_header, read_tensor

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "generation_config.json",
    "chat_template.jinja", "chat_template.json",
)


class TensorSource(Protocol):
    """What the writer needs from a checkpoint: names, shapes, dtypes and (cut) reads.

    `read_into(name, buf)` returns the full tensor, contiguous: either a view of the front of
    the uint8 buffer `buf` (large enough for it), so a streaming reader can reuse a few buffers
    instead of allocating (and page-faulting) fresh memory for every tensor, or a view of a
    private memory map of just that tensor's bytes, unmapped when the tensor is freed (then `buf`
    is never touched, so it costs no resident memory).
    """

    path: Path
    config: dict[str, Any]

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> list[int]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def read(self, name: str, cut: Cut | None = None) -> torch.Tensor: ...
    def read_into(self, name: str, buf: torch.Tensor) -> torch.Tensor: ...
    def identity(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


class HFSource:
    """An HF checkpoint directory as a `TensorSource`.

    Safetensors files are read with plain file reads (no memory map, so touched pages never
    pile up as resident memory); `.bin` files go through `HFCheckpoint` (torch.load, mmap).
    """

    def __init__(self, path: str | Path) -> None:
        self._ckpt = HFCheckpoint(path)
        self.path = self._ckpt.path
        self.config = self._ckpt.config
        self._info: dict[str, tuple[Path, TensorInfo]] = {}
        self._handles: dict[Path, BinaryIO] = {}
        for f in self._ckpt.files():
            if f.suffix != ".safetensors":
                continue
            try:
                table, _ = read_header(f)
            except FormatError as e:
                raise CheckpointError(str(e)) from e
            for name in self._ckpt.names():
                if self._ckpt.file_of(name) == f:
                    if name not in table:
                        raise CheckpointError(f"{f}: lacks tensor {name} named by the index")
                    self._info[name] = (f, table[name])
        known = self._ckpt.names()
        self._order = sorted(known, key=lambda n: (str(self._ckpt.file_of(n)), self._start(n)))

    def _start(self, name: str) -> int:
        return self._info[name][1].start if name in self._info else 0

    def names(self) -> list[str]:
        """Tensor names in file order (so reads go through each file front to back)."""
        return list(self._order)

    def shape(self, name: str) -> list[int]:
        if name in self._info:
            return list(self._info[name][1].shape)
        return self._ckpt.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        if name in self._info:
            return self._info[name][1].dtype
        return self._ckpt.read(name).dtype

    def _handle(self, f: Path) -> BinaryIO:
        if f not in self._handles:
            self._handles[f] = open(f, "rb")
        return self._handles[f]

    def read(self, name: str, cut: Cut | None = None) -> torch.Tensor:
        """The tensor `name`, or the ranges `cut` names (row cuts read only those rows)."""
        if name not in self._info:
            return self._ckpt.read(name, cut)
        f, info = self._info[name]
        try:
            h = self._handle(f)
            if cut is not None and cut.dim == 0:
                parts = [read_tensor(h, info, a, b) for a, b in cut.pieces]
                return parts[0] if len(parts) == 1 else torch.cat(parts)
            full = read_tensor(h, info)
        except OSError as e:
            raise CheckpointError(f"{f}: cannot read tensor {name} ({e})") from e
        return cut_tensor(full, cut) if cut is not None else full

    def read_into(self, name: str, buf: torch.Tensor) -> torch.Tensor:
        """The full tensor `name`: a memory-mapped view of a safetensors file's bytes, or (a
        `.bin` tensor) a copy into uint8 buffer `buf` (see TensorSource)."""
        if name not in self._info:
            t = self._ckpt.read(name)
            out = buf[: t.numel() * t.element_size()].view(t.dtype).reshape(t.shape)
            return out.copy_(t)
        f, info = self._info[name]
        if info.stop == info.start:
            return torch.empty(info.shape, dtype=info.dtype)
        try:
            return map_tensor(self._handle(f), info)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read tensor {name} ({e})") from e

    def identity(self) -> dict[str, Any]:
        """Where the shards came from: path, config hash, and each weight file's size/mtime."""
        cfg = self.path / "config.json"
        files = []
        for f in self._ckpt.files():
            st = f.stat()
            files.append({"name": f.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
        return {"kind": "hf", "path": str(self.path.resolve()),
                "config_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest(), "files": files}

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()


def map_tensor(f: BinaryIO, info: TensorInfo) -> torch.Tensor:
    """A tensor over a private (copy-on-write) memory map of just its bytes in open file `f`;
    the map lives as long as the tensor. The file size is checked first: touching a mapped
    page past the end of a file that shrank would kill the process with SIGBUS."""
    size = os.fstat(f.fileno()).st_size
    if size < info.stop:
        raise OSError(f"file is {size} bytes, tensor ends at {info.stop} (truncated?)")
    base = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    window = mmap.mmap(f.fileno(), info.stop - base, access=mmap.ACCESS_COPY, offset=base)
    window.madvise(mmap.MADV_WILLNEED)  # read-ahead when the file is not in the page cache
    count = (info.stop - info.start) // info.dtype.itemsize
    flat = torch.frombuffer(window, dtype=info.dtype, count=count, offset=info.start - base)
    return flat.reshape(info.shape)
