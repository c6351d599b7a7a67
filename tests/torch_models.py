"""Small real models the backend tests export to TorchScript, torch.export and ONNX."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class Classifier(nn.Module):
    """A tiny MLP classifier returning (logits, probabilities)."""

    def __init__(self, features: int = 8, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.body(features)
        return logits, torch.softmax(logits, dim=-1)


class Scale(nn.Module):
    """Two named inputs, to check argument mapping by name: values * weight."""

    def forward(self, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return values * weight


def save_torchscript(model: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(model.eval()).save(str(path))


def save_exported(model: nn.Module, example: tuple, path: Path, dynamic_batch: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    dims = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1024)
        dims = tuple({0: batch} for _ in example)
    torch.export.save(torch.export.export(model.eval(), example, dynamic_shapes=dims), str(path))


def save_onnx(model: nn.Module, example: tuple, path: Path, inputs: list[str],
              outputs: list[str], dynamic_batch: bool = True) -> None:
    """Export with the TorchScript-based exporter (no onnxscript needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {n: {0: "batch"} for n in inputs + outputs} if dynamic_batch else None
    torch.onnx.export(model.eval(), example, str(path), input_names=inputs, output_names=outputs,
                      dynamic_axes=axes, dynamo=False)
