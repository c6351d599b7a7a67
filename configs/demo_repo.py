"""The built-in demo model repository and the serving demo.

    python -m configs.demo_repo build REPO        # write the demo repository
    python -m configs.demo_repo run [REPO]        # build, serve, stream requests, stop

The repository holds a giant model next to ordinary ones:

- `demo_llm`: a small random Llama with a tokenizer trained offline (configs/demo.py), tp=2, pp=2
  (four ranks in an engine process of its own); its checkpoint sits in version folder 1;
- `preprocess` (python, a Triton-style `TritonPythonModel`): tidies the user's text into the
  prompt and asks for streaming;
- `postprocess` (python, the typed `PythonModel` base class): uppercases each streamed chunk;
- `demo_chat` (ensemble): preprocess -> demo_llm -> postprocess, the LLM's tokens streamed
  through to the client.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from configs.demo import build_demo_model

DEMO_MODEL = "demo_llm"
ENSEMBLE = "demo_chat"
ROOT = Path(__file__).resolve().parent.parent
READY_RE = re.compile(r"shardserve ready: gRPC on [\w.]+:(\d+)")

PREPROCESS_PY = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """The user's text -> the prompt (whitespace tidied), streaming on, generate to max_tokens."""

    def execute(self, requests):
        out = []
        for r in requests:
            text = pb_utils.get_input_tensor_by_name(r, "TEXT").as_numpy().reshape(-1)[0]
            prompt = " ".join(text.decode("utf-8").split())
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("PROMPT", np.array([prompt.encode("utf-8")], dtype=object)),
                pb_utils.Tensor("STREAM", np.array([True])),
                pb_utils.Tensor("IGNORE_EOS", np.array([True]))]))
        return out
'''

POSTPROCESS_PY = '''
import numpy as np

from serving.python_model import InferenceResponse, PythonModel, Tensor


class Model(PythonModel):
    """Each streamed chunk of generated text, uppercased (so the step's work shows)."""

    def execute(self, requests):
        out = []
        for r in requests:
            chunk = b"".join(r.inputs()[0].as_numpy().ravel().tolist()).decode("utf-8")
            out.append(InferenceResponse([
                Tensor("TEXT", np.array([chunk.upper().encode("utf-8")], dtype=object))]))
        return out
