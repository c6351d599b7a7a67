"""The in-process path behind the same EngineClient interface: `serve` under torchrun (rank 0
serves with the engine in a thread, rank 1 follows step plans) and `engine_mode thread` next to
an engine-process model. Both answer token-identical to transformers; a second in-process model
is refused with a reason; a dead rank of an in-process model is fatal to the server (its world
is the server's own), and then the other model's engine process goes down with it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from serving.cli import add_llm_model
from tests import cluster
from tests.checkpoints import make_checkpoint, reference_generate
from tests.engine_helpers import exit_times, generate, ids_inputs, rank_pids
from tests.serving_helpers import READY_RE, ROOT, Server

PROMPT = [4, 9, 33, 2]
NEW = 8
LIMIT_S = 30.0


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama", seed=5)
    return path, reference_generate(path, [PROMPT], NEW)[0][0]


def _wait_ready(proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> str:
    deadline = time.monotonic() + timeout_s
    while not (m := READY_RE.search(log.read_text())):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    return f"localhost:{m.group(2)}"


def _torchrun_serve(repo: Path, log: Path) -> subprocess.Popen:
    """`shardserve serve` as 2 ranks under torchrun, in a process session of its own."""
    cmd = [cluster.PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "launcher.cli", "serve", "--model-repository", str(repo), "--grpc-port", "0",
               "--http-port", "0",
           "--metrics-port", "0"]
    return subprocess.Popen(cmd, cwd=ROOT, env=cluster.env_for_ranks(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # noqa: SIM115


def test_serve_under_torchrun_uses_the_in_process_engine(tmp_path: Path, llama) -> None:
    model, ref = llama
    repo = tmp_path / "repo"
    add_llm_model(repo, "llm", model, tp=2, extra={"num_blocks": "32"})
    log = tmp_path / "torchrun.log"
    proc = _torchrun_serve(repo, log)
    try:
        url = _wait_ready(proc, log)
        assert generate(url, "llm", PROMPT, NEW) == ref
        text = log.read_text()
        assert "(in-process engine" in text
        pids = rank_pids(text, "llm")
        assert len(pids) == 1  # only rank 0 is known: the launcher owns the others
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(LIMIT_S)


def test_thread_mode_next_to_engine_process(tmp_path: Path, llama) -> None:
    model, ref = llama
    repo = tmp_path / "repo"
    add_llm_model(repo, "inproc", model, tp=2, extra={"num_blocks": "32", "engine_mode": "thread"})
    add_llm_model(repo, "inproc2", model, extra={"num_blocks": "32", "engine_mode": "thread"})
    add_llm_model(repo, "proc", model, tp=2, extra={"num_blocks": "32"})
    srv = Server(repo, tmp_path / "server.log", "--model-control-mode", "explicit",
                 "--load-model", "inproc", "--load-model", "proc", "--metrics-port", "0",
                 module="launcher.cli", timeout_s=180)
    try:
        assert generate(srv.url, "inproc", PROMPT, NEW) == ref
        assert generate(srv.url, "proc", PROMPT, NEW) == ref
        client = grpcclient.InferenceServerClient(srv.url)
        with pytest.raises(InferenceServerException, match="already drives a giant model"):
            client.load_model("inproc2")
        client.close()
        inproc, proc = rank_pids(srv.text(), "inproc"), rank_pids(srv.text(), "proc")
        assert inproc[0] == srv.proc.pid and proc[0] != srv.proc.pid
        t0 = time.monotonic()
        os.kill(inproc[1], signal.SIGKILL)
        assert srv.proc.wait(LIMIT_S) == 1, srv.text()[-3000:]
        exit_times(proc, t0, LIMIT_S)  # the engine process follows its server
        assert "rank 1 exited with code -9 (SIGKILL)" in srv.text(), srv.text()[-3000:]
    finally:
        srv.stop()


def test_sigterm_under_torchrun_drains_the_in_flight_stream(tmp_path: Path, llama) -> None:
    """torchrun forwards SIGTERM to every rank: the worker keeps following rank 0, which lets the
    streaming request finish token-exact, then stops the world and exits 0."""
    import queue

    model, _ = llama
    long = 40
    ref = reference_generate(model, [PROMPT], long)[0][0]
    repo = tmp_path / "repo"
    add_llm_model(repo, "llm", model, tp=2, extra={"num_blocks": "32"})
    log = tmp_path / "torchrun.log"
    proc = _torchrun_serve(repo, log)
    try:
        url = _wait_ready(proc, log)
        responses: queue.Queue = queue.Queue()
        c = grpcclient.InferenceServerClient(url)
        c.start_stream(lambda result, error: responses.put((result, error)))
        c.async_stream_infer("llm", ids_inputs(PROMPT, long, stream=True))
        tokens: list[int] = []
        result, error = responses.get(timeout=60)
        assert error is None, f"{error}\n{log.read_text()[-3000:]}"
        tokens += result.as_numpy("output_ids").ravel().tolist()
        proc.send_signal(signal.SIGTERM)  # torchrun's own pid: it signals both ranks
        final = False
        while not final:
            result, error = responses.get(timeout=60)
            assert error is None, error
            out = result.as_numpy("output_ids")
            tokens += [] if out is None else out.ravel().tolist()
            final = result.get_response().parameters["triton_final_response"].bool_param
        c.stop_stream()
        c.close()
        assert tokens == ref
        proc.wait(LIMIT_S)  # torchrun itself reports the signal it got with a non-zero status
        text = log.read_text()
        assert "in-flight requests finished" in text and "shardserve stopped (exit 0)" in text
        assert "UNAVAILABLE" not in text, text[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
