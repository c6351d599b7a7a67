"""The giant-model backend: a tp x pp model driven by the continuous-batching engine.

One thread owns the engine (it is not thread-safe): it drains a queue of new requests, checks
for cancelled ones, calls `engine.step()` and routes each token to its request's sink,
detokenizing incrementally. When idle it still steps about twice a second so the worker ranks
keep their heartbeat.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from runtime.engine import EngineFull, LLMEngine
from runtime.tokenizer import Detokenizer
from runtime.types import EngineConfig
from serving.backends.llm_io import GenerationJob, StopText, parse_job
from serving.config import int_param, param
from serving.types import Backend, InferRequest, InferResponse, ResponseSink, ServingError

log = logging.getLogger(__name__)
IDLE_STEP_S = 0.5
DTYPES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


@dataclass
class LLMSettings:
    """The giant-model settings in a config's `parameters`."""

    model: Path
    tp: int
    pp: int
    dtype: str | None
    engine: EngineConfig
    dist_backend: str = "auto"

    @classmethod
    def from_config(cls, config: mc.ModelConfig, version_dir: Path) -> LLMSettings:
        name = config.name
        raw = param(config, "model_path") or "."
        model = (version_dir / raw).resolve()
        if not ((model / "config.json").is_file() or (model / "manifest.json").is_file()):
            raise ServingError("INVALID_ARGUMENT", f"model '{name}': parameter 'model_path' "
                               f"({raw!r} -> {model}) is not an HF checkpoint or shard folder")
        dtype = param(config, "dtype") or None
        if dtype is not None and dtype not in DTYPES:
            raise ServingError("INVALID_ARGUMENT", f"model '{name}': parameter 'dtype' must be "
                               f"one of {DTYPES}, got {dtype!r}")
        backend = param(config, "dist_backend", "auto")
        if backend not in ("auto", "gloo", "nccl"):
            raise ServingError("INVALID_ARGUMENT", f"model '{name}': parameter 'dist_backend' "
                               f"must be auto, gloo or nccl, got {backend!r}")
        d = EngineConfig()
        engine = EngineConfig(
            block_size=int_param(config, "block_size", d.block_size, 1),
            num_blocks=int_param(config, "num_blocks", None, 1),
            kv_cache_bytes=int_param(config, "kv_cache_bytes", d.kv_cache_bytes, 1),
            max_running=int_param(config, "max_running", d.max_running, 1),
            max_prefill_tokens=int_param(config, "max_prefill_tokens", d.max_prefill_tokens, 1),
            max_model_len=int_param(config, "max_model_len", None, 2),
            microbatches=int_param(config, "microbatches", d.microbatches, 0),
            max_waiting=int_param(config, "max_waiting", d.max_waiting, 1),
        )
        return cls(model, int_param(config, "tp", 1, 1), int_param(config, "pp", 1, 1), dtype,
                   engine, backend)


@dataclass
class _Live:
    """One request in flight on the engine thread."""

    request: InferRequest
    sink: ResponseSink
    job: GenerationJob
    detok: Detokenizer | None
    stop: StopText
    ids: list[int] = field(default_factory=list)
    unsent_ids: list[int] = field(default_factory=list)

    def add(self, token: int) -> None:
        self.ids.append(token)
        self.unsent_ids.append(token)
        if self.detok is not None:
            self.stop.add(self.detok.add(token))

    def response(self, final: bool, extra: dict[str, Any]) -> InferResponse | None:
        """The next response (stream: the new chunk; otherwise everything), or None."""
        outputs: dict[str, np.ndarray] = {}
        if self.job.stream:
            text = self.stop.take(final) if self.detok is not None else None
            if not final and not text and (self.detok is not None or not self.unsent_ids):
                return None
            ids = self.unsent_ids
        else:
            text = self.stop.take(True) if self.detok is not None else None
            if text is not None and self.job.prompt_text and not self.job.exclude_input:
                text = self.job.prompt_text + text
            ids = self.ids
        self.unsent_ids = []
        if text is not None:
            outputs["text_output"] = np.array([text.encode("utf-8")], dtype=object)
        outputs["output_ids"] = np.array(ids, dtype=np.int32)
        return InferResponse(outputs=outputs, parameters=extra)


