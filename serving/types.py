"""The contract between the protocol front, the schedulers and the backends.

Tensors travel as numpy arrays (BYTES as object arrays of `bytes`). A backend answers each
request through its `ResponseSink`: one response for ordinary models, any number followed by a
final flag for decoupled (streaming) models.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tritonclient.grpc import model_config_pb2


class ServingError(Exception):
    """An error with a gRPC status name (e.g. "INVALID_ARGUMENT") and a message for the client."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class InferRequest:
    model_name: str
    model_version: str
    inputs: dict[str, np.ndarray]
    id: str = ""
    requested_outputs: list[str] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    timeout_us: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    unary: bool = False  # ModelInfer: the client takes exactly one response (no stream)
    arrival_ns: int = field(default_factory=time.monotonic_ns)
    compute_start_ns: int = 0  # set by the backend when execution starts (0: at arrival)


@dataclass
class InferResponse:
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    error: ServingError | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


class ResponseSink(Protocol):
    """Where a backend sends a request's responses; thread-safe."""

    def send(self, response: InferResponse | None, final: bool) -> None:
        """Deliver one response (None with final=True ends a decoupled stream)."""
        ...


class Backend(ABC):
    """One loaded version of one model."""

    def __init__(self, config: model_config_pb2.ModelConfig, model_dir: Path,
                 version: int) -> None:
        self.config = config
        self.model_dir = model_dir
        self.version = version

    @abstractmethod
    def load(self) -> None:
        """Load weights and start whatever the model needs; raise ServingError on failure."""

    @abstractmethod
    def submit(self, request: InferRequest, sink: ResponseSink) -> None:
        """Accept one request; responses go to `sink`, possibly from another thread."""

    def ready(self) -> bool:
        return True

    def tokenizer(self) -> Any | None:
        """The model's tokenizer (runtime.tokenizer.Tokenizer), for fronts that render chat
        templates or count tokens; None for models without one."""
        return None

    def max_model_len(self) -> int | None:
        """The longest sequence (prompt + generated tokens) a generative model takes."""
        return None

    def failure(self) -> str | None:
        """A fatal, unrecoverable error (e.g. a dead rank); the server then exits non-zero."""
        return None

    def stats(self) -> dict[str, Any]:
        """Backend-specific figures (e.g. KV-cache blocks) for logs and metrics."""
        return {}

    def unload(self) -> None:
        """Release resources once in-flight requests have finished."""
        return None
