"""Test support for engine processes: rank pids from the server log, exit timing, and token-id
requests through tritonclient (streaming and not)."""

from __future__ import annotations

import queue
import re
import time

import psutil
import tritonclient.grpc as grpcclient

from tests.reliability_support import ids_inputs

LOADED_RE = r"model {name} version {version}: .* rank pids \[([\d, ]+)\]"


def rank_pids(log_text: str, name: str, version: int | str = r"\d+") -> list[int]:
    """Pids of a loaded giant model's ranks (rank 0 = its engine process first), newest load."""
    found = re.findall(LOADED_RE.format(name=re.escape(name), version=version), log_text)
    assert found, f"no load line for {name} version {version}:\n{log_text[-3000:]}"
    return [int(p) for p in found[-1].split(",")]


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for its parent counts: it runs nothing any more)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def exit_times(pids: list[int], t0: float, limit_s: float) -> dict[int, float]:
    """Seconds from t0 until each pid exited (asserts all did within limit_s)."""
    times: dict[int, float] = {}
    deadline = t0 + limit_s
    while len(times) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            if pid not in times and gone(pid):
                times[pid] = time.monotonic() - t0
        time.sleep(0.05)
    left = [p for p in pids if p not in times]
    assert not left, f"pids {left} still running {limit_s} s after t0"
    return times


def generate(url: str, model: str, prompt: list[int], max_tokens: int) -> list[int]:
    """Non-streaming generation: the generated token ids."""
    c = grpcclient.InferenceServerClient(url)
    try:
        return c.infer(model, ids_inputs(prompt, max_tokens)).as_numpy("output_ids").tolist()
    finally:
        c.close()


class Stream:
    """One streaming generation on its own tritonclient stream; `ids` grows as tokens come."""

    def __init__(self, url: str, model: str, prompt: list[int], max_tokens: int) -> None:
        self.q: queue.Queue = queue.Queue()
        self.ids: list[int] = []
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(lambda result, error: self.q.put((result, error)))
        self.client.async_stream_infer(model, ids_inputs(prompt, max_tokens, stream=True))

    def next(self, timeout_s: float = 60.0) -> tuple[bool, str | None]:
        """(final, error message) of the next response; its tokens are added to `ids`."""
        result, error = self.q.get(timeout=timeout_s)
        if error is not None:
            return True, str(error)
        self.ids += result.as_numpy("output_ids").tolist()
        return result.get_response().parameters["triton_final_response"].bool_param, None

    def finish(self, timeout_s: float = 60.0) -> str | None:
        """Read to the end; the error message, if the stream ended with one."""
        while True:
            final, error = self.next(timeout_s)
            if final:
                return error

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()
