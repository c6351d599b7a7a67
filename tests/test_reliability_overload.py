"""Overload and KV exhaustion: bounded queues refuse with RESOURCE_EXHAUSTED while what they
hold is still running (the engine's waiting queue, a python model's max_queue_size, the front's
--max-inflight, and on a server of its own gRPC's --max-concurrent-rpcs with the other limits
out of the way), memory stays bounded under a sustained overload run, and more long generations
than the KV cache holds all finish token-exact. Limits are filled by held executions (a gate
file the test creates), not by timing."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.reliability_support import (
    ECHO,
    HANG_S,
    LLM,
    add_echo,
    build_repo,
    descendants,
    echo_inputs,
    held,
    ids_inputs,
    metric,
    reference,
    rss_mib,
    start,
    stream_tokens,
    wait_for,
)

NUM_BLOCKS = 12  # x 16 tokens: room for 4 of the KV test's 48-token sequences at a time
MAX_WAITING = 8
MAX_INFLIGHT = 32
MAX_RPCS = 40
LIMITED = "echo_limited"  # one instance, max_queue_size 2


@pytest.fixture(scope="module")
def server(checkpoint_dir, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("overload")
    repo = build_repo(tmp / "repo", checkpoint_dir("llama"), num_blocks=NUM_BLOCKS,
                      max_waiting=MAX_WAITING)
    add_echo(repo, LIMITED, instances=1,
             extra="dynamic_batching { default_queue_policy { max_queue_size: 2 } }")
    srv = start(repo, tmp / "server.log", "--max-inflight", str(MAX_INFLIGHT),
                "--max-concurrent-rpcs", str(MAX_RPCS))
    srv.ranks = descendants(srv)
    yield srv
    assert srv.stop() == 0, srv.text()[-3000:]


def call(url: str, model: str, inputs: list, **kw) -> tuple[str, tuple[float, float], object]:
    """(status, (start, end) on the monotonic clock, result or message) of one ModelInfer."""
    t0 = time.monotonic()
    with grpcclient.InferenceServerClient(url) as c:
        try:
            result = c.infer(model, inputs, client_timeout=HANG_S, **kw)
            return "OK", (t0, time.monotonic()), result
        except InferenceServerException as e:
            return str(e.status()).split(".")[-1], (t0, time.monotonic()), e.message()


def concurrently(n: int, fn) -> list:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(fn, range(n)))


def test_engine_queue_full_is_resource_exhausted(server, checkpoint_dir) -> None:
    """Refused at once, not after a wait: each refusal comes back while requests admitted
    before it are still generating."""
    prompts = [[3 + i % 3, 40, 41, 42 + i % 3] for i in range(24)]
    ref = reference(checkpoint_dir("llama"), prompts, 30)
    got = concurrently(24, lambda i: call(server.url, LLM, ids_inputs(prompts[i], 30)))
    rejected = [(span, m) for s, span, m in got if s == "RESOURCE_EXHAUSTED"]
    ok = [(i, span, r) for i, (s, span, r) in enumerate(got) if s == "OK"]
    assert len(ok) + len(rejected) == 24, [(s, m) for s, _, m in got if s != "OK"]
    assert rejected and ok, got
    waiting = re.compile(rf"model '{LLM}' is overloaded: {MAX_WAITING} requests already waiting")
    assert all(waiting.fullmatch(m) for _, m in rejected), rejected
    for (_, end), message in rejected:
        assert any(start < end < finish for _, (start, finish), _ in ok), (end, message)
    for i, _, result in ok:
        assert result.as_numpy("output_ids").tolist() == ref[i], i


def _hold_calls(pool: ThreadPoolExecutor, url: str, model: str, n: int, gate: Path) -> list:
    """n calls to an echo model, each held at `gate` once it executes; x = [k, k, k] for call
    k, so each answer can be checked."""
    return [pool.submit(call, url, model, echo_inputs(np.full(3, k, np.float32), gate=gate))
            for k in range(n)]


def _check_echoes(futures: list) -> None:
    for k, future in enumerate(futures):
        status, _, result = future.result(HANG_S)
        assert status == "OK", (k, result)
        np.testing.assert_array_equal(result.as_numpy("OUT"), np.full(3, 2 * k + 1))


def test_model_queue_full_is_resource_exhausted(server, tmp_path: Path) -> None:
    """One instance held, two requests queued: the model's queue (max_queue_size 2) is full."""
    gate = tmp_path / "gate"
    with ThreadPoolExecutor(3) as pool:
        running = _hold_calls(pool, server.url, LIMITED, 1, gate)
        wait_for("the held execution", lambda: held(gate) == 1)
        queued = _hold_calls(pool, server.url, LIMITED, 2, gate)
        wait_for("two queued", lambda: metric(server, "nv_inference_pending_request_count",
                                              model=LIMITED, version="1") == 2)
        for _ in range(3):
            status, _, message = call(server.url, LIMITED, echo_inputs(np.ones(3)))
            assert (status, message) == ("RESOURCE_EXHAUSTED", (
                f"Exceeds maximum queue size: model '{LIMITED}' priority level 1 already "
                "holds 2 requests (max_queue_size)"))
        assert not any(f.done() for f in running + queued)
        gate.touch()
        _check_echoes(running)
        _check_echoes(queued)


