"""The real NVIDIA Triton Inference Server 2.51 (CPU, python backend, from the nvidia-pytriton
wheel) as a differential oracle: start it on a model repository on free ports, send it the same
requests as shardserve and compare answers, statuses and bodies. Skips (pytest.skip) where it
cannot be installed; a Triton that installed but fails to start is an error, not a skip.

    repo = oracle_repo(tmp_path / "repo", ["add_sub", "llm_decoupled"])
    with running_oracle(repo, tmp_path / "triton.log") as triton:
        httpclient.InferenceServerClient(triton.http_url)      # "127.0.0.1:PORT"
        urllib.request.urlopen(triton.base_url + "/v2/health/ready")

The stub embeds the system Python (/usr/bin/python3 with Debian's python3-numpy): the server runs
without any virtualenv on PATH and with an empty LD_LIBRARY_PATH (a venv first on PATH makes the
stub answer with empty tensors), and not from the project root (see _launch).
Set SHARDSERVE_TRITON_ORACLE_VENV to choose the install folder.
"""

from __future__ import annotations

import fcntl
import os
import platform
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

PYTRITON_VERSION = "0.7.0"  # bundles tritonserver 2.51.0
ORACLE_MODELS = Path(__file__).resolve().parent / "oracle_models"
SYSTEM_PYTHON = Path("/usr/bin/python3")
DEFAULT_VENV = Path(os.environ.get("SHARDSERVE_TRITON_ORACLE_VENV", "/tmp/triton-oracle"))
PORT_CLASH = ("already in use", "Failed to start", "failed to start")