def _error(status: str, message: str) -> InferResponse:
    return InferResponse(error=ServingError(status, message))


class EngineDriver:
    """The one thread that owns an LLMEngine."""

    def __init__(self, engine: LLMEngine, name: str,
                 dead_ranks: Callable[[], list[Any]] = list) -> None:
        self.engine, self.name, self.dead_ranks = engine, name, dead_ranks
        self.commands: queue.Queue = queue.Queue()
        self.failure: str | None = None
        self.stats: dict[str, Any] = engine.stats()
        self._live: dict[str, _Live] = {}
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def add(self, job: GenerationJob, request: InferRequest, sink: ResponseSink) -> None:
        self.commands.put((job, request, sink))

    def stop(self, drain_s: float = 30.0) -> None:
        """Let in-flight requests finish (up to drain_s), then end the thread."""
        self._stopping.set()
        self.commands.put(None)
        self._thread.join(drain_s + 5.0)

    # --- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            deadline = None
            while True:
                if self._stopping.is_set():
                    deadline = deadline or time.monotonic() + 30.0
                    if not self._live or time.monotonic() > deadline:
                        break
                self._drain(block=not self._live and not self.engine.has_unfinished())
                self._reap_cancelled()
                outputs = self.engine.step()
                self.stats = self.engine.stats()
                for out in outputs:
                    self._route(out.request_id, out.token_id, out.finished, out.finish_reason)
                dead = self.dead_ranks()
                if dead:
                    raise RuntimeError(f"worker rank(s) exited: {dead}")
        except Exception as e:
            self.failure = f"engine failed: {type(e).__name__}: {e}"
            log.exception("model %s: engine thread failed", self.name)
        finally:
            why = self.failure or f"model '{self.name}' was unloaded"
            self._fail_all("UNAVAILABLE", why)

    def _drain(self, block: bool) -> None:
        try:
            first = self.commands.get(timeout=IDLE_STEP_S) if block else self.commands.get_nowait()
        except queue.Empty:
            return
        batch = [first]
        while True:
            try:
                batch.append(self.commands.get_nowait())
            except queue.Empty:
                break
        for cmd in batch:
            if cmd is not None:
                self._admit(*cmd)

    def _admit(self, job: GenerationJob, request: InferRequest, sink: ResponseSink) -> None:
        if self._stopping.is_set():
            sink.send(_error("UNAVAILABLE", f"model '{self.name}' is being unloaded"), True)
            return
        if request.cancelled.is_set():
            sink.send(_error("CANCELLED", "the request was cancelled"), True)
            return
        rid = str(next(self._ids))
        try:
            self.engine.add_request(rid, job.prompt_ids, job.params)
        except EngineFull as e:
            sink.send(_error("RESOURCE_EXHAUSTED", f"model '{self.name}' is overloaded: {e}"),
                      True)
            return
        except ValueError as e:
            sink.send(_error("INVALID_ARGUMENT", str(e)), True)
            return
        request.compute_start_ns = time.monotonic_ns()
        tok = self.engine.tokenizer
        self._live[rid] = _Live(request, sink, job, Detokenizer(tok) if tok else None,
                                StopText(job.stop_words))

    def _reap_cancelled(self) -> None:
        for rid in [r for r, lv in self._live.items() if lv.request.cancelled.is_set()]:
            live = self._live.pop(rid)
            self.engine.abort_request(rid)
            s = self.engine.stats()
            log.info("model %s: request %r cancelled after %d tokens; KV blocks free %d/%d",
                     self.name, live.request.id, len(live.ids), s["free_blocks"],
                     s["total_blocks"])
            live.sink.send(_error("CANCELLED", "the request was cancelled"), True)

    def _route(self, rid: str, token: int | None, finished: bool, reason: str | None) -> None:
        live = self._live.get(rid)
        if live is None:
            return
        if token is not None:
            live.add(token)
        if live.stop.stopped and not finished:
            self.engine.abort_request(rid)
            finished, reason = True, "stop"
        if finished:
            del self._live[rid]
            self._finish(live, reason or "stop")
            return
        if live.job.stream:
            resp = live.response(False, {})
            if resp is not None:
                live.sink.send(resp, False)

    def _finish(self, live: _Live, reason: str) -> None:
        if reason == "error":
            live.sink.send(_error("INTERNAL", "generation failed"), True)
            return
        s = self.engine.stats()
        extra = {"finish_reason": reason, "prompt_tokens": len(live.job.prompt_ids),
                 "completion_tokens": len(live.ids), "kv_free_blocks": s["free_blocks"],
                 "kv_total_blocks": s["total_blocks"], "preemptions": s["preemptions"]}
        live.sink.send(live.response(True, extra), True)

    def _fail_all(self, status: str, message: str) -> None:
        for live in self._live.values():
            live.sink.send(_error(status, message), True)
        self._live.clear()
        while True:
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return
            if cmd is not None:
                cmd[2].send(_error(status, message), True)


