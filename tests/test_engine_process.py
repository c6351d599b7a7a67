"""Engine clients and engine processes: the in-process client and the engine-process client give
the same tokens as transformers, refuse bad requests, abort and free KV blocks, and shut down;
killing the server makes its engine processes and their ranks exit (parent-death watch); Ctrl-C
to the process group stops `serve` and `generate` cleanly (workers ignore SIGINT)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launcher.engine_process import EngineProcessClient
from runtime.engine_client import EngineClient, EngineStopped, InProcessClient
from runtime.types import EngineConfig, SamplingParams
from runtime.worker import EngineSpec
from serving.cli import add_llm_model
from tests.checkpoints import make_checkpoint, reference_generate
from tests.engine_helpers import exit_times, generate, rank_pids
from tests.serving_helpers import READY_RE, ROOT, Server

LIMIT_S = 30.0
PROMPTS = [[5, 9, 20, 31], [3], [12, 13, 14, 15, 16, 17]]
NEW = 8


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "gpt2", "gpt2", seed=3)


def _spec(model: Path) -> EngineSpec:
    return EngineSpec(str(model), tp=1, pp=2, engine=EngineConfig(num_blocks=32))


def _drive(client: EngineClient, until: set[str], timeout_s: float = 60.0
           ) -> tuple[dict[str, list[int]], dict[str, str], list[tuple[str, str, str]], dict]:
    """Receive batches until every id in `until` finished or was refused: tokens, finish
    reasons, refusals, the last stats."""
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    rejects: list[tuple[str, str, str]] = []
    stats: dict = {}
    deadline = time.monotonic() + timeout_s
    while until - set(reasons) - {r[0] for r in rejects}:
        assert time.monotonic() < deadline, (tokens, reasons)
        for batch in client.recv(0.5):
            stats = batch.stats
            rejects += batch.rejects
            for rid, token, finished, reason, _ in batch.tokens:
                if token is not None:
                    tokens.setdefault(rid, []).append(token)
                if finished:
                    reasons[rid] = reason or ""
    return tokens, reasons, rejects, stats


def _exercise(client: EngineClient, ref: list[list[int]]) -> None:
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        client.add(str(i), p, params)
    client.add("too-long", list(range(100)) * 3, params)
    client.add("long", [1, 2], SamplingParams(max_tokens=200, ignore_eos=True))
    tokens, reasons, rejects, _ = _drive(client, {"0", "1", "2", "too-long"})
    assert [tokens[str(i)] for i in range(len(PROMPTS))] == ref
    assert rejects[0][:2] == ("too-long", "INVALID_ARGUMENT") and "context" in rejects[0][2]
    client.abort("long")
    _, reasons, _, stats = _drive(client, {"long"})
    assert reasons["long"] == "abort"
    assert stats["free_blocks"] == stats["total_blocks"] == 32, stats  # freed at once
    client.request_stats()
    assert client.recv(5.0)[0].stats == stats
    client.shutdown()
    with pytest.raises(EngineStopped) as info:
        while True:
            client.recv(0.5)
    assert not info.value.failed
    client.close()


def test_process_and_in_process_clients_agree(gpt2: Path) -> None:
    from launcher.local import start_local_engine

    ref = reference_generate(gpt2, PROMPTS, NEW)[0]
    proc_client = EngineProcessClient.start(_spec(gpt2), "gpt2")
    assert proc_client.info.pids[0] == proc_client.proc.pid != os.getpid()
    _exercise(proc_client, ref)
    assert proc_client.proc.exitcode == 0
    in_proc = InProcessClient(start_local_engine(_spec(gpt2)), "gpt2")
    assert in_proc.info.pids[0] == os.getpid()
    _exercise(in_proc, ref)


def test_failed_start_names_the_rank(tmp_path: Path, gpt2: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((gpt2 / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(RuntimeError, match=r"rank 0: .*rank 1: "):
        EngineProcessClient.start(_spec(bad), "bad")


def _popen_session(args: list[str], log: Path) -> subprocess.Popen:
    """A shardserve command in a new session, so that a 'Ctrl-C' reaches its whole group; SIGINT
    at its default, as in a terminal (a runner in the background may have it ignored)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_server_killed_takes_engine_processes_down(tmp_path: Path, gpt2: Path) -> None:
    repo = tmp_path / "repo"
    add_llm_model(repo, "a", gpt2, tp=1, pp=2, extra={"num_blocks": "32"})
    add_llm_model(repo, "b", gpt2, tp=2, pp=1, extra={"num_blocks": "32"})
    srv = Server(repo, tmp_path / "server.log", "--metrics-port", "0", module="launcher.cli",
                 timeout_s=180)
    pids = rank_pids(srv.text(), "a") + rank_pids(srv.text(), "b")
    assert generate(srv.url, "a", [1, 2], 4) == generate(srv.url, "b", [1, 2], 4)
    t0 = time.monotonic()
    srv.proc.kill()
    srv.proc.wait()
    times = exit_times(pids, t0, LIMIT_S)
    print("server SIGKILLed: " + ", ".join(f"pid {p} exited in {s:.2f} s"
                                           for p, s in times.items()))
    srv.stop()


def test_ctrl_c_stops_serve_cleanly(tmp_path: Path, gpt2: Path) -> None:
    repo = tmp_path / "repo"
    add_llm_model(repo, "a", gpt2, tp=1, pp=2, extra={"num_blocks": "32"})
    log = tmp_path / "serve.log"
    proc = _popen_session(["serve", "--model-repository", str(repo), "--grpc-port", "0",
                           "--http-port", "0",
                           "--metrics-port", "0"], log)
    deadline = time.monotonic() + 180
    while not READY_RE.search(log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    pids = rank_pids(log.read_text(), "a")
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert proc.wait(LIMIT_S) == 0, log.read_text()[-3000:]
    exit_times(pids, t0, LIMIT_S)
    text = log.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]


@pytest.mark.parametrize("after_s", [1.0, 6.0])  # while the ranks start / while generating
def test_ctrl_c_stops_generate_cleanly(tmp_path: Path, gpt2: Path, after_s: float) -> None:
    ids = [a for i in range(64) for a in ("--token-ids", f"{i},2,3")]
    log = tmp_path / "generate.log"
    proc = _popen_session(["generate", "--model", str(gpt2), "--pp", "2", "--max-tokens", "250",
                           "--ignore-eos", *ids], log)
    deadline = time.monotonic() + 60
    while not psutil.Process(proc.pid).children():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    time.sleep(after_s)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(LIMIT_S) == 130, log.read_text()[-3000:]
    times = exit_times(workers, t0, LIMIT_S)
    print(f"generate Ctrl-C {after_s} s after start: exit 130 after "
          f"{time.monotonic() - t0:.2f} s; workers gone in {max(times.values()):.2f} s")
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
