"""`shardserve verify`: check a shard folder against its manifest, its rules and its source.

Checks, in order: every rank file's size and sha256; each file holds exactly the tensors the
layout's rules assign to it, with the recorded cut, shape and dtype; the tp ranks of every stage
that holds a tensor cover all of it; and, given the source checkpoint, the same tensor set and
every stored slice bit-identical to the source's (converted to the shard dtype).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from sharding.checkpoint import CheckpointError, cut_tensor
from sharding.manifest import ShardError
from sharding.plan import covers, cut_shape
from sharding.reshard import ShardSource
from sharding.rules import ArchRules, Cut
from sharding.shards import ShardFolder
from sharding.sources import HFSource
from sharding.stformat import dtype_name, read_tensor

MAX_PROBLEMS = 50


@dataclass
class VerifyReport:
    """Outcome of a verification: problems found (empty when all is well) and what was checked."""

    folder: Path
    files: int = 0
    tensors: int = 0
    compared: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)

    def line(self) -> str:
        if self.ok:
            extra = f", {self.compared} slices bit-identical to the source" if self.compared else ""
            return (f"OK: {self.folder}: {self.files} files, {self.tensors} tensors complete"
                    f"{extra}")
        return f"FAILED: {self.folder}: {len(self.problems)} problem(s)"


def _check_files(folder: ShardFolder, report: VerifyReport) -> bool:
    good = True
    for rf in folder.manifest.files:
        try:
            folder.check_file(rf.pp_rank, rf.tp_rank)
            report.files += 1
        except ShardError as e:
            report.add(str(e))
            good = False
    return good


def _check_rank(source: ShardSource, rules: ArchRules, rank: int, report: VerifyReport) -> None:
    folder = source.folder
    tp = folder.tp
    pp_rank, tp_rank = divmod(rank, tp)
    path = folder.rank_path(pp_rank, tp_rank)
    table = source.tables[rank]
    expected = {n for n, t in folder.manifest.tensors.items() if pp_rank in t["stages"]}
    for name in sorted(expected - set(table)):
        report.add(f"{path}: missing tensor {name}")
    for name in sorted(set(table) - expected):
        report.add(f"{path}: extra tensor {name}")
    for name in sorted(expected & set(table)):
        info, stored = table[name]
        want = rules.cut(name, tp_rank)
        entry = folder.manifest.tensors[name]
        if (stored.dim, stored.pieces) != (want.dim, want.pieces):
            report.add(f"{path}: {name} stored as dim={stored.dim} pieces={list(stored.pieces)}, "
                       f"rules say dim={want.dim} pieces={list(want.pieces)}")
        if info.shape != cut_shape(entry["shape"], stored):
            report.add(f"{path}: {name} has shape {list(info.shape)}, its cut of "
                       f"{entry['shape']} needs {list(cut_shape(entry['shape'], stored))}")
        if dtype_name(info.dtype) != entry["dtype"]:
            report.add(f"{path}: {name} is {dtype_name(info.dtype)}, manifest says "
                       f"{entry['dtype']}")


def _check_coverage(source: ShardSource, rules: ArchRules, report: VerifyReport) -> None:
    folder = source.folder
    tp = folder.tp
    for name, entry in folder.manifest.tensors.items():
        stages = rules.stages_of(name)
        if stages is None or list(stages) != list(entry["stages"]):
            report.add(f"manifest: {name} is placed on stages {entry['stages']}, rules say "
                       f"{None if stages is None else list(stages)}")
            continue
        for stage in stages:
            cuts = [source.tables[stage * tp + t].get(name) for t in range(tp)]
            if any(c is None for c in cuts):
                continue  # reported as missing by _check_rank
            found: list[Cut] = [c[1] for c in cuts if c is not None]
            if all(c.dim is None for c in found):
                continue
            dims = {c.dim for c in found}
            pieces = [p for c in found for p in c.pieces]
            dim = dims.pop() if len(dims) == 1 else None
            if dim is None or not covers(pieces, entry["shape"][dim]):
                report.add(f"stage {stage}: the tp ranks do not cover {name} exactly "
                           f"(pieces {sorted(pieces)} of shape {entry['shape']})")


def _compare_source(shards: ShardSource, src_path: Path, report: VerifyReport) -> None:
    src = HFSource(src_path)
    try:
        rules_names = set(src.names()) - set(shards.folder.manifest.ignored)
        table = shards.folder.manifest.tensors
        for name in sorted(rules_names - set(table)):
            report.add(f"source tensor {name} is not in the shards")
        for name in sorted(set(table) - rules_names):
            report.add(f"shard tensor {name} is not in the source {src_path}")
        tp = shards.folder.tp
        for name in sorted(rules_names & set(table)):
            if src.shape(name) != table[name]["shape"]:
                report.add(f"{name}: source shape {src.shape(name)}, "
                           f"manifest {table[name]['shape']}")
                continue
            full = src.read(name)
            if full.dtype.is_floating_point:
                full = full.to(shards.dtype(name))
            for stage in table[name]["stages"]:
                for t in range(tp):
                    _compare_slice(shards, stage * tp + t, name, full, report)
    finally:
        src.close()


def _compare_slice(shards: ShardSource, rank: int, name: str, full: torch.Tensor,
                   report: VerifyReport) -> None:
    entry = shards.tables[rank].get(name)
    if entry is None:
        return
    info, cut = entry
    stored = read_tensor(shards.file(rank), info)
    want = cut_tensor(full, cut).contiguous()
    if stored.shape != want.shape or not torch.equal(_raw(stored), _raw(want)):
        pp_rank, tp_rank = divmod(rank, shards.folder.tp)
        report.add(f"{shards.folder.rank_path(pp_rank, tp_rank)}: {name} differs from the source")
    else:
        report.compared += 1


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of `t` as uint8, so that comparisons are bit-exact (NaNs and -0.0 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def verify_shards(out: str | Path, source: str | Path | None = None) -> VerifyReport:
    """Verify shard folder `out` (and, given `source`, its contents against the checkpoint).
    Raises ShardError/CheckpointError only when the folder or source cannot be opened at all."""
    folder = ShardFolder(out)
    report = VerifyReport(folder.path)
    if not _check_files(folder, report):
        return report
    shards = ShardSource(folder.path, verify_checksum=False)
    try:
        rules = folder.rules()
        for rank in range(folder.tp * folder.pp):
            _check_rank(shards, rules, rank, report)
        _check_coverage(shards, rules, report)
        report.tensors = len(folder.manifest.tensors)
        if source is not None and report.ok:
            _compare_source(shards, Path(source), report)
    except (CheckpointError, ValueError) as e:
        report.add(str(e))
    finally:
        shards.close()
    return report