def _run(cmd: list[str], timeout_s: float) -> str:
    """Run a set-up command and return its stdout; raises on failure."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=True)
    return done.stdout.strip()


def _system_python_version() -> str | None:
    """'3.11' for the system python3 when it can import numpy (the stub needs both), else None."""
    probe = "import sys, numpy; print('%d.%d' % sys.version_info[:2])"
    try:
        return _run([str(SYSTEM_PYTHON), "-c", probe], 60)
    except (OSError, subprocess.SubprocessError):
        return None


def _server_dir(venv: Path) -> Path:
    """The pytriton/tritonserver folder inside `venv` (bin/, backends/, python_backend_stubs/)."""
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(_run([str(venv / "bin" / "python"), "-c", code], 60)) / "pytriton" / "tritonserver"


def _install(venv: Path) -> Path:
    """pip-install the wheel into `venv` (created from the system python) unless present."""
    if not (venv / "bin" / "python").exists():
        _run([str(SYSTEM_PYTHON), "-m", "venv", str(venv)], 600)
    server = _server_dir(venv)
    if not (server / "bin" / "tritonserver").exists():
        _run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps",
              f"nvidia-pytriton=={PYTRITON_VERSION}"], 1800)
    return server


def install_oracle(venv: Path = DEFAULT_VENV) -> Path:
    """Install the oracle once (under a file lock) and return its tritonserver folder; skips the
    calling test when this machine cannot run it."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip("the Triton oracle wheel is Linux x86_64 only")
    pyver = _system_python_version()
    if pyver is None:
        pytest.skip(f"the Triton oracle needs {SYSTEM_PYTHON} with numpy (apt python3-numpy)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            server = _install(venv)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or ""
            pytest.skip(f"cannot install nvidia-pytriton=={PYTRITON_VERSION}: {e} {detail[-500:]}")
        stub = server / "python_backend_stubs" / pyver / "triton_python_backend_stub"
        if not stub.exists():
            pytest.skip(f"the Triton oracle has no python backend stub for Python {pyver}")
        dest = server / "backends" / "python" / "triton_python_backend_stub"
        if not dest.exists() or dest.stat().st_size != stub.stat().st_size:
            shutil.copy2(stub, dest)
    return server


def _oracle_env() -> dict[str, str]:
    """This environment without virtualenvs (on PATH or active) and with no extra libraries."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH", "CONDA_PREFIX")}
    path = [p for p in env.get("PATH", "").split(os.pathsep)
            if p and not (Path(p).parent / "pyvenv.cfg").exists()]
    env["PATH"] = os.pathsep.join(path or ["/usr/local/bin", "/usr/bin", "/bin"])
    env["LD_LIBRARY_PATH"] = ""
    return env


def _free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 right now."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class TritonOracle:
    """A running tritonserver subprocess and its ports (all bound to 127.0.0.1)."""

    proc: subprocess.Popen
    log: Path
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def http_url(self) -> str:
        """HTTP address in tritonclient form (no scheme)."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """gRPC address in tritonclient form."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def base_url(self) -> str:
        """HTTP base URL for raw requests (urllib, http.client)."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus metrics endpoint."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def text(self) -> str:
        """The server log so far."""
        return self.log.read_text(errors="replace")

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (then SIGKILL after `timeout_s`) and return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _wait_ready(oracle: TritonOracle, timeout_s: float) -> bool:
    """Poll /v2/health/ready until 200; False when the process exited first; raises on a hang."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if oracle.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(oracle.base_url + "/v2/health/ready", timeout=5) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    oracle.stop()
    raise TimeoutError(f"Triton not ready after {timeout_s}s:\n{oracle.text()[-4000:]}")


def _launch(server: Path, repo: Path, log: Path, args: tuple[str, ...]) -> TritonOracle:
    """Start tritonserver on three fresh free ports, output to `log`. Exit timeout 10 s unless
    `args` sets another (a client left connected holds a stop for the default 30 s). It runs in
    the server folder: the stub imports from its working directory first, and in the project
    root it would pick up shardserve's own triton_python_backend_utils shim."""
    http, grpc, metrics = _free_ports(3)
    cmd = [str(server / "bin" / "tritonserver"), "--backend-directory", str(server / "backends"),
           "--model-repository", str(repo), "--http-address", "127.0.0.1",
           "--http-port", str(http), "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc),
           "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics),
           "--exit-timeout-secs", "10", *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=_oracle_env(), cwd=server, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return TritonOracle(proc, log, http, grpc, metrics)


def start_oracle(repo: Path, log: Path, *args: str, timeout_s: float = 300.0,
                 venv: Path = DEFAULT_VENV) -> TritonOracle:
    """Start the real Triton on `repo` (extra tritonserver flags in `args`, e.g.
    "--model-control-mode=explicit", "--load-model=*") and wait until it is ready; retries on a
    port clash, raises RuntimeError with the log when it exits for any other reason."""
    server = install_oracle(venv)
    for _ in range(3):
        oracle = _launch(server, Path(repo), Path(log), args)
        if _wait_ready(oracle, timeout_s):
            return oracle
        text = oracle.text()
        if not any(m in text for m in PORT_CLASH):
            raise RuntimeError(f"Triton exited with {oracle.proc.returncode}:\n{text[-4000:]}")
    raise RuntimeError(f"Triton could not bind free ports three times:\n{text[-4000:]}")


@contextmanager
def running_oracle(repo: Path, log: Path, *args: str, timeout_s: float = 300.0,
                   venv: Path = DEFAULT_VENV) -> Iterator[TritonOracle]:
    """`start_oracle` as a context manager that always stops the server."""
    oracle = start_oracle(repo, log, *args, timeout_s=timeout_s, venv=venv)
    try:
        yield oracle
    finally:
        oracle.stop()


def oracle_repo(dest: Path, names: Iterable[str] | None = None) -> Path:
    """Copy the oracle models (all, or those in `names`) from tests/oracle_models into `dest`
    and return it: the stub writes __pycache__ next to each model.py, so serve a copy."""
    dest.mkdir(parents=True, exist_ok=True)
    chosen = sorted(p.name for p in ORACLE_MODELS.iterdir() if p.is_dir()) if names is None \
        else list(names)
    for name in chosen:
        shutil.copytree(ORACLE_MODELS / name, dest / name,
                        ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    return dest
