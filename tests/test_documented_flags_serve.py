"""`shardserve serve` flags the docs name, each shown to have its effect on a real server
subprocess (python models only, so each server starts in seconds): `--host`, `--auth-token`,
`--no-exit-on-error`, `--workers`, `--no-metrics` and `--max-concurrent-rpcs`."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient

from tests.backend_helpers import write_model
from tests.reliability_support import ECHO, ECHO_CONFIG, add_echo, echo_inputs, expect_error, start
from tests.serving_helpers import READY_RE, Server

HOST = "127.0.0.2"  # a loopback address other than the default 127.0.0.1
TOKEN, ENV_TOKEN = "flag-token-1", "env-token-2"
X = np.arange(3, dtype=np.float32)
BROKEN_MODEL = '''
from serving.python_model import PythonModel


class Broken(PythonModel):
    def initialize(self, args):
        raise RuntimeError("broken model refuses to initialize")

    def execute(self, requests):
        return []
'''
# execute() marks that it started, then holds its instance thread until RELEASE exists
HOLD_MODEL = '''
import time
import uuid
from pathlib import Path

import numpy as np

from serving.python_model import InferenceResponse, PythonModel, Tensor


class Hold(PythonModel):
    def execute(self, requests):
        Path({started!r}, f"started-{{uuid.uuid4().hex}}").write_text("started")
        deadline = time.monotonic() + 120
        while not Path({release!r}).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return [InferenceResponse([Tensor("OUT", np.zeros(1, np.float32))]) for _ in requests]
'''
# initialize() marks that it started, then holds the loading thread until RELEASE exists
SLOW_MODEL = '''
import time
from pathlib import Path

from serving.python_model import PythonModel


class Slow(PythonModel):
    def initialize(self, args):
        Path({started!r}).write_text("started")
        deadline = time.monotonic() + 120
        while not Path({release!r}).exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def execute(self, requests):
        return []
'''


def _repo(root: Path) -> Path:
    """echo, broken (fails to load) and slow (loads only once released)."""
    add_echo(root, instances=1)
    write_model(root, "broken", ECHO_CONFIG.format(name="broken", instances=1, extra=""),
                {"model.py": BROKEN_MODEL})
    write_model(root, "slow", ECHO_CONFIG.format(name="slow", instances=1, extra=""),
                {"model.py": SLOW_MODEL.format(started=str(root / "slow-started"),
                                               release=str(root / "slow-release"))})
    return root


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _url(server: Server) -> tuple[str, int]:
    """(host, port) from the server's own ready line."""
    m = READY_RE.search(server.text())
    assert m, server.text()
    return m.group(1), int(m.group(2))


def _metrics_port(server: Server, host: str) -> int:
    marker = f"metrics on http://{host}:"
    line = next(line for line in server.text().splitlines() if marker in line)
    return int(line.split(marker)[1].split("/")[0])


def _ipv4(ip: str) -> str:
    """'::ffff:127.0.0.2' (gRPC may bind an IPv4-mapped address) -> '127.0.0.2'."""
    mapped = getattr(ipaddress.ip_address(ip), "ipv4_mapped", None)
    return str(mapped) if mapped else ip


def _refused(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex((host, port)) != 0


@pytest.fixture(scope="module")
def flagged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`--host 127.0.0.2 --auth-token T --workers 1 --no-exit-on-error`, with a different
    token in $SHARDSERVE_AUTH_TOKEN (the flag must win), loading echo and broken at start."""
    tmp = tmp_path_factory.mktemp("serve-flags")
    repo = _repo(tmp / "repo")
    with _env("SHARDSERVE_AUTH_TOKEN", ENV_TOKEN):
        srv = start(repo, tmp / "server.log", "--host", HOST, "--auth-token", TOKEN,
                    "--workers", "1", "--no-exit-on-error", "--model-control-mode", "explicit",
                    "--load-model", ECHO, "--load-model", "broken")
    srv.repo = repo
    yield srv
    assert srv.stop() == 0, srv.text()[-3000:]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The same repository with default flags (but `--no-metrics`), loading only echo."""
    tmp = tmp_path_factory.mktemp("serve-defaults")
    repo = _repo(tmp / "repo")
    srv = start(repo, tmp / "server.log", "--model-control-mode", "explicit",
                "--load-model", ECHO, "--no-metrics")
    srv.repo = repo
    yield srv
    assert srv.stop() == 0, srv.text()[-3000:]


def _auth() -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}"}