class LLMBackend(Backend):
    """A giant model: its ranks on this machine, rank 0's engine in this process."""

    def __init__(self, config: mc.ModelConfig, model_dir: Path, version: int) -> None:
        super().__init__(config, model_dir, version)
        self._local: Any = None
        self._driver: EngineDriver | None = None

    def load(self) -> None:
        import torch.distributed as dist

        from launcher.launch import join_launched_world
        from launcher.local import start_local_engine
        from runtime.worker import EngineSpec

        s = LLMSettings.from_config(self.config, self.model_dir / str(self.version))
        if dist.is_initialized():
            raise ServingError("UNAVAILABLE", f"model '{self.config.name}': this process "
                               "already drives a giant model (one torch.distributed world per "
                               "process); unload it first")
        spec = EngineSpec(str(s.model), s.tp, s.pp, s.dtype, s.engine, backend=s.dist_backend)
        t0 = time.perf_counter()
        try:  # under torchrun/mpirun/srun: join that world (other ranks never return here)
            self._local = join_launched_world(spec, on_peer_lost=self._peer_lost) or (
                start_local_engine(spec))
        except Exception as e:
            raise ServingError("INTERNAL", f"model '{self.config.name}': starting {s.tp}x{s.pp} "
                               f"ranks failed: {e}") from e
        dead = getattr(self._local, "dead_workers", list)
        self._driver = EngineDriver(self._local.engine, self.config.name, dead)
        self._driver.start()
        log.info("model %s: tp=%d pp=%d loaded from %s in %.1fs (%s)", self.config.name, s.tp,
                 s.pp, s.model, time.perf_counter() - t0, self._driver.stats)

    def _peer_lost(self, reason: str) -> None:
        if self._driver is not None:
            self._driver.failure = f"a rank was lost: {reason}"

    def submit(self, request: InferRequest, sink: ResponseSink) -> None:
        driver = self._driver
        if driver is None or not driver.alive():
            raise ServingError("UNAVAILABLE", f"model '{self.config.name}' is not running"
                               + (f": {driver.failure}" if driver and driver.failure else ""))
        job = parse_job(request, driver.engine.tokenizer)
        driver.add(job, request, sink)

    def ready(self) -> bool:
        return self._driver is not None and self._driver.alive()

    def failure(self) -> str | None:
        return self._driver.failure if self._driver is not None else None

    def stats(self) -> dict[str, Any]:
        return dict(self._driver.stats) if self._driver is not None else {}

    def unload(self) -> None:
        if self._driver is not None:
            self._driver.stop()
        if self._local is not None:
            try:
                self._local.close()
            except RuntimeError as e:  # ranks already gone (e.g. a signal to the whole group)
                log.warning("model %s: rank shutdown: %s", self.config.name,
                            str(e).splitlines()[0][:200])
        self._driver = self._local = None
