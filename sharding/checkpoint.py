"""Read tensors, or just slices of them, from a Hugging Face checkpoint directory.

Safetensors files are memory-mapped and sliced without reading whole tensors; a
`pytorch_model.bin` is loaded with `weights_only=True` and memory-mapped where torch allows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sharding.rules import Cut

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read; the message names the file."""


def read_config(path: Path) -> dict[str, Any]:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{cfg}: missing config.json")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from e


def cut_tensor(t: torch.Tensor, cut: Cut) -> torch.Tensor:
    """Apply `cut` to a full tensor (the reference for what slicing a file must return)."""
    if cut.dim is None:
        return t
    return torch.cat([t.narrow(cut.dim, a, b - a) for a, b in cut.pieces], dim=cut.dim)


class HFCheckpoint:
    """The tensors of one HF checkpoint directory, by name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        self.config = read_config(self.path)
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._bin: dict[Path, dict[str, torch.Tensor]] = {}
        self._index()

    def _index(self) -> None:
        for index_name in (SAFE_INDEX, BIN_INDEX):
            index = self.path / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index}: not a valid index ({e})") from e
                for name, file in weight_map.items():
                    self._file_of[name] = self.path / file
                missing = {f for f in self._file_of.values() if not f.is_file()}
                if missing:
                    raise CheckpointError(f"{sorted(map(str, missing))[0]}: missing shard file")
                return
        for single in ("model.safetensors", "pytorch_model.bin"):
            f = self.path / single
            if f.is_file():
                for name in self._open(f).keys():
                    self._file_of[name] = f
                return
        raise CheckpointError(f"{self.path}: no model.safetensors, pytorch_model.bin or index")

    def _open(self, f: Path) -> Any:
        if f in self._handles:
            return self._handles[f]
        try:
            if f.suffix == ".safetensors":
                h = safe_open(str(f), framework="pt")
            else:
                self._bin[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                h = self._bin[f]
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{f}: cannot read ({e})") from e
        self._handles[f] = h
        return h

    def names(self) -> list[str]:
        return list(self._file_of)

    def file_of(self, name: str) -> Path:
        return self._file_of[name]

    def files(self) -> list[Path]:
        return sorted(set(self._file_of.values()))

    def shape(self, name: str) -> list[int]:
        h = self._open(self._file_of[name])
        if isinstance(h, dict):
            return list(h[name].shape)
        return list(h.get_slice(name).get_shape())

    def read(self, name: str, cut: Cut | None = None) -> torch.Tensor:
        """The tensor `name`, or only the ranges `cut` names (read lazily for safetensors)."""
        f = self._file_of[name]
        h = self._open(f)
        try:
            if isinstance(h, dict):
                t = h[name]
                return cut_tensor(t, cut) if cut else t
            if cut is None or cut.dim is None:
                return h.get_tensor(name)
            sl = h.get_slice(name)
            parts = []
            for a, b in cut.pieces:
                index = [slice(None)] * len(sl.get_shape())
                index[cut.dim] = slice(a, b)
                parts.append(sl[tuple(index)])
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=cut.dim)
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read tensor {name} ({e})") from e

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._file_of:
            yield name, self.read(name)
