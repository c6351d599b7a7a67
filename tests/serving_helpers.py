"""Test support for the serving front: small real backends, a server subprocess started on a
free port, and tritonclient input helpers.

`python -m tests.serving_helpers serve ...` is `shardserve serve` with the test backends
registered (test_identity, test_repeat, test_fail_load)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from serving.backends import BACKENDS
from serving.types import Backend, InferRequest, InferResponse, ResponseSink, ServingError

ROOT = Path(__file__).resolve().parent.parent
READY_RE = re.compile(r"shardserve ready: gRPC on ([\w.]+):(\d+)")
HTTP_RE = re.compile(r"shardserve ready: gRPC on [^,]*, HTTP on ([\w.]+):(\d+)")


class IdentityBackend(Backend):
    """Output i = input i (config order); parameter delay_ms sleeps before answering."""

    def load(self) -> None:
        p = self.config.parameters.get("delay_ms")
        self.delay = int(p.string_value) / 1000 if p is not None else 0.0

    def submit(self, request: InferRequest, sink: ResponseSink) -> None:
        if self.delay:
            time.sleep(self.delay)
        outputs = {o.name: request.inputs[i.name]
                   for i, o in zip(self.config.input, self.config.output, strict=False)
                   if i.name in request.inputs}
        sink.send(InferResponse(outputs=outputs), True)


class RepeatBackend(Backend):
    """Decoupled: for IN = [n], sends n responses OUT = [k] from its own thread, then a
    flag-only final response; stops early when the request is cancelled."""

    def load(self) -> None:
        self.cancelled = 0

    def submit(self, request: InferRequest, sink: ResponseSink) -> None:
        n = int(request.inputs["IN"].reshape(-1)[0])
        if n < 0:
            raise ServingError("INVALID_ARGUMENT", f"IN must be >= 0, got {n}")
        threading.Thread(target=self._run, args=(n, request, sink), daemon=True).start()

    def _run(self, n: int, request: InferRequest, sink: ResponseSink) -> None:
        for k in range(n):
            if request.cancelled.is_set():
                sink.send(InferResponse(error=ServingError("CANCELLED", "cancelled")), True)
                return
            sink.send(InferResponse(outputs={"OUT": np.array([k], dtype=np.int32)}), False)
            time.sleep(0.01)
        sink.send(None, True)


class FailLoadBackend(Backend):
    def load(self) -> None:
        raise ServingError("INVALID_ARGUMENT", f"model '{self.config.name}' refuses to load")

    def submit(self, request: InferRequest, sink: ResponseSink) -> None:
        raise AssertionError("never loaded")


TEST_BACKENDS = {"test_identity": IdentityBackend, "test_repeat": RepeatBackend,
                 "test_fail_load": FailLoadBackend}


class Server:
    """A `serve` subprocess on a free port; its log goes to a file for checks."""

    def __init__(self, repo: Path, log: Path, *args: str, module: str = "tests.serving_helpers",
                 timeout_s: float = 120.0) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", module, "serve", "--model-repository", str(repo),
               "--grpc-port", "0", "--http-port", "0", *args]
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT)
        self.url = self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log.read_text()
            m = READY_RE.search(text)
            if m:
                h = HTTP_RE.search(text)
                self.http_port = int(h.group(2)) if h else None
                return f"localhost:{m.group(2)}"
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   f"{self.log.read_text()}")
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout_s}s:\n{self.log.read_text()}")

    def text(self) -> str:
        return self.log.read_text()

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


def infer_input(name: str, array: np.ndarray, datatype: str) -> Any:
    import tritonclient.grpc as grpcclient

    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def main() -> int:
    from launcher.cli import main as cli_main

    BACKENDS.update(TEST_BACKENDS)
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
