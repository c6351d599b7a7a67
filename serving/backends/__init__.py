"""Backend registry: a config's `backend` (or `platform`) name -> the Backend class serving it.

Entries are classes or "module:Class" strings imported on first use, so that a server without
giant models never imports torch.distributed and one without ONNX models never imports
onnxruntime. Add a backend by adding one entry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from serving.config import backend_name
from serving.types import Backend, ServingError

BACKENDS: dict[str, type[Backend] | str] = {
    "shardserve_llm": "serving.backends.llm:LLMBackend",
    "python": "serving.backends.python:PythonBackend",
    "pytorch": "serving.backends.pytorch:PytorchBackend",
    "onnxruntime": "serving.backends.onnx:OnnxBackend",
    "ensemble": "serving.ensemble:EnsembleBackend",
}


def backend_class(name: str, registry: dict[str, type[Backend] | str] | None = None
                  ) -> type[Backend]:
    """The class registered under `name` (imported if registered as a string)."""
    registry = BACKENDS if registry is None else registry
    entry = registry.get(name)
    if entry is None:
        raise ServingError("INVALID_ARGUMENT", f"unknown backend '{name}'; this server has "
                           f"{sorted(registry)}")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        registry[name] = entry
    return entry


def create_model(config: mc.ModelConfig, model_dir: Path, version: int,
                 resolve: Callable[[str, int], Backend] | None = None) -> Backend:
    """An unloaded Backend for one version of one model; `resolve` finds an ensemble's step
    models ((name, version or -1) -> Backend)."""
    cls = backend_class(backend_name(config))
    if backend_name(config) == "ensemble":
        return cls(config, model_dir, version, resolve)  # type: ignore[call-arg]
    return cls(config, model_dir, version)
