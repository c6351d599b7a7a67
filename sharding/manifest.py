"""`manifest.json` of a shard folder: what layout the rank files hold and how to check them.

Shape (format "shardserve-shards", version 1):
  architecture, tp, pp, stage_layers, dtype ("float32"/"bfloat16"/"float16", or "mixed" when
  the source mixed float dtypes and no --dtype was given), files (one per global rank
  pp_rank * tp + tp_rank: file name, bytes, sha256, tensor count), tensors (every model tensor of
  the source: full shape, stored dtype, stages that hold it), ignored (source buffers no rank
  needs) and source (where the shards came from).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "shardserve-shards"
VERSION = 1
MANIFEST = "manifest.json"
HASH_CHUNK = 16 * 1024 * 1024


class ShardError(ValueError):
    """A shard folder or rank file that is missing, malformed or fails its checksum; the message
    names the file."""


def rank_file_name(pp_rank: int, tp_rank: int) -> str:
    return f"rank-pp{pp_rank}-tp{tp_rank}.safetensors"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)  # reused: no fresh memory to fault in per chunk
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


@dataclass
class RankFile:
    """One rank's shard file as the manifest records it."""

    pp_rank: int
    tp_rank: int
    file: str
    bytes: int
    sha256: str
    num_tensors: int


@dataclass
class Manifest:
    """The parsed manifest; `tensors` maps name -> {"shape", "dtype", "stages"}."""

    architecture: str
    tp: int
    pp: int
    stage_layers: list[int]
    dtype: str
    files: list[RankFile]
    tensors: dict[str, dict[str, Any]]
    source: dict[str, Any]
    ignored: list[str] = field(default_factory=list)

    def rank_file(self, pp_rank: int, tp_rank: int) -> RankFile:
        if not (0 <= pp_rank < self.pp and 0 <= tp_rank < self.tp):
            raise ShardError(f"rank pp{pp_rank}-tp{tp_rank} is outside the {self.pp}x{self.tp} "
                             "layout of this shard folder")
        return self.files[pp_rank * self.tp + tp_rank]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "architecture": self.architecture,
            "tp": self.tp, "pp": self.pp, "stage_layers": self.stage_layers, "dtype": self.dtype,
            "files": [{"rank": f.pp_rank * self.tp + f.tp_rank, **f.__dict__} for f in self.files],
            "tensors": self.tensors, "ignored": self.ignored, "source": self.source,
        }

    def save(self, folder: Path) -> None:
        (folder / MANIFEST).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def load_manifest(folder: Path) -> Manifest:
    """Read and validate `folder/manifest.json`."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: missing (not a shard folder)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ShardError(f"{path}: not a {FORMAT} manifest")
    if raw.get("version") != VERSION:
        raise ShardError(f"{path}: format version {raw.get('version')} is not supported "
                         f"(this build reads version {VERSION})")
    try:
        tp, pp = int(raw["tp"]), int(raw["pp"])
        files = [RankFile(int(f["pp_rank"]), int(f["tp_rank"]), str(f["file"]), int(f["bytes"]),
                          str(f["sha256"]), int(f["num_tensors"])) for f in raw["files"]]
        m = Manifest(str(raw["architecture"]), tp, pp, [int(n) for n in raw["stage_layers"]],
                     str(raw["dtype"]), files, dict(raw["tensors"]), dict(raw["source"]),
                     list(raw.get("ignored", [])))
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{path}: malformed manifest ({e!r})") from e
    expected = [(p, t) for p in range(pp) for t in range(tp)]
    if [(f.pp_rank, f.tp_rank) for f in files] != expected or len(m.stage_layers) != pp:
        raise ShardError(f"{path}: file list does not match the {pp}x{tp} layout")
    return m


def is_shard_folder(path: str | Path) -> bool:
    """True when `path` is a directory whose manifest.json names the shardserve shard format."""
    mf = Path(path) / MANIFEST
    try:
        return mf.is_file() and json.loads(mf.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False