def test_front_inflight_limit_is_resource_exhausted(server, tmp_path: Path) -> None:
    """MAX_INFLIGHT requests held in flight (two executing, the rest queued at the model):
    one more is refused by the front, and all the held ones then finish."""
    gate = tmp_path / "gate"
    with ThreadPoolExecutor(MAX_INFLIGHT) as pool:
        calls = _hold_calls(pool, server.url, ECHO, MAX_INFLIGHT, gate)
        wait_for("all in flight", lambda: held(gate) == 2 and metric(
            server, "nv_inference_pending_request_count", model=ECHO,
            version="1") == MAX_INFLIGHT - 2)
        for _ in range(2):
            status, _, message = call(server.url, ECHO, echo_inputs(np.ones(3)))
            assert (status, message) == ("RESOURCE_EXHAUSTED", (
                f"the server already has {MAX_INFLIGHT} requests in flight (--max-inflight "
                f"{MAX_INFLIGHT}); retry later"))
        assert not any(f.done() for f in calls)
        gate.touch()
        _check_echoes(calls)
    status, _, result = call(server.url, ECHO, echo_inputs(np.ones(3)))  # room again
    assert status == "OK", result


def test_max_concurrent_rpcs_alone_refuses_calls(tmp_path: Path) -> None:
    """--max-concurrent-rpcs 4 with every other limit far away (--max-inflight 1024, no queue
    limit): four held calls fill it; a fifth call of any kind is refused by gRPC, and once
    they finish calls go through again."""
    add_echo(tmp_path / "repo")
    srv = start(tmp_path / "repo", tmp_path / "server.log", "--max-concurrent-rpcs", "4",
                "--max-inflight", "1024")
    gate = tmp_path / "gate"
    try:
        with ThreadPoolExecutor(4) as pool:
            calls = _hold_calls(pool, srv.url, ECHO, 4, gate)
            wait_for("four calls in flight", lambda: held(gate) == 2 and metric(
                srv, "nv_inference_pending_request_count", model=ECHO, version="1") == 2)
            status, _, message = call(srv.url, ECHO, echo_inputs(np.ones(3)))
            assert (status, message) == ("RESOURCE_EXHAUSTED", "Concurrent RPC limit exceeded!")
            with grpcclient.InferenceServerClient(srv.url) as c:
                with pytest.raises(InferenceServerException) as info:
                    c.is_server_live()
            assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED", info.value
            assert not any(f.done() for f in calls)
            gate.touch()
            _check_echoes(calls)
        status, _, result = call(srv.url, ECHO, echo_inputs(np.ones(3)))
        assert status == "OK", result
    finally:
        assert srv.stop() == 0, srv.text()[-3000:]


