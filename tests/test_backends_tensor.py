"""The pytorch (TorchScript and torch.export) and onnxruntime backends with real exported
models, compared against the eager module, plus load-time config checks naming the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.backends.onnx import OnnxBackend
from serving.backends.pytorch import PytorchBackend
from serving.types import ServingError
from tests.backend_helpers import CollectSink, make_request, parse_config
from tests.torch_models import Classifier, Scale, save_exported, save_onnx, save_torchscript

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _config(backend: str, inp: str, outs: tuple[str, str], mbs: int = 8,
            in_type: str = "TYPE_FP32", out_type: str = "TYPE_FP32", dims: str = "8",
            extra: str = "") -> str:
    return f"""
    name: "clf"
    backend: "{backend}"
    max_batch_size: {mbs}
    input [ {{ name: "{inp}" data_type: {in_type} dims: [ {dims} ] }} ]
    output [ {{ name: "{outs[0]}" data_type: {out_type} dims: [ 4 ] }},
             {{ name: "{outs[1]}" data_type: TYPE_FP32 dims: [ 4 ] }} ]
    {extra}
    """


def _run(backend, **inputs):
    sink = CollectSink()
    backend.submit(make_request("clf", **inputs), sink)
    return sink.outputs()


def _expected(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits, probs = Classifier()(torch.from_numpy(x))
    return logits.numpy(), probs.numpy()


def _save(kind: str, tmp_path, dynamic_batch: bool = True) -> None:
    model, example = Classifier(), (torch.randn(2, 8),)
    if kind == "pt":
        save_torchscript(model, tmp_path / "clf" / "1" / "model.pt")
    elif kind == "pt2":
        save_exported(model, example, tmp_path / "clf" / "1" / "model.pt2", dynamic_batch)
    else:
        save_onnx(model, example, tmp_path / "clf" / "1" / "model.onnx", ["features"],
                  ["logits", "probs"], dynamic_batch)


CASES = [
    ("pt", PytorchBackend, "pytorch", "INPUT__0", ("OUTPUT__0", "OUTPUT__1")),
    ("pt", PytorchBackend, "pytorch", "features", ("logits", "probs")),
    ("pt2", PytorchBackend, "pytorch", "features", ("OUTPUT__0", "OUTPUT__1")),
    ("pt2", PytorchBackend, "pytorch", "INPUT__0", ("logits", "probs")),
    ("onnx", OnnxBackend, "onnxruntime", "features", ("logits", "probs")),
]


@pytest.mark.parametrize(("kind", "cls", "backend", "inp", "outs"), CASES,
                         ids=[f"{c[0]}-{c[3]}-{c[4][0]}" for c in CASES])
def test_classifier_matches_eager(tmp_path, kind, cls, backend, inp, outs):
    _save(kind, tmp_path)
    model = cls(parse_config(_config(backend, inp, outs)), tmp_path / "clf", 1)
    model.load()
    for batch in (1, 3, 8):
        x = np.random.randn(batch, 8).astype(np.float32)
        out = _run(model, **{inp: x})
        logits, probs = _expected(x)
        np.testing.assert_allclose(out[outs[0]], logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[outs[1]], probs, rtol=1e-5, atol=1e-5)
    model.unload()


@pytest.mark.parametrize("kind", ["pt", "pt2"])
def test_named_arguments_map_by_name(tmp_path, kind):
    a, w = torch.randn(2, 3), torch.randn(2, 3)
    path = tmp_path / "clf" / "1" / f"model.{kind}"
    if kind == "pt":
        save_torchscript(Scale(), path)
    else:
        save_exported(Scale(), (a, w), path)
    config = """
    name: "clf"
    platform: "pytorch_libtorch"
    max_batch_size: 4
    input [ { name: "weight" data_type: TYPE_FP32 dims: [ 3 ] },
            { name: "values" data_type: TYPE_FP32 dims: [ 3 ] } ]
    output [ { name: "scaled" data_type: TYPE_FP32 dims: [ 3 ] } ]
    """
    model = PytorchBackend(parse_config(config), tmp_path / "clf", 1)
    model.load()
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    weight = np.full((2, 3), 2.0, np.float32)
    np.testing.assert_allclose(_run(model, values=values, weight=weight)["scaled"], values * 2)
    model.unload()


LOAD_ERRORS = [
    ("pt", "pytorch", dict(out_type="TYPE_INT64"), "output 'OUTPUT__0' data_type"),
    ("pt", "pytorch", dict(dims="5"), "input"),
    ("pt2", "pytorch", dict(in_type="TYPE_INT32"), "input 'INPUT__0' data_type"),
    ("pt2", "pytorch", dict(dims="5"), "input 'INPUT__0' dims"),
    ("pt2", "pytorch", dict(mbs=0), "input 'INPUT__0' max_batch_size"),
    ("onnx", "onnxruntime", dict(in_type="TYPE_FP64"), "input 'INPUT__0' name"),
]


@pytest.mark.parametrize(("kind", "backend", "change", "field"), LOAD_ERRORS)
def test_config_mismatch_is_a_load_error_naming_the_field(tmp_path, kind, backend, change,
                                                         field):
    _save(kind, tmp_path)
    cls = OnnxBackend if kind == "onnx" else PytorchBackend
    text = _config(backend, "INPUT__0", ("OUTPUT__0", "OUTPUT__1"), **change)
    with pytest.raises(ServingError) as err:
        cls(parse_config(text), tmp_path / "clf", 1).load()
    assert field in err.value.message


ONNX_ERRORS = [
    (dict(in_type="TYPE_FP64"), True, "input 'features' data_type"),
    (dict(out_type="TYPE_INT32"), True, "output 'logits' data_type"),
    (dict(dims="6"), True, "input 'features' dims"),
    (dict(mbs=0), True, "input 'features' max_batch_size"),
    (dict(), False, "input 'features' max_batch_size"),
]


@pytest.mark.parametrize(("change", "dynamic", "field"), ONNX_ERRORS)
def test_onnx_load_errors(tmp_path, change, dynamic, field):
    _save("onnx", tmp_path, dynamic_batch=dynamic)
    text = _config("onnxruntime", "features", ("logits", "probs"), **change)
    with pytest.raises(ServingError) as err:
        OnnxBackend(parse_config(text), tmp_path / "clf", 1).load()
    assert field in err.value.message


def test_pt2_static_batch_cannot_batch(tmp_path):
    _save("pt2", tmp_path, dynamic_batch=False)
    text = _config("pytorch", "features", ("logits", "probs"))
    with pytest.raises(ServingError, match="input 'features' max_batch_size"):
        PytorchBackend(parse_config(text), tmp_path / "clf", 1).load()


def test_missing_model_file(tmp_path):
    text = _config("onnxruntime", "features", ("logits", "probs"))
    with pytest.raises(ServingError, match="not found"):
        OnnxBackend(parse_config(text), tmp_path / "clf", 1).load()