def test_host_flag_moves_grpc_and_metrics(flagged: Server) -> None:
    """Every listening socket is on --host; gRPC and metrics answer there and nowhere else."""
    host, port = _url(flagged)
    assert host == HOST
    listening = [c.laddr for c in psutil.Process(flagged.proc.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and {_ipv4(a.ip) for a in listening} == {HOST}, listening
    with grpcclient.InferenceServerClient(f"{HOST}:{port}") as c:
        assert c.is_server_live(headers=_auth())
    assert _refused("127.0.0.1", port)
    metrics = _metrics_port(flagged, HOST)
    with urllib.request.urlopen(f"http://{HOST}:{metrics}/metrics", timeout=30) as r:
        assert b"nv_inference_request_success" in r.read()
    assert _refused("127.0.0.1", metrics)


def test_auth_token_flag_is_required_and_wins_over_the_environment(flagged: Server) -> None:
    _, port = _url(flagged)
    with grpcclient.InferenceServerClient(f"{HOST}:{port}") as c:
        expect_error(lambda: c.is_server_live(), "UNAUTHENTICATED")
        expect_error(lambda: c.is_server_live(headers={"authorization": f"Bearer {ENV_TOKEN}"}),
                     "UNAUTHENTICATED")
        got = c.infer(ECHO, echo_inputs(X), headers=_auth()).as_numpy("OUT")
        assert got.tolist() == (2 * X + 1).tolist()


def test_no_exit_on_error_keeps_serving(flagged: Server, tmp_path: Path) -> None:
    """With the flag a failed startup model is reported and the others serve; without it the
    same startup exits with status 1."""
    _, port = _url(flagged)
    with grpcclient.InferenceServerClient(f"{HOST}:{port}") as c:
        assert c.is_model_ready(ECHO, headers=_auth())
        assert not c.is_model_ready("broken", headers=_auth())
        index = {m["name"]: m for m in c.get_model_repository_index(headers=_auth(),
                                                                    as_json=True)["models"]}
        assert "refuses to initialize" in index["broken"]["reason"], index["broken"]
    assert "startup load failed" in flagged.text()
    with pytest.raises(RuntimeError, match="server exited with 1") as info:
        start(flagged.repo, tmp_path / "exits.log", "--model-control-mode", "explicit",
              "--load-model", ECHO, "--load-model", "broken")
    assert "refuses to initialize" in str(info.value)


def _load_slow_and_infer(url: str, repo: Path, headers: dict[str, str]) -> bool:
    """Load `slow` (it holds its loading thread until released) and, once its initialize has
    started, send one echo request: was it answered while the load was held?"""
    (repo / "slow-started").unlink(missing_ok=True)
    (repo / "slow-release").unlink(missing_ok=True)
    loaded = threading.Event()
    answered = threading.Event()

    def load() -> None:
        with grpcclient.InferenceServerClient(url) as c:
            c.load_model("slow", headers=headers)
        loaded.set()

    def infer() -> None:
        with grpcclient.InferenceServerClient(url) as c:
            assert c.infer(ECHO, echo_inputs(X), headers=headers).as_numpy("OUT").size == 3
        answered.set()

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    deadline = time.monotonic() + 60
    while not (repo / "slow-started").exists():
        assert time.monotonic() < deadline and loader.is_alive(), "slow never started loading"
        time.sleep(0.05)
    client = threading.Thread(target=infer, daemon=True)
    client.start()
    during = answered.wait(3.0)  # free workers answer in milliseconds
    assert not loaded.is_set()
    (repo / "slow-release").write_text("go")
    loader.join(60)
    client.join(60)
    assert loaded.is_set() and answered.is_set()
    return during


def test_workers_flag_bounds_request_threads(flagged: Server, plain: Server) -> None:
    """`--workers 1`: while the only worker thread is busy loading a model, an inference
    request waits for it; with the default 64 workers the same request is answered at once."""
    _, port = _url(flagged)
    assert not _load_slow_and_infer(f"{HOST}:{port}", flagged.repo, _auth())
    assert _load_slow_and_infer(plain.url, plain.repo, {})


def test_no_metrics_flag(plain: Server) -> None:
    """`--no-metrics`: no metrics endpoint; the server listens on its gRPC and HTTP ports
    only (the flagged server, without it, also listens on a metrics port: see above)."""
    assert "metrics on http://" not in plain.text()
    ports = {c.laddr.port for c in psutil.Process(plain.proc.pid).net_connections("inet")
             if c.status == psutil.CONN_LISTEN}
    assert ports == {_url(plain)[1], plain.http_port}, ports


def test_max_concurrent_rpcs_alone(tmp_path: Path) -> None:
    """`--max-concurrent-rpcs 2` with every other limit at its default: while two inference
    calls are held inside the model, a third call of any kind (health included) is refused by
    gRPC with RESOURCE_EXHAUSTED; once they finish, calls are accepted again."""
    repo = tmp_path / "repo"
    gate = tmp_path / "gate"
    gate.mkdir()
    write_model(repo, "hold", ECHO_CONFIG.format(name="hold", instances=2, extra=""),
                {"model.py": HOLD_MODEL.format(started=str(gate), release=str(gate / "go"))})
    srv = start(repo, tmp_path / "server.log", "--max-concurrent-rpcs", "2")
    results: list[float] = []

    def held() -> None:
        with grpcclient.InferenceServerClient(srv.url) as c:
            results.append(float(c.infer("hold", echo_inputs(X)).as_numpy("OUT")[0]))

    try:
        calls = [threading.Thread(target=held, daemon=True) for _ in range(2)]
        for t in calls:
            t.start()
        deadline = time.monotonic() + 60
        while len(list(gate.glob("started-*"))) < 2:
            assert time.monotonic() < deadline, "the two calls never reached the model"
            time.sleep(0.05)
        with grpcclient.InferenceServerClient(srv.url) as c:
            expect_error(lambda: c.is_server_live(), "RESOURCE_EXHAUSTED",
                         "Concurrent RPC limit exceeded")
            expect_error(lambda: c.infer("hold", echo_inputs(X)), "RESOURCE_EXHAUSTED",
                         "Concurrent RPC limit exceeded")
            (gate / "go").write_text("go")
            for t in calls:
                t.join(60)
            assert results == [0.0, 0.0]
            assert c.is_server_live()
    finally:
        (gate / "go").write_text("go")
        assert srv.stop() == 0, srv.text()[-3000:]