'''

PREPROCESS_CONFIG = """name: "preprocess"
backend: "python"
max_batch_size: 0
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "PROMPT" data_type: TYPE_STRING dims: [ 1 ] },
         { name: "STREAM" data_type: TYPE_BOOL dims: [ 1 ] },
         { name: "IGNORE_EOS" data_type: TYPE_BOOL dims: [ 1 ] } ]
"""

POSTPROCESS_CONFIG = """name: "postprocess"
backend: "python"
max_batch_size: 0
input [ { name: "CHUNK" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
"""

ENSEMBLE_CONFIG = """name: "demo_chat"
platform: "ensemble"
max_batch_size: 0
input [ { name: "text" data_type: TYPE_STRING dims: [ 1 ] },
        { name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "answer" data_type: TYPE_STRING dims: [ 1 ] } ]
ensemble_scheduling { step [
  { model_name: "preprocess" model_version: -1 input_map { key: "TEXT" value: "text" }
    output_map { key: "PROMPT" value: "prompt" } output_map { key: "STREAM" value: "stream" }
    output_map { key: "IGNORE_EOS" value: "ignore_eos" } },
  { model_name: "demo_llm" model_version: -1 input_map { key: "text_input" value: "prompt" }
    input_map { key: "max_tokens" value: "max_tokens" } input_map { key: "stream" value: "stream" }
    input_map { key: "ignore_eos" value: "ignore_eos" }
    output_map { key: "text_output" value: "chunk" } },
  { model_name: "postprocess" model_version: -1 input_map { key: "CHUNK" value: "chunk" }
    output_map { key: "TEXT" value: "answer" } }
] }
"""


def _write(entry: Path, config: str, files: dict[str, str]) -> None:
    (entry / "1").mkdir(parents=True, exist_ok=True)
    (entry / "config.pbtxt").write_text(config, encoding="utf-8")
    for name, text in files.items():
        (entry / "1" / name).write_text(text.lstrip(), encoding="utf-8")


def build_demo_repo(repo: Path, tp: int = 2, pp: int = 2) -> Path:
    """Write (or refresh) the demo repository; the checkpoint is built once and reused."""
    from serving.backends.llm_io import llm_model_config
    from serving.config import config_text

    entry = repo / DEMO_MODEL
    build_demo_model(entry / "1")
    cfg = llm_model_config(DEMO_MODEL, ".", tp, pp, "fp32", {"num_blocks": 256})
    (entry / "config.pbtxt").write_text(config_text(cfg), encoding="utf-8")
    _write(repo / "preprocess", PREPROCESS_CONFIG, {"model.py": PREPROCESS_PY})
    _write(repo / "postprocess", POSTPROCESS_CONFIG, {"model.py": POSTPROCESS_PY})
    _write(repo / ENSEMBLE, ENSEMBLE_CONFIG, {})
    return repo


def start_server(repo: Path, log: Path) -> tuple[subprocess.Popen, int]:
    """`shardserve serve` on a free port; returns once it logs that it is ready."""
    cmd = [sys.executable, "-m", "launcher.cli", "serve", "--model-repository", str(repo),
           "--grpc-port", "0", "--http-port", "0"]
    out = open(log, "w")  # noqa: SIM115 (the server process holds it)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        m = READY_RE.search(log.read_text())
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not become ready:\n{log.read_text()}")


def _tensor(name: str, value: Any, datatype: str) -> Any:
    import tritonclient.grpc as grpcclient

    t = grpcclient.InferInput(name, list(value.shape), datatype)
    t.set_data_from_numpy(value)
    return t


def stream_request(port: int, model: str, inputs: list[Any], output: str, label: str) -> str:
    """Send one streaming request with tritonclient; print the text as it arrives."""
    import tritonclient.grpc as grpcclient

    q: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(f"localhost:{port}")
    client.start_stream(lambda result, error: q.put((result, error)))
    client.async_stream_infer(model, inputs, enable_empty_final_response=True)
    print(f"{label:<24}", end="", flush=True)
    text = ""
    while True:
        result, error = q.get(timeout=120)
        if error is not None:
            raise RuntimeError(f"{model}: {error}")
        chunk = result.as_numpy(output)
        if chunk is not None and chunk.size:
            piece = b"".join(chunk.ravel().tolist()).decode("utf-8", "replace")
            text += piece
            print(piece, end="", flush=True)
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    print()
    client.stop_stream()
    client.close()
    return text


def demo_requests(port: int, prompt: str, max_tokens: int) -> bool:
    """Stream from the giant model, then through the ensemble; True if the ensemble's text is
    the giant model's text, uppercased by the postprocess step."""
    import numpy as np

    tidy = " ".join(prompt.split())
    direct = stream_request(port, DEMO_MODEL, [
        _tensor("text_input", np.array([tidy.encode()], dtype=object), "BYTES"),
        _tensor("max_tokens", np.array([max_tokens], np.int32), "INT32"),
        _tensor("stream", np.array([True]), "BOOL"),
        _tensor("ignore_eos", np.array([True]), "BOOL")], "text_output",
        f"{DEMO_MODEL} >")
    chained = stream_request(port, ENSEMBLE, [
        _tensor("text", np.array([prompt.encode()], dtype=object), "BYTES"),
        _tensor("max_tokens", np.array([max_tokens], np.int32), "INT32")], "answer",
        f"{ENSEMBLE} (ensemble) >")
    return bool(direct) and chained == direct.upper()


def run_demo(repo: Path, prompt: str, max_tokens: int) -> int:
    build_demo_repo(repo)
    proc, port = start_server(repo, repo.parent / "demo-server.log")
    ok = False
    try:
        print(f"demo: server ready on localhost:{port}; {DEMO_MODEL} at tp=2, pp=2 in its own "
              f"engine process, next to preprocess, postprocess (python) and {ENSEMBLE} "
              "(ensemble)")
        print(f"{'prompt >':<24}{prompt}")
        ok = demo_requests(port, prompt, max_tokens)
    finally:
        proc.terminate()
        code = proc.wait(60)
    print(f"demo: ensemble output {'matches' if ok else 'DOES NOT match'} the giant model's, "
          f"uppercased; server stopped (exit {code})")
    return code or (0 if ok else 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("repo", type=Path)
    r = sub.add_parser("run")
    r.add_argument("repo", type=Path, nargs="?", default=Path(".demo/repo"))
    r.add_argument("--prompt", default="The giant model   is served")
    r.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    if args.cmd == "build":
        print(build_demo_repo(args.repo))
        return 0
    return run_demo(args.repo.resolve(), args.prompt, args.max_tokens)


if __name__ == "__main__":
    sys.exit(main())
