"""Triton `config.pbtxt` -> `model_config_pb2.ModelConfig` (protobuf text format), checked so
that a bad config fails at load with a message naming the file and the field."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from serving.types import ServingError

# Triton platform names -> our backend names (a platform implies its backend)
PLATFORMS = {
    "pytorch_libtorch": "pytorch",
    "onnxruntime_onnx": "onnxruntime",
    "ensemble": "ensemble",
}


def _bad(where: str, field: str, message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", f"{where}: field '{field}': {message}")


def parse_config(text: str, where: str) -> mc.ModelConfig:
    """Parse config.pbtxt text; `where` names the file in errors."""
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as e:
        raise ServingError("INVALID_ARGUMENT", f"{where}: {e}") from None


def parse_json_config(text: str, where: str) -> mc.ModelConfig:
    """A config given as JSON (RepositoryModelLoad's "config" parameter, as in Triton)."""
    try:
        return json_format.Parse(text, mc.ModelConfig())
    except json_format.ParseError as e:
        raise ServingError("INVALID_ARGUMENT", f"{where}: {e}") from None


def backend_name(config: mc.ModelConfig) -> str:
    return config.backend or PLATFORMS.get(config.platform, config.platform)


def _check_tensors(config: mc.ModelConfig, where: str, kind: str) -> None:
    seen: set[str] = set()
    for i, t in enumerate(getattr(config, kind)):
        field = f"{kind}[{i}]"
        if not t.name:
            raise _bad(where, f"{field}.name", "empty")
        if t.name in seen:
            raise _bad(where, f"{field}.name", f"'{t.name}' appears twice")
        seen.add(t.name)
        if t.data_type == mc.TYPE_INVALID:
            raise _bad(where, f"{field}.data_type", f"missing for '{t.name}'")
        if any(d == 0 or d < -1 for d in t.dims):
            raise _bad(where, f"{field}.dims", f"{list(t.dims)} for '{t.name}': each dimension "
                       "must be -1 (variable) or positive")


def validate_config(config: mc.ModelConfig, model_name: str, where: str) -> mc.ModelConfig:
    """Fill the name from the folder and check the fields every backend relies on."""
    if not config.name:
        config.name = model_name
    elif config.name != model_name:
        raise _bad(where, "name", f"'{config.name}' differs from the model folder "
                   f"'{model_name}'")
    if not backend_name(config):
        raise _bad(where, "backend", "neither backend nor platform is set")
    if config.max_batch_size < 0:
        raise _bad(where, "max_batch_size", f"{config.max_batch_size} is negative")
    _check_tensors(config, where, "input")
    _check_tensors(config, where, "output")
    policy = config.version_policy
    if policy.WhichOneof("policy_choice") == "latest" and policy.latest.num_versions < 1:
        raise _bad(where, "version_policy.latest.num_versions", "must be >= 1")
    return config


def load_config(model_dir: Path) -> mc.ModelConfig:
    """Read, parse and validate `<model_dir>/config.pbtxt`."""
    path = model_dir / "config.pbtxt"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ServingError("NOT_FOUND", f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ServingError("INVALID_ARGUMENT", f"{path}: cannot read: {e}") from None
    return validate_config(parse_config(text, str(path)), model_dir.name, str(path))


def config_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


# --- parameters { key: ... value: { string_value: ... } } --------------------------------------
def param(config: mc.ModelConfig, key: str, default: str | None = None) -> str | None:
    p = config.parameters.get(key)
    return p.string_value if p is not None else default


def int_param(config: mc.ModelConfig, key: str, default: int | None = None,
              minimum: int | None = None) -> int | None:
    """An integer parameter; an error names the model and the parameter."""
    text = param(config, key)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ServingError("INVALID_ARGUMENT", f"model '{config.name}': parameter '{key}' must "
                           f"be an integer, got {text!r}") from None
    if minimum is not None and value < minimum:
        raise ServingError("INVALID_ARGUMENT", f"model '{config.name}': parameter '{key}' must "
                           f"be >= {minimum}, got {value}")
    return value


def bool_param(config: mc.ModelConfig, key: str, default: bool) -> bool:
    """A true/false parameter (also 1/0, yes/no); an error names the model and the parameter."""
    text = (param(config, key) or "").strip().lower()
    if not text:
        return default
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ServingError("INVALID_ARGUMENT", f"model '{config.name}': parameter '{key}' must be "
                       f"true or false, got {text!r}")


def set_param(config: mc.ModelConfig, key: str, value: object) -> None:
    config.parameters[key].string_value = str(value)
