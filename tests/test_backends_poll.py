"""The repository poller on a real directory: new, changed, removed and unchanged models map to
load, reload, unload and nothing; a failed load is reported and retried on the next change."""

from __future__ import annotations

import os
from pathlib import Path

from serving.poll import RepositoryPoller, model_signature
from serving.types import ServingError


class _Repo:
    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / "config.pbtxt").is_file())

    def model_dir(self, name: str) -> Path:
        return self.root / name


class _Manager:
    """Records what the poller asks for; loading a model named 'bad' fails."""

    def __init__(self, root: Path) -> None:
        self.repository = _Repo(root)
        self.calls: list[str] = []

    def load(self, name: str) -> None:
        self.calls.append(f"load {name}")
        if name == "bad":
            raise ServingError("INVALID_ARGUMENT", "bad config")

    def unload(self, name: str) -> None:
        self.calls.append(f"unload {name}")


def _model(root: Path, name: str, version: int = 1, body: str = "x") -> None:
    (root / name / str(version)).mkdir(parents=True, exist_ok=True)
    (root / name / "config.pbtxt").write_text(f'name: "{name}"')
    (root / name / str(version) / "model.py").write_text(body)


def test_poller_follows_the_repository(tmp_path: Path) -> None:
    _model(tmp_path, "a")
    _model(tmp_path, "b")
    manager = _Manager(tmp_path)
    poller = RepositoryPoller(manager, period_s=3600)
    poller.mark_loaded()
    assert poller.poll_once() == []
    _model(tmp_path, "a", version=2)            # new version folder: reload
    _model(tmp_path, "c")                       # new model: load
    (tmp_path / "b" / "config.pbtxt").unlink()  # gone: unload
    assert poller.poll_once() == ["unload b", "load a", "load c"]
    assert poller.poll_once() == []
    _model(tmp_path, "bad")
    assert poller.poll_once() == ["load bad failed: bad config"]
    assert poller.poll_once() == []  # not retried until it changes again
    _model(tmp_path, "bad", body="fixed")
    assert poller.poll_once()[0].startswith("load bad")


def test_signature_sees_content_and_mtime_changes(tmp_path: Path) -> None:
    _model(tmp_path, "m")
    first = model_signature(tmp_path / "m")
    path = tmp_path / "m" / "1" / "model.py"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = model_signature(tmp_path / "m")
    (tmp_path / "m" / "config.pbtxt").write_text('name: "m" max_batch_size: 4')
    assert len({first, second, model_signature(tmp_path / "m")}) == 3
