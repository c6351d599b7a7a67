"""Live model updates through the server: a new version appears (poll mode, or an explicit
RepositoryModelLoad) while several client threads keep sending; no request fails and every
client sees the old version's outputs, then only the new one's. A broken version keeps the
working one serving and the index reports why."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.backend_helpers import write_model

# These tests drive the serving front (branch `serving`); they skip until it is merged.
serving_helpers = pytest.importorskip("tests.serving_helpers",
                                      reason="needs the serving front (serving branch)")
Server, infer_input = serving_helpers.Server, serving_helpers.infer_input

CONFIG = """
name: "ver"
backend: "python"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "VERSION" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
dynamic_batching { }
"""

MODEL = '''
import time

import numpy as np
from serving.python_model import InferenceResponse, PythonModel, Tensor

VERSION = {version}


class Versioned(PythonModel):
    def initialize(self, args):
        super().initialize(args)
        time.sleep(0.3)  # a load that takes a while: traffic must keep flowing meanwhile
        {broken}

    def execute(self, requests):
        time.sleep(0.01)
        return [InferenceResponse([Tensor("VERSION", np.full(
            (r.inputs()[0].as_numpy().shape[0], 1), VERSION, np.int32))]) for r in requests]
'''


def _add_version(repo: Path, version: int, broken: bool = False) -> None:
    """Write a version folder next door, then move it in at once (what a deploy does)."""
    staging = repo.parent / f"staging-{version}"
    source = MODEL.format(version=version,
                          broken="raise RuntimeError('bad weights')" if broken else "")
    (staging / str(version)).mkdir(parents=True)
    (staging / str(version) / "model.py").write_text(source)
    shutil.move(str(staging / str(version)), str(repo / "ver" / str(version)))


class Load:
    """Client threads calling the model in a loop, recording versions seen and failures."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = url
        self.seen: list[list[int]] = [[] for _ in range(threads)]
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, index: int) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        x = infer_input("X", np.zeros((1, 1), np.float32), "FP32")
        while not self.stop.is_set():
            try:
                result = client.infer("ver", [x])
                self.seen[index].append(int(result.as_numpy("VERSION")[0, 0]))
            except Exception as e:  # every failure counts
                self.failures.append(repr(e))
        client.close()

    def wait_for(self, version: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(s and s[-1] == version for s in self.seen):
                return
            time.sleep(0.05)
        raise AssertionError(f"clients never all saw version {version}")

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


@pytest.mark.parametrize("mode", ["poll", "explicit"])
def test_reload_under_load_loses_no_request(tmp_path: Path, mode: str) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "ver", CONFIG, {"model.py": MODEL.format(version=1, broken="")})
    args = ["--model-control-mode", mode, "--metrics-port", "0"]
    args += ["--repository-poll-secs", "0.2"] if mode == "poll" else ["--load-model", "ver"]
    server = Server(repo, tmp_path / "server.log", *args, module="launcher.cli")
    client = grpcclient.InferenceServerClient(server.url)
    load = Load(server.url)
    try:
        load.wait_for(1)
        time.sleep(0.3)
        _add_version(repo, 2)
        if mode == "explicit":
            client.load_model("ver")
        load.wait_for(2)
        time.sleep(0.3)
        _add_version(repo, 3, broken=True)
        if mode == "explicit":
            with pytest.raises(Exception, match="bad weights"):
                client.load_model("ver")
        else:
            _wait_reason(client, "bad weights")
        time.sleep(0.5)
    finally:
        load.finish()
    index = client.get_model_repository_index().models
    client.close()
    assert server.stop() == 0, server.text()
    assert load.failures == [], load.failures[:5]
    for seen in load.seen:
        assert seen[0] == 1 and seen[-1] == 2
        switch = seen.index(2)
        assert set(seen[:switch]) == {1} and set(seen[switch:]) == {2}
    served = [m for m in index if m.name == "ver"]
    assert [m.version for m in served] == ["2"] and "bad weights" in served[0].reason


def _wait_reason(client: grpcclient.InferenceServerClient, fragment: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if any(fragment in m.reason for m in client.get_model_repository_index().models):
            return
        time.sleep(0.1)
    raise AssertionError(f"the index never reported {fragment!r}")


def test_request_holding_a_replaced_version_goes_to_the_new_one(tmp_path: Path) -> None:
    """The race a reload opens: a request looked up the old version just before the swap."""
    from serving.manager import ModelManager
    from serving.repository import ModelRepository
    from serving.types import InferRequest
    from tests.backend_helpers import CollectSink

    repo = tmp_path / "repo"
    write_model(repo, "ver", CONFIG, {"model.py": MODEL.format(version=1, broken="")})
    manager = ModelManager(ModelRepository(repo), "explicit")
    manager.load("ver")
    _, old = manager.get("ver")
    _add_version(repo, 2)
    manager.load("ver")
    assert old.retired
    sink = CollectSink()
    request = InferRequest("ver", "", {"X": np.zeros((1, 1), np.float32)})
    manager.submit(old, request, sink)
    assert int(sink.outputs()["VERSION"][0, 0]) == 2
    assert request.model_version == "2"
    manager.close()
