"""Shared helpers for the backend tests: a collecting response sink and model-folder builders."""

from __future__ import annotations

import textwrap
import threading
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from serving.types import InferRequest, InferResponse


class CollectSink:
    """Collects a request's responses; `wait()` blocks until the final flag arrives."""

    def __init__(self) -> None:
        self.responses: list[InferResponse] = []
        self.finals = 0
        self.done = threading.Event()
        self.final_at = 0.0
        self._lock = threading.Lock()

    def send(self, response: InferResponse | None, final: bool) -> None:
        import time

        with self._lock:
            if response is not None:
                self.responses.append(response)
            if final:
                self.finals += 1
                self.final_at = time.monotonic()
                self.done.set()

    def wait(self, timeout: float = 20.0) -> list[InferResponse]:
        assert self.done.wait(timeout), "no final response"
        assert self.finals == 1, f"{self.finals} final responses"
        return self.responses

    def outputs(self, timeout: float = 20.0) -> dict[str, np.ndarray]:
        """The single successful response's outputs."""
        responses = self.wait(timeout)
        assert len(responses) == 1, responses
        if responses[0].error is not None:
            raise responses[0].error
        return responses[0].outputs

    def error(self, timeout: float = 20.0):
        responses = self.wait(timeout)
        assert len(responses) == 1 and responses[0].error is not None, responses
        return responses[0].error


def parse_config(text: str) -> mc.ModelConfig:
    return text_format.Parse(textwrap.dedent(text), mc.ModelConfig())


def write_model(repo: Path, name: str, config: str, files: dict[str, str | bytes],
                version: int = 1) -> Path:
    """Write `<repo>/<name>/config.pbtxt` and `<repo>/<name>/<version>/<file>`; return the dir."""
    model_dir = repo / name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(textwrap.dedent(config))
    for fname, content in files.items():
        path = model_dir / str(version) / fname
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(textwrap.dedent(content))
    return model_dir


def make_request(model: str, priority: int = 0, timeout_us: int = 0,
                 outputs: list[str] | None = None, **inputs: np.ndarray) -> InferRequest:
    return InferRequest(model_name=model, model_version="", inputs=inputs, priority=priority,
                        timeout_us=timeout_us, requested_outputs=outputs)
