"""Reload of a giant model without downtime: while client threads stream and call it
continuously, RepositoryModelLoad starts version 2 (another random checkpoint) in a new engine
process next to version 1, traffic moves, version 1's in-flight requests finish and its engine
process and ranks exit. No request fails; answers switch from version 1's tokens to version
2's. A failed load (version 3 with a corrupt checkpoint) keeps version 2 serving and says why."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from serving.cli import add_llm_model
from tests.checkpoints import make_checkpoint, reference_generate
from tests.engine_helpers import Stream, generate, gone, rank_pids
from tests.serving_helpers import Server

PROMPT = [5, 17, 42, 8]
NEW = 10
THREADS = 4


class Traffic:
    """Client threads sending requests back to back (even threads stream, odd ones don't);
    every answer is kept with its start and end time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.results: list[tuple[int, float, float, list[int] | str]] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(THREADS)]
        for t in self.threads:
            t.start()

    def _one(self, i: int) -> list[int] | str:
        try:
            if i % 2:
                return generate(self.url, "llm", PROMPT, NEW)
            s = Stream(self.url, "llm", PROMPT, NEW)
            error = s.finish()
            s.close()
            return error or s.ids
        except InferenceServerException as e:
            return f"{e.status()}: {e.message()}"

    def _run(self, i: int) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            out = self._one(i)
            with self._lock:
                self.results.append((i, t0, time.monotonic(), out))

    def finish(self) -> list[tuple[int, float, float, list[int] | str]]:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        return sorted(self.results, key=lambda r: r[1])


def _wait_for_answers(traffic: Traffic, n: int) -> None:
    start = len(traffic.results)
    deadline = time.monotonic() + 60
    while len(traffic.results) < start + n and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def setup(tmp_path: Path):
    repo = tmp_path / "repo"
    v1 = make_checkpoint(tmp_path / "v1", "llama", seed=11)
    add_llm_model(repo, "llm", v1, tp=2, copy=True, extra={"num_blocks": "64"})
    srv = Server(repo, tmp_path / "server.log", "--model-control-mode", "explicit",
                 "--load-model", "llm", "--metrics-port", "0", module="launcher.cli",
                 timeout_s=180)
    yield srv, repo, v1
    assert srv.stop() == 0, srv.text()[-3000:]


def test_reload_under_load_switches_versions_without_failures(setup, tmp_path: Path) -> None:
    server, repo, v1 = setup
    ref1 = reference_generate(v1, [PROMPT], NEW)[0][0]
    v2 = make_checkpoint(tmp_path / "v2", "llama", seed=12)
    ref2 = reference_generate(v2, [PROMPT], NEW)[0][0]
    assert ref1 != ref2
    old = rank_pids(server.text(), "llm", 1)
    client = grpcclient.InferenceServerClient(server.url)
    traffic = Traffic(server.url)
    _wait_for_answers(traffic, 6)
    make_checkpoint(repo / "llm" / "2", "llama", seed=12)  # same weights as v2
    t_load = time.monotonic()
    client.load_model("llm")  # returns once version 2 serves and version 1 has drained
    t_loaded = time.monotonic()
    assert all(gone(p) for p in old), old  # version 1's engine process and ranks exited
    new = rank_pids(server.text(), "llm", 2)
    assert not set(new) & set(old)
    _wait_for_answers(traffic, 6)

    broken = repo / "llm" / "3"  # a failed load keeps version 2 serving
    broken.mkdir()
    (broken / "config.json").write_text((v2 / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InferenceServerException) as info:
        client.load_model("llm")
    why = info.value.message()
    assert "llm" in why and "rank" in why, why
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["llm"].state == "READY" and "rank" in index["llm"].reason, index["llm"]
    _wait_for_answers(traffic, 6)
    results = traffic.finish()
    assert client.is_model_ready("llm")
    client.close()

    failed = [r for r in results if isinstance(r[3], str)]
    assert not failed, failed[:5]
    assert {tuple(r[3]) for r in results} <= {tuple(ref1), tuple(ref2)}
    for i in range(THREADS):  # per client: version 1's answers, then version 2's, never back
        seq = [r[3] == ref2 for r in results if r[0] == i]
        assert seq == sorted(seq), (i, seq)
    assert any(r[3] == ref1 for r in results) and any(r[3] == ref2 for r in results)
    assert all(r[3] == ref2 for r in results if r[1] > t_loaded)
    assert all(r[3] == ref1 for r in results if r[2] < t_load)
    print(f"reload under load: {len(results)} requests, 0 failed; load took "
          f"{t_loaded - t_load:.1f} s; version 1 pids {old} gone, version 2 pids {new}")
