"""Fill one stage's parameters from a weight source, cutting each rank's shard.

A source is anything with `names()` and `read(name, cut) -> tensor`: an HF checkpoint (which
slices lazily) or a rank's shard file (which already holds exactly that cut).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from sharding.rules import ArchRules, Cut


class WeightSource(Protocol):
    def names(self) -> list[str]: ...

    def read(self, name: str, cut: Cut | None = None) -> torch.Tensor: ...


class LoadError(RuntimeError):
    """Weights that do not fit the model; the message lists the offending tensors."""


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model parameters with no tensor
    unexpected: list[str] = field(default_factory=list)  # tensors that belong to no model part

    def summary(self) -> str:
        return (f"{len(self.loaded)} tensors loaded, missing: {self.missing or 'none'}, "
                f"unexpected: {self.unexpected or 'none'}")


def load_stage(model: nn.Module, source: WeightSource, rules: ArchRules, tp_rank: int,
               stage: int, *, strict: bool = True) -> LoadReport:
    """Copy this rank's slice of every parameter of `model` (one stage) from `source`."""
    names = set(source.names())
    report = LoadReport()
    for pname, param in model.named_parameters():
        src = rules.head_source(names) if pname == rules.head_name else pname
        if src not in names:
            report.missing.append(pname)
            continue
        cut = rules.cut(src, tp_rank)
        t = source.read(src, cut)
        if cut.transpose:
            t = t.t()
        if tuple(t.shape) != tuple(param.shape):
            raise LoadError(f"{src}: shard shape {tuple(t.shape)} does not fit parameter "
                            f"{pname} of shape {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(t.to(param.dtype))
        report.loaded.append(pname)
    for name in sorted(names):
        if rules.is_ignored(name):
            continue
        stages = rules.stages_of(name)
        if stages is None:
            report.unexpected.append(name)
    if strict and (report.missing or report.unexpected):
        raise LoadError(f"stage {stage}, tp rank {tp_rank}: {report.summary()}")
    return report
