"""The built-in demo model repository and the serving demo.

    python -m configs.demo_repo build REPO        # write REPO/demo_llm (tp=2, pp=2)
    python -m configs.demo_repo run [REPO]        # build, serve, stream one request, stop

The repository is self-contained: the demo checkpoint (a small random Llama with a tokenizer
trained offline, see configs/demo.py) sits in the model's version folder 1.
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

from configs.demo import build_demo_model

DEMO_MODEL = "demo_llm"
ROOT = Path(__file__).resolve().parent.parent
READY_RE = re.compile(r"shardserve ready: gRPC on [\w.]+:(\d+)")


def build_demo_repo(repo: Path, tp: int = 2, pp: int = 2) -> Path:
    """Write (or reuse) `<repo>/demo_llm` with config.pbtxt and the checkpoint in 1/."""
    from serving.backends.llm_io import llm_model_config
    from serving.config import config_text

    entry = repo / DEMO_MODEL
    build_demo_model(entry / "1")
    cfg = llm_model_config(DEMO_MODEL, ".", tp, pp, "fp32", {"num_blocks": 256})
    (entry / "config.pbtxt").write_text(config_text(cfg), encoding="utf-8")
    return repo


def start_server(repo: Path, log: Path) -> tuple[subprocess.Popen, int]:
    """`shardserve serve` on a free port; returns once it logs that it is ready."""
    cmd = [sys.executable, "-m", "launcher.cli", "serve", "--model-repository", str(repo),
           "--grpc-port", "0"]
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


def stream_request(port: int, prompt: str, max_tokens: int) -> str:
    """Send one streaming request with tritonclient; print text as it arrives."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    def tensor(name: str, value: np.ndarray, dt: str) -> grpcclient.InferInput:
        t = grpcclient.InferInput(name, list(value.shape), dt)
        t.set_data_from_numpy(value)
        return t

    inputs = [tensor("text_input", np.array([prompt.encode()], dtype=object), "BYTES"),
              tensor("max_tokens", np.array([max_tokens], np.int32), "INT32"),
              tensor("stream", np.array([True]), "BOOL")]
    q: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(f"localhost:{port}")
    client.start_stream(lambda result, error: q.put((result, error)))
    client.async_stream_infer(DEMO_MODEL, inputs)
    print(prompt, end="", flush=True)
    text = ""
    while True:
        result, error = q.get(timeout=120)
        if error is not None:
            raise RuntimeError(str(error))
        chunk = result.as_numpy("text_output")[0].decode("utf-8", "replace")
        text += chunk
        print(chunk, end="", flush=True)
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    print()
    client.stop_stream()
    client.close()
    return text


def run_demo(repo: Path, prompt: str, max_tokens: int) -> int:
    build_demo_repo(repo)
    proc, port = start_server(repo, repo.parent / "demo-server.log")
    try:
        print(f"demo: server ready on localhost:{port}; model {DEMO_MODEL} at tp=2, pp=2")
        stream_request(port, prompt, max_tokens)
    finally:
        proc.terminate()
        code = proc.wait(60)
    print(f"demo: server stopped (exit {code})")
    return code


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("repo", type=Path)
    r = sub.add_parser("run")
    r.add_argument("repo", type=Path, nargs="?", default=Path(".demo/repo"))
    r.add_argument("--prompt", default="The giant model is served")
    r.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    if args.cmd == "build":
        print(build_demo_repo(args.repo))
        return 0
    return run_demo(args.repo.resolve(), args.prompt, args.max_tokens)


if __name__ == "__main__":
    sys.exit(main())
