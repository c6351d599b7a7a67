"""A model repository in Triton's layout: `<repo>/<model>/config.pbtxt` plus numeric version
folders. Model names are single path components that resolve inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from serving.config import load_config
from serving.types import ServingError

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class ModelRepository:
    """Read-only view of one repository directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ServingError("NOT_FOUND", f"model repository {root} is not a directory")

    def model_dir(self, name: str) -> Path:
        """The folder of model `name`; names that could leave the repository are refused."""
        if not NAME_RE.match(name or "") or name in (".", ".."):
            raise ServingError("INVALID_ARGUMENT", f"invalid model name {name!r}: use letters, "
                               "digits, '_', '-' and '.' (no path separators)")
        path = (self.root / name).resolve()
        if path.parent != self.root:
            raise ServingError("INVALID_ARGUMENT", f"model name {name!r} resolves outside the "
                               f"repository {self.root}")
        return path

    def names(self) -> list[str]:
        """Every model folder that holds a config.pbtxt, sorted."""
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and NAME_RE.match(p.name) and (p / "config.pbtxt").is_file())

    def exists(self, name: str) -> bool:
        return (self.model_dir(name) / "config.pbtxt").is_file()

    def config(self, name: str) -> mc.ModelConfig:
        path = self.model_dir(name)
        if not path.is_dir():
            raise ServingError("NOT_FOUND", f"model '{name}' is not in the repository "
                               f"{self.root}")
        return load_config(path)

    def versions(self, name: str) -> list[int]:
        """Numeric version folders of a model, ascending."""
        path = self.model_dir(name)
        return sorted(int(p.name) for p in path.iterdir()
                      if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def select_versions(config: mc.ModelConfig, available: list[int]) -> list[int]:
    """Versions to serve under the config's version_policy (default: the latest one)."""
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        chosen = list(available)
    elif kind == "specific":
        missing = [v for v in policy.specific.versions if v not in available]
        if missing:
            raise ServingError("NOT_FOUND", f"model '{config.name}': version_policy.specific "
                               f"names versions {missing} that have no folder")
        chosen = sorted(set(policy.specific.versions))
    else:
        n = policy.latest.num_versions if kind == "latest" else 1
        chosen = available[-n:]
    if not chosen:
        raise ServingError("NOT_FOUND", f"model '{config.name}' has no numeric version folder")
    return chosen