def _hammer(url: str, stop: threading.Event, counts: Counter, lock: threading.Lock,
            worker: int) -> None:
    """One overload client: rotates over the three models until told to stop."""
    x = np.full(16384, worker, dtype=np.float32)  # 64 KiB per echo request
    k = 0
    while not stop.is_set():
        k += 1
        model, inputs = [(LLM, ids_inputs([5 + worker % 50, 6, 7], 8)),
                         (LIMITED, echo_inputs(x[:4], delay_ms=20)),
                         (ECHO, echo_inputs(x, delay_ms=5))][k % 3]
        status, _, result = call(url, model, inputs)
        if status == "OK" and model != LLM:
            status = "OK" if result.as_numpy("OUT")[0] == 2 * worker + 1 else "WRONG"
        with lock:
            counts[status] += 1
            counts["sent"] += 1


def test_sustained_overload_memory_bounded(server, tmp_path: Path) -> None:
    """64 clients for 12 s against limits of 40 RPCs / 32 requests / 8 waiting: server RSS
    stays bounded, every call ends (none lost) with OK or RESOURCE_EXHAUSTED."""
    proc = psutil.Process(server.proc.pid)
    base = rss_mib(server)
    stop, lock, counts = threading.Event(), threading.Lock(), Counter()
    threads = [threading.Thread(target=_hammer, args=(server.url, stop, counts, lock, w))
               for w in range(64)]
    for t in threads:
        t.start()
    peak, t_end = base, time.monotonic() + 12
    while time.monotonic() < t_end:
        peak = max(peak, proc.memory_info().rss / 2**20)
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(150)
    assert not any(t.is_alive() for t in threads), "a client never got an answer"
    time.sleep(1.0)
    after = rss_mib(server)
    other = counts["sent"] - counts["OK"] - counts["RESOURCE_EXHAUSTED"]
    line = (f"overload: sent {counts['sent']}, ok {counts['OK']}, rejected "
            f"{counts['RESOURCE_EXHAUSTED']}, other {other}; server RSS base {base:.0f} MiB, "
            f"peak {peak:.0f} MiB, after {after:.0f} MiB")
    print("\n" + line)
    (tmp_path / "overload.txt").write_text(line)
    assert counts["OK"] + counts["RESOURCE_EXHAUSTED"] == counts["sent"], counts
    assert counts["RESOURCE_EXHAUSTED"] > 0 and counts["OK"] > 0, counts
    assert peak - base < 300, line
    assert after - base < 150, line
    with grpcclient.InferenceServerClient(server.url) as c:
        assert c.is_server_ready()


def test_kv_exhaustion_all_finish_exact(server, checkpoint_dir) -> None:
    """8 concurrent 48-token sequences need 24 blocks; there are 12: requests wait or are
    preempted and recomputed, and every one still matches its solo transformers output."""
    prompts = [[10 + i % 4, 20 + i % 4, 30, 40, 50, 60 + i % 4, 70, 80] for i in range(8)]
    ref = reference(checkpoint_dir("llama"), prompts, 40)

    def one(i: int) -> tuple[list[int], dict]:
        return stream_tokens(server.url, ids_inputs(prompts[i], 40, stream=i % 2 == 0),
                             timeout_s=120)

    got = concurrently(8, one)
    for i, (tokens, params) in enumerate(got):
        assert tokens == ref[i], i
        assert params["finish_reason"] == "length"
    assert max(p["preemptions"] for _, p in got) > 0, [p for _, p in got]
    with grpcclient.InferenceServerClient(server.url) as c:
        final = c.infer(LLM, ids_inputs([1, 2], 1)).get_response().parameters
    assert final["kv_free_blocks"].int64_param == NUM_BLOCKS
    assert descendants(server) == server.ranks
