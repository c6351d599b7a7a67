"""Model control mode "poll": watch the repository and load, reload or unload models when their
folders change, as Triton's `--model-control-mode=poll --repository-poll-secs=N` does.

A change is any difference in a model's config.pbtxt or in the names, sizes and modification
times of the files under its version folders. A reload loads the new version(s) while the old
ones keep serving (the manager swaps them once the load succeeded; a failed load keeps the old
ones and records why).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Protocol

from serving.types import ServingError

log = logging.getLogger(__name__)


class _Repository(Protocol):
    def names(self) -> list[str]: ...

    def model_dir(self, name: str) -> Path: ...


class _Manager(Protocol):
    repository: _Repository

    def load(self, name: str) -> None: ...

    def unload(self, name: str) -> None: ...


def model_signature(model_dir: Path) -> str:
    """A digest of everything in a model folder that a reload depends on."""
    digest = hashlib.sha256()
    config = model_dir / "config.pbtxt"
    if config.is_file():
        digest.update(config.read_bytes())
    for path in sorted(model_dir.rglob("*")):
        if path.is_file() and path.name != "config.pbtxt" and "__pycache__" not in path.parts:
            stat = path.stat()
            digest.update(f"{path.relative_to(model_dir)}:{stat.st_size}:{stat.st_mtime_ns}\n"
                          .encode())
    return digest.hexdigest()


class RepositoryPoller:
    """Brings the loaded models in line with the repository every `period_s` seconds."""

    def __init__(self, manager: _Manager, period_s: float = 15.0) -> None:
        self.manager = manager
        self.period_s = period_s
        self._seen: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def snapshot(self) -> dict[str, str]:
        repo = self.manager.repository
        return {name: model_signature(repo.model_dir(name)) for name in repo.names()}

    def mark_loaded(self) -> None:
        """Record the current repository as what is loaded (after the startup load)."""
        self._seen = self.snapshot()

    def poll_once(self) -> list[str]:
        """Apply the changes since the last poll; return what was done, for logs and tests."""
        current = self.snapshot()
        actions = []
        for name in sorted(set(self._seen) - set(current)):
            actions.append(self._apply("unload", name))
        for name, signature in sorted(current.items()):
            if self._seen.get(name) != signature:
                actions.append(self._apply("load", name))
        self._seen = current
        return actions

    def _apply(self, action: str, name: str) -> str:
        try:
            getattr(self.manager, action)(name)
            return f"{action} {name}"
        except ServingError as err:
            log.error("poll: %s of model %s failed: %s", action, name, err.message)
            return f"{action} {name} failed: {err.message}"

    def start(self) -> RepositoryPoller:
        self._thread = threading.Thread(target=self._run, name="repository-poll", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                for line in self.poll_once():
                    log.info("poll: %s", line)
            except Exception:  # a bad poll must not stop later ones
                log.exception("repository poll failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
