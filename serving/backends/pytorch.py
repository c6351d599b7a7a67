"""The pytorch backend: TorchScript (`model.pt`) and torch.export (`model.pt2`) models.

Inputs and outputs follow Triton's PyTorch conventions: names of the form `<name>__<index>`
map by position; other input names must match the forward arguments; other output names map
to the model's outputs in config order (or by key when the model returns a dict).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tritonclient.grpc import model_config_pb2 as mc

from serving.instances import BatchedInstance, ScheduledBackend
from serving.tensor_config import (
    config_type_of,
    dims_match,
    full_dims,
    numpy_dtype,
    type_name,
)
from serving.types import ServingError

_INDEXED = re.compile(r"^.+__(\d+)$")


def _indices(names: list[str]) -> list[int] | None:
    """Positions from Triton's `<name>__<index>` names, or None when not all names use it."""
    matches = [_INDEXED.match(n) for n in names]
    if names and all(matches):
        return [int(m.group(1)) for m in matches if m]
    return None


def _load_error(field: str, message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", f"{field}: {message}")


class _Model:
    """A loaded TorchScript or exported program with its forward argument names."""

    def __init__(self, path: Path, device: str) -> None:
        self.path = path
        self.exported: Any = None
        if path.suffix == ".pt2":
            self.exported = torch.export.load(str(path))
            self.module = self.exported.module().to(device)
            self.arg_names = list(self.exported.graph_signature.user_inputs)
        else:
            self.module = torch.jit.load(str(path), map_location=device)
            self.arg_names = [a.name for a in self.module.forward.schema.arguments[1:]]
            self.module.eval()
        self.device = device

    def __call__(self, args: list[torch.Tensor]) -> Any:
        with torch.inference_mode():
            return self.module(*args)


def _to_tensor(array: np.ndarray, device: str) -> torch.Tensor:
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array).copy()
    return torch.from_numpy(array).to(device)


