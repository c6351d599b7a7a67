"""Reading a shard folder (the output of `shardserve shard`) from the runtime.

Interface used by the runtime loader (keep it stable):

    is_shard_folder(path) -> bool            # a folder whose manifest.json names our format
    folder = ShardFolder(path)               # reads + validates manifest.json and config.json
    folder.config / .tp / .pp / .stage_layers / .dtype / .architecture / .manifest
    shard = folder.open_rank(pp_rank, tp_rank, verify_checksum=True) -> RankShard
        # memory-maps only that rank's file and checks its size and the sha256 of the mapped
        # bytes before any tensor is handed out (ShardError names the file on mismatch)
    shard.config / .tp / .pp / .stage_layers / .dtype / .pp_rank / .tp_rank / .path
    shard.names() -> list[str]               # HF names this rank holds
    shard.shape(name) -> list[int]           # FULL (unsharded) shape, like HFCheckpoint.shape
    shard.stored_cut(name) -> Cut            # the slice stored for this rank
    shard.read(name, cut=None) -> Tensor     # the stored (already cut, HF layout) tensor;
        # with `cut`, checks that the stored pieces are exactly that cut (ShardError if not).
        # Unknown names raise KeyError, as HFCheckpoint does. `Cut.transpose` is the caller's.
    shard.close()  (also a context manager)

So a loader can read weights with `source.read(name, rules.cut(name, tp_rank))` whether `source`
is an `HFCheckpoint` (slices on the fly) or a `RankShard` (slices stored ahead of time).
All errors are `ShardError` (a ValueError) with the offending file in the message.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path
from typing import Any

import torch

from sharding.manifest import (
    HASH_CHUNK,
    Manifest,
    ShardError,
    is_shard_folder,
    load_manifest,
    sha256_file,
)
from sharding.plan import parse_cut_meta
from sharding.rules import ArchRules, Cut, rules_for
from sharding.stformat import FormatError, TensorInfo, parse_header

__all__ = ["RankShard", "ShardError", "ShardFolder", "is_shard_folder"]


class ShardFolder:
    """A shard folder: manifest, HF config, and access to each rank's file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ShardError(f"{self.path}: not a directory")
        self.manifest: Manifest = load_manifest(self.path)
        cfg = self.path / "config.json"
        try:
            self.config: dict[str, Any] = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ShardError(f"{cfg}: cannot read the copied HF config ({e})") from e

    @property
    def tp(self) -> int:
        return self.manifest.tp

    @property
    def pp(self) -> int:
        return self.manifest.pp

    @property
    def stage_layers(self) -> list[int]:
        return list(self.manifest.stage_layers)

    @property
    def dtype(self) -> str:
        """"float32", "bfloat16", "float16" (or "mixed")."""
        return self.manifest.dtype

    @property
    def architecture(self) -> str:
        return self.manifest.architecture

    def rules(self) -> ArchRules:
        """The sharding rules of this folder's layout."""
        return rules_for(self.config, self.tp, self.pp, self.stage_layers)

    def rank_path(self, pp_rank: int, tp_rank: int) -> Path:
        return self.path / self.manifest.rank_file(pp_rank, tp_rank).file

    def check_file(self, pp_rank: int, tp_rank: int, checksum: bool = True) -> Path:
        """The rank's file, after checking that it exists with the recorded size (and sha256)."""
        rf = self.manifest.rank_file(pp_rank, tp_rank)
        path = self.path / rf.file
        if not path.is_file():
            raise ShardError(f"{path}: missing shard file")
        self.check_size(path, path.stat().st_size, pp_rank, tp_rank)
        if checksum:
            self.check_digest(path, sha256_file(path), pp_rank, tp_rank)
        return path

    def check_size(self, path: Path, size: int, pp_rank: int, tp_rank: int) -> None:
        want = self.manifest.rank_file(pp_rank, tp_rank).bytes
        if size != want:
            raise ShardError(f"{path}: size {size} bytes, manifest says {want}")

    def check_digest(self, path: Path, digest: str, pp_rank: int, tp_rank: int) -> None:
        want = self.manifest.rank_file(pp_rank, tp_rank).sha256
        if digest != want:
            raise ShardError(f"{path}: checksum mismatch (sha256 {digest[:16]}..., manifest "
                             f"says {want[:16]}...); the file is corrupt")

    def open_rank(self, pp_rank: int, tp_rank: int, verify_checksum: bool = True) -> RankShard:
        """Open (memory-map) the file of rank (pp_rank, tp_rank) only."""
        return RankShard(self, pp_rank, tp_rank, verify_checksum)


