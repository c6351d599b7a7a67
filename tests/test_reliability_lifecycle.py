"""Load-time integrity and shutdown: a truncated or corrupted shard fails RepositoryModelLoad
with an error naming the file while the server stays up; SIGTERM refuses new requests with
UNAVAILABLE, lets an in-flight stream finish, and exits 0 (or cancels what is left once the
grace period is over)."""

from __future__ import annotations

import queue
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient

from launcher.cli import main as shardserve
from serving.cli import add_llm_model
from tests.reliability_support import (
    ECHO,
    LLM,
    add_echo,
    descendants,
    echo_inputs,
    expect_error,
    ids_inputs,
    reference,
    start,
)
from tests.serving_helpers import Server

PROMPT = [11, 22, 33, 44, 55]
LONG = 58  # prompt + LONG = 63 < the context of 64


@pytest.fixture(scope="module")
def server(checkpoint_dir, tmp_path_factory: pytest.TempPathFactory):
    """Explicit control over a repository holding a good, a truncated and a corrupted shard
    folder of the same tp=2 model."""
    tmp = tmp_path_factory.mktemp("lifecycle")
    shards = tmp / "shards"
    assert shardserve(["shard", str(checkpoint_dir("llama")), str(shards), "--tp", "2",
                       "--no-progress"]) == 0
    broken = {"truncated": "rank-pp0-tp1.safetensors", "corrupted": "rank-pp0-tp0.safetensors"}
    for name in [LLM, *broken]:
        folder = tmp / f"shards-{name}"
        shutil.copytree(shards, folder)
        add_llm_model(tmp / "repo", name, folder, tp=2, extra={"max_model_len": "64",
                                                              "num_blocks": "16"})
    data = (shards / broken["truncated"]).read_bytes()
    (tmp / "shards-truncated" / broken["truncated"]).write_bytes(data[:len(data) // 2])
    path = tmp / "shards-corrupted" / broken["corrupted"]
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF  # one flipped bit pattern in the tensor data, header intact
    path.write_bytes(bytes(raw))
    srv = start(tmp / "repo", tmp / "server.log", "--model-control-mode", "explicit")
    srv.broken = broken
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


@pytest.mark.parametrize("name", ["truncated", "corrupted"])
def test_damaged_shard_is_named_at_load(server: Server, name: str) -> None:
    with grpcclient.InferenceServerClient(server.url) as c:
        message = expect_error(lambda: c.load_model(name), "INTERNAL",
                               server.broken[name])
        assert "sha256" in message or "size" in message, message
        assert not c.is_model_ready(name) and c.is_server_live()
        index = {m["name"]: m for m in c.get_model_repository_index(as_json=True)["models"]}
        assert server.broken[name] in index[name]["reason"]
    deadline = time.monotonic() + 20
    while descendants(server) and time.monotonic() < deadline:  # its ranks are gone
        time.sleep(0.2)
    assert not descendants(server)


def test_sigterm_drains_in_flight_stream(server: Server, checkpoint_dir) -> None:
    """Last in the module: it stops the server."""
    with grpcclient.InferenceServerClient(server.url) as c:
        c.load_model(LLM)
    ranks = descendants(server)
    assert ranks
    responses: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(server.url)
    c.start_stream(lambda result, error: responses.put((result, error)))
    c.async_stream_infer(LLM, ids_inputs(PROMPT, LONG, stream=True))
    first, error = responses.get(timeout=60)
    assert error is None, error
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while "shutting down: no new requests" not in server.text():
        assert time.monotonic() < deadline, server.text()[-2000:]
        time.sleep(0.02)
    with grpcclient.InferenceServerClient(server.url) as other:
        expect_error(lambda: other.infer(LLM, ids_inputs(PROMPT, 2)), "UNAVAILABLE",
                     "shutting down")
        assert not other.is_server_ready()
    tokens = first.as_numpy("output_ids").tolist()
    final = False
    while not final:
        result, error = responses.get(timeout=60)
        assert error is None, error
        tokens += result.as_numpy("output_ids").tolist()
        final = result.get_response().parameters["triton_final_response"].bool_param
    c.stop_stream()
    c.close()
    assert tokens == reference(checkpoint_dir("llama"), [PROMPT], LONG)[0]
    assert server.proc.wait(60) == 0, server.text()[-3000:]
    assert "in-flight requests finished" in server.text()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                   for p in ranks)


def test_grace_period_over_cancels_and_exits_zero(tmp_path: Path) -> None:
    add_echo(tmp_path / "repo")
    srv = start(tmp_path / "repo", tmp_path / "server.log", "--grace-period-s", "1")
    outcome: list = []

    def slow() -> None:
        with grpcclient.InferenceServerClient(srv.url) as c:
            try:
                outcome.append(c.infer(ECHO, echo_inputs(np.ones(2), delay_ms=3000)))
            except Exception as e:  # noqa: BLE001 (the outcome is checked below)
                outcome.append(e)

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0, srv.text()[-3000:]
    thread.join(30)
    assert time.monotonic() - t0 < 10
    assert "grace period over (1s)" in srv.text()
    assert len(outcome) == 1 and isinstance(outcome[0], Exception), outcome
    srv.stop()