class PytorchBackend(ScheduledBackend):
    """Backend "pytorch" / platform "pytorch_libtorch"."""

    def __init__(self, config: mc.ModelConfig, model_dir: Path, version: int) -> None:
        super().__init__(config, model_dir, version)
        self._path: Path | None = None
        self._in_order: list[str] = []

    def model_path(self) -> Path:
        folder = Path(self.model_dir) / str(self.version)
        if self.config.default_model_filename:
            return folder / self.config.default_model_filename
        pt = folder / "model.pt"
        return pt if pt.exists() or not (folder / "model.pt2").exists() else folder / "model.pt2"

    def cuda_count(self) -> int:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    # --- load-time checks ------------------------------------------------------------------

    def check_config(self) -> None:
        path = self.model_path()
        if not path.is_file():
            raise ServingError("NOT_FOUND", f"model file {path} not found")
        for spec in list(self.config.input) + list(self.config.output):
            if spec.data_type == mc.TYPE_STRING:
                raise _load_error(f"'{spec.name}' data_type", "TYPE_STRING is not supported by "
                                  "the pytorch backend")
        try:
            model = _Model(path, "cpu")
        except Exception as exc:
            raise ServingError("INVALID_ARGUMENT", f"cannot load {path}: {exc!r}") from exc
        self._path = path
        self._in_order = self._input_order(model)
        if model.exported is not None:
            self._check_exported_inputs(model)
        self._check_outputs(model)

    def _input_order(self, model: _Model) -> list[str]:
        """Config input names in forward-argument order."""
        names = [spec.name for spec in self.config.input]
        indices = _indices(names)
        if indices is not None:
            if sorted(indices) != list(range(len(names))) or len(names) > len(model.arg_names):
                raise _load_error("input", f"indexed names {names} do not cover the model's "
                                  f"{len(model.arg_names)} forward arguments {model.arg_names}")
            return [name for _, name in sorted(zip(indices, names, strict=True))]
        for name in names:
            if name not in model.arg_names:
                raise _load_error(f"input '{name}' name", f"not a forward argument of the model "
                                  f"(arguments: {model.arg_names})")
        missing = [a for a in model.arg_names if a not in names]
        if missing:
            raise _load_error("input", f"forward arguments {missing} have no config input")
        return list(model.arg_names)

    def _check_exported_inputs(self, model: _Model) -> None:
        """torch.export programs carry input dtypes and shapes: check them statically."""
        nodes = {n.name: n for n in model.exported.graph.nodes if n.op == "placeholder"}
        specs = {s.name: s for s in self.config.input}
        for spec_name, arg in zip(self._in_order, model.arg_names, strict=False):
            value = nodes[arg].meta.get("val")
            if value is None:
                continue
            first = value.shape[0] if len(value.shape) else None
            if self.config.max_batch_size > 1 and isinstance(first, int):
                raise _load_error(f"input '{spec_name}' max_batch_size",
                                  f"the exported program fixes the first dim to {first}; export "
                                  "with a dynamic batch dim (torch.export.Dim) to batch up to "
                                  f"{self.config.max_batch_size}")
            self._check_tensor("input", specs[spec_name], value.dtype, list(value.shape))

    def _check_tensor(self, kind: str, spec: Any, dtype: torch.dtype, shape: list,
                      batch: int | None = None) -> None:
        have = config_type_of(torch.empty(0, dtype=dtype).numpy().dtype)
        if have != type_name(spec.data_type):
            raise _load_error(f"{kind} '{spec.name}' data_type",
                              f"model uses {have}, config says {type_name(spec.data_type)}")
        model_dims = list(spec.reshape.shape) if spec.HasField("reshape") else list(spec.dims)
        expected = full_dims(self.config, model_dims)
        if batch is not None and self.config.max_batch_size > 0:
            expected[0] = batch
        if not dims_match(expected, shape):
            field = "max_batch_size" if len(shape) == len(expected) + 1 or (
                len(shape) + 1 == len(expected)) else "dims"
            raise _load_error(f"{kind} '{spec.name}' {field}",
                              f"model shape {[str(d) for d in shape]} does not fit config "
                              f"{expected} (max_batch_size {self.config.max_batch_size})")

    def _dummy_inputs(self, batch: int) -> list[torch.Tensor]:
        specs = {s.name: s for s in self.config.input}
        args = []
        for name in self._in_order:
            spec = specs[name]
            dims = list(spec.reshape.shape) if spec.HasField("reshape") else list(spec.dims)
            shape = [1 if d < 0 else d for d in full_dims(self.config, dims)]
            if self.config.max_batch_size > 0:
                shape[0] = batch
            args.append(torch.zeros(shape, dtype=torch.from_numpy(
                np.zeros(0, numpy_dtype(spec.data_type))).dtype))
        return args

    def _check_outputs(self, model: _Model) -> None:
        """Run the model once on zeros shaped like the config and check what comes out."""
        batch = min(2, self.config.max_batch_size) if self.config.max_batch_size > 0 else 1
        try:
            produced = self._outputs_by_name(model(self._dummy_inputs(batch)))
        except ServingError:
            raise
        except Exception as exc:
            raise _load_error("input", f"the model rejects inputs shaped and typed as the config "
                              f"says: {exc!r}") from exc
        for spec in self.config.output:
            tensor = produced.get(spec.name)
            if tensor is None:
                raise _load_error(f"output '{spec.name}' name",
                                  f"the model has no such output (outputs: {list(produced)})")
            self._check_tensor("output", spec, tensor.dtype, list(tensor.shape), batch)

    # --- execution -------------------------------------------------------------------------

    def _outputs_by_name(self, result: Any) -> dict[str, torch.Tensor]:
        """Map the model's outputs to config output names."""
        names = [spec.name for spec in self.config.output]
        if isinstance(result, dict):
            return {k: v for k, v in result.items() if k in names}
        outputs = list(result) if isinstance(result, (tuple, list)) else [result]
        indices = _indices(names) or list(range(len(names)))
        if max(indices, default=-1) >= len(outputs):
            raise _load_error("output", f"config names {len(names)} outputs {names}, the model "
                              f"returns {len(outputs)}")
        return {name: outputs[i] for name, i in zip(names, indices, strict=True)}

    def _intra_op_threads(self) -> int:
        """Triton's INTRA_OP_THREAD_COUNT parameter (0: torch's default). Small models often
        run faster with 1: OpenMP teams cost more than they save on tiny ops."""
        param = self.config.parameters.get("INTRA_OP_THREAD_COUNT")
        if param is None or not param.string_value:
            return 0
        try:
            return max(int(param.string_value), 0)
        except ValueError:
            raise _load_error("parameters INTRA_OP_THREAD_COUNT",
                              f"not an integer: {param.string_value!r}") from None

    def create_instance(self, index: int, device: str) -> BatchedInstance:
        assert self._path is not None
        model = _Model(self._path, device)
        order = list(self._in_order)
        threads = self._intra_op_threads()

        def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if threads and torch.get_num_threads() != threads:
                torch.set_num_threads(threads)  # this instance thread's OpenMP team
            args = [_to_tensor(inputs[name], device) for name in order]
            produced = self._outputs_by_name(model(args))
            return {name: t.detach().cpu().numpy() for name, t in produced.items()}

        return BatchedInstance(self.config, run)
