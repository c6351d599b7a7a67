"""Reading a shard folder (the output of `shardserve shard`) from the runtime.

Interface used by the runtime loader (keep it stable):

    is_shard_folder(path) -> bool            # a folder whose manifest.json names our format
    folder = ShardFolder(path)               # reads + validates manifest.json and config.json
    folder.config / .tp / .pp / .stage_layers / .dtype / .architecture / .manifest
    shard = folder.open_rank(pp_rank, tp_rank, verify_checksum=True) -> RankShard
        # memory-maps only that rank's file; checks size and sha256 first (ShardError names
        # the file on mismatch)
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

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sharding.manifest import (
    Manifest,
    ShardError,
    is_shard_folder,
    load_manifest,
    sha256_file,
)
from sharding.plan import parse_cut_meta
from sharding.rules import ArchRules, Cut, rules_for

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
        size = path.stat().st_size
        if size != rf.bytes:
            raise ShardError(f"{path}: size {size} bytes, manifest says {rf.bytes}")
        if checksum:
            digest = sha256_file(path)
            if digest != rf.sha256:
                raise ShardError(f"{path}: checksum mismatch (sha256 {digest[:16]}..., manifest "
                                 f"says {rf.sha256[:16]}...); the file is corrupt")
        return path

    def open_rank(self, pp_rank: int, tp_rank: int, verify_checksum: bool = True) -> RankShard:
        """Open (memory-map) the file of rank (pp_rank, tp_rank) only."""
        return RankShard(self, pp_rank, tp_rank, verify_checksum)


class RankShard:
    """One rank's shard file, memory-mapped; see the module docstring for the interface."""

    def __init__(self, folder: ShardFolder, pp_rank: int, tp_rank: int,
                 verify_checksum: bool = True) -> None:
        self.path = folder.check_file(pp_rank, tp_rank, verify_checksum)
        self.config = folder.config
        self.tp, self.pp = folder.tp, folder.pp
        self.stage_layers = folder.stage_layers
        self.dtype = folder.dtype
        self.pp_rank, self.tp_rank = pp_rank, tp_rank
        try:
            self._handle: Any = safe_open(str(self.path), framework="pt")
            meta = self._handle.metadata() or {}
            self._cuts = {n: parse_cut_meta(meta[n]) for n in self._handle.keys()}
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(f"{self.path}: missing or malformed shard metadata ({e!r})") from e
        except Exception as e:  # safetensors raises its own error types
            raise ShardError(f"{self.path}: cannot open ({e})") from e

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
        try:
            return self._handle.get_tensor(name)
        except Exception as e:
            raise ShardError(f"{self.path}: cannot read tensor {name} ({e})") from e

    def close(self) -> None:
        self._handle = None

    def __enter__(self) -> RankShard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