class RankShard:
    """One rank's shard file, memory-mapped; see the module docstring for the interface.

    The file is mapped once (privately: copy-on-write, so the tensors are writable and a write
    never reaches the file); its sha256 is computed over the mapped bytes, which also brings
    them into memory, and the header is parsed from the same bytes, so the tensors handed out
    are the bytes that were checked, with no second pass over the file."""

    def __init__(self, folder: ShardFolder, pp_rank: int, tp_rank: int,
                 verify_checksum: bool = True) -> None:
        self.path = folder.rank_path(pp_rank, tp_rank)
        self.config = folder.config
        self.tp, self.pp = folder.tp, folder.pp
        self.stage_layers = folder.stage_layers
        self.dtype = folder.dtype
        self.pp_rank, self.tp_rank = pp_rank, tp_rank
        if not self.path.is_file():
            raise ShardError(f"{self.path}: missing shard file")
        try:
            with open(self.path, "rb") as f:
                folder.check_size(self.path, os.fstat(f.fileno()).st_size, pp_rank, tp_rank)
                self._map: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:
            raise ShardError(f"{self.path}: cannot open ({e})") from e
        if verify_checksum:
            folder.check_digest(self.path, sha256_buffer(self._map), pp_rank, tp_rank)
        try:
            self._infos, meta = parse_header(self.path, self._map)
            self._cuts = {n: parse_cut_meta(meta[n]) for n in self._infos}
        except FormatError as e:
            raise ShardError(str(e)) from e
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(f"{self.path}: missing or malformed shard metadata ({e!r})") from e

    def names(self) -> list[str]:
        return list(self._cuts)

    def shape(self, name: str) -> list[int]:
        """The full (unsharded) shape of `name`."""
        return list(self._cuts[name][1])

    def stored_cut(self, name: str) -> Cut:
        return self._cuts[name][0]

    def read(self, name: str, cut: Cut | None = None) -> torch.Tensor:
        """The stored slice of `name`; with `cut`, it must be exactly the stored one."""
        stored, _ = self._cuts[name]
        if cut is not None and (cut.dim, tuple(cut.pieces)) != (stored.dim, stored.pieces):
            raise ShardError(
                f"{self.path}: tensor {name} is stored as dim={stored.dim} pieces="
                f"{list(stored.pieces)}, but dim={cut.dim} pieces={list(cut.pieces)} was asked "
                "for; the shard layout does not match the runtime's")
        if self._map is None:
            raise ShardError(f"{self.path}: read after close")
        info: TensorInfo = self._infos[name]
        if info.stop == info.start:
            return torch.empty(info.shape, dtype=info.dtype)
        count = (info.stop - info.start) // info.dtype.itemsize
        flat = torch.frombuffer(self._map, dtype=info.dtype, count=count, offset=info.start)
        return flat.reshape(info.shape)

    def close(self) -> None:
        """Drop this shard's reference to the map (tensors already read keep it alive)."""
        self._map = None

    def __enter__(self) -> RankShard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sha256_buffer(data: Any) -> str:
    """Hex sha256 of a buffer (e.g. a memory map), in large slices: hashlib releases the GIL on
    each, so other threads run meanwhile."""
    h = hashlib.sha256()
    view = memoryview(data)
    try:
        for off in range(0, len(view), HASH_CHUNK):
            h.update(view[off: off + HASH_CHUNK])
    finally:
        view.release()
    return h.hexdigest()
