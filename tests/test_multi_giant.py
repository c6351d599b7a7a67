"""Two giant models in one server, each in its own engine process and world: a tp=2 Llama and a
pp=2 GPT-2 answer token-identical to transformers, at the same time. A SIGKILLed rank (a worker,
or the engine process itself) fails only its model: in-flight and new requests get UNAVAILABLE
naming the model and the rank, the other model keeps serving, the dead model's processes exit
within 30 s (measured), and a RepositoryModelLoad brings it back."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from serving.cli import add_llm_model
from tests.checkpoints import make_checkpoint, reference_generate
from tests.engine_helpers import Stream, exit_times, generate, rank_pids
from tests.serving_helpers import Server

LIMIT_S = 30.0
PROMPTS = [[5, 9, 20, 31, 77, 8], [3], [12, 13, 14, 15, 16, 17, 18]]
NEW = 8
LONG = 240  # tokens: still generating when a rank is killed


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ckpt")
    return {"llama": make_checkpoint(tmp / "llama", "llama", seed=1),
            "gpt2": make_checkpoint(tmp / "gpt2", "gpt2", seed=2)}


@pytest.fixture(scope="module")
def refs(models: dict[str, Path]) -> dict[str, list[list[int]]]:
    out = {name: reference_generate(path, PROMPTS + [[1, 2, 3]], NEW)[0]
           for name, path in models.items()}
    out["llama-long"] = reference_generate(models["llama"], [[4, 5, 6]], 60)[0]
    return out


@pytest.fixture(scope="module")
def server(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("multi-giant")
    repo = tmp / "repo"
    add_llm_model(repo, "llama", models["llama"], tp=2, pp=1, extra={"num_blocks": "64"})
    add_llm_model(repo, "gpt2", models["gpt2"], tp=1, pp=2, extra={"num_blocks": "64"})
    srv = Server(repo, tmp / "server.log", "--model-control-mode", "explicit", "--load-model",
                 "llama", "--load-model", "gpt2", "--metrics-port", "0", module="launcher.cli",
                 timeout_s=180)
    yield srv
    assert srv.stop() == 0, srv.text()[-3000:]


def _check_all(url: str, refs: dict[str, list[list[int]]], names: tuple[str, ...]) -> None:
    """Every prompt on every model at once (threads), streaming and not: equal to the refs."""
    got: dict[tuple[str, int, bool], list[int]] = {}

    def one(name: str, i: int, stream: bool) -> None:
        if stream:
            s = Stream(url, name, PROMPTS[i], NEW)
            assert s.finish() is None
            s.close()
            got[(name, i, stream)] = s.ids
        else:
            got[(name, i, stream)] = generate(url, name, PROMPTS[i], NEW)

    threads = [threading.Thread(target=one, args=(n, i, s)) for n in names
               for i in range(len(PROMPTS)) for s in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (name, i, stream), ids in sorted(got.items()):
        assert ids == refs[name][i], (name, i, stream)
    assert len(got) == len(threads)


def test_two_giant_models_match_transformers(server: Server, refs) -> None:
    _check_all(server.url, refs, ("llama", "gpt2"))
    llama, gpt2 = rank_pids(server.text(), "llama"), rank_pids(server.text(), "gpt2")
    assert len(llama) == 2 and len(gpt2) == 2 and not set(llama) & set(gpt2)
    assert server.proc.pid not in llama + gpt2  # rank 0 of each is its own engine process
    client = grpcclient.InferenceServerClient(server.url)
    assert client.is_model_ready("llama") and client.is_model_ready("gpt2")
    assert client.is_server_ready()
    client.close()


def _kill_while_streaming(server: Server, victim_model: str, rank: int) -> tuple[str, float]:
    """SIGKILL `rank` of `victim_model` while it streams; the stream's error and the seconds
    until the model's engine process and every other rank of it exited."""
    pids = rank_pids(server.text(), victim_model)
    stream = Stream(server.url, victim_model, [1, 2, 3], LONG)
    assert stream.next()[1] is None
    t0 = time.monotonic()
    os.kill(pids[rank], signal.SIGKILL)
    error = stream.finish(LIMIT_S)  # never a hang
    stream.close()
    assert error is not None and len(stream.ids) < LONG, stream.ids
    times = exit_times([p for p in pids if p != pids[rank]], t0, LIMIT_S)
    print(f"SIGKILL {victim_model} rank {rank}: stream error after it; "
          + ", ".join(f"pid {p} exited in {s:.2f} s" for p, s in times.items()))
    return error, max(times.values())


def _unavailable(url: str, model: str) -> str:
    client = grpcclient.InferenceServerClient(url)
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, [])
    client.close()
    assert info.value.status() == "StatusCode.UNAVAILABLE", info.value
    return info.value.message()


def test_killed_worker_fails_only_its_model(server: Server, refs) -> None:
    other = Stream(server.url, "llama", [4, 5, 6], 60)  # keeps streaming through the kill
    error, slowest = _kill_while_streaming(server, "gpt2", rank=1)
    assert "gpt2" in error and "rank 1" in error and "SIGKILL" in error, error
    assert slowest < LIMIT_S
    message = _unavailable(server.url, "gpt2")
    assert "gpt2" in message and "rank 1" in message and "SIGKILL" in message, message
    assert other.finish() is None
    other.close()
    assert other.ids == refs["llama-long"][0]
    client = grpcclient.InferenceServerClient(server.url)
    assert not client.is_model_ready("gpt2") and client.is_model_ready("llama")
    assert client.is_server_live()
    client.load_model("gpt2")  # a reload brings it back, in a fresh engine process
    assert client.is_model_ready("gpt2")
    client.close()
    _check_all(server.url, refs, ("llama", "gpt2"))


def test_killed_engine_process_fails_only_its_model(server: Server, refs) -> None:
    pids = rank_pids(server.text(), "llama")
    result: list = []

    def unary() -> None:  # in flight (not streaming) when rank 0 dies
        try:
            result.append(generate(server.url, "llama", [7, 8], LONG))
        except InferenceServerException as e:
            result.append(e)

    t = threading.Thread(target=unary)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)
    t.join(LIMIT_S)
    assert not t.is_alive(), "the in-flight request hangs"
    err = result[0]
    assert isinstance(err, InferenceServerException), result
    assert err.status() == "StatusCode.UNAVAILABLE", err
    assert "llama" in err.message() and "rank 0" in err.message(), err.message()
    assert "SIGKILL" in err.message(), err.message()
    times = exit_times(pids[1:], t0, LIMIT_S)
    print(f"SIGKILL llama engine process (rank 0): in-flight request answered after "
          f"{time.monotonic() - t0:.2f} s; rank 1 exited in {max(times.values()):.2f} s")
    assert "rank 0" in _unavailable(server.url, "llama")
    assert generate(server.url, "gpt2", PROMPTS[0], NEW) == refs["gpt2"][0]
    client = grpcclient.InferenceServerClient(server.url)
    client.load_model("llama")
    client.close()
    assert generate(server.url, "llama", PROMPTS[2], NEW) == refs["llama"][2]
