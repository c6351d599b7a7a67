"""The giant-model backend: a tp x pp model driven by the continuous-batching engine.

The engine runs behind an `EngineClient` (runtime/engine_client.py): on one machine in an engine
process of its own per loaded version (rank 0 of that model's world, launcher/engine_process.py),
so several giant models and reloads coexist; under torchrun/mpirun/Slurm in a thread of this
process (rank 0 of the launched world). Either way one router thread here receives a batch of
tokens per engine step and routes each token to its request's sink, detokenizing incrementally
and cutting at stop words; it also aborts requests whose clients cancelled.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from runtime.engine_client import EngineClient, EngineStopped, StepBatch, TokenLogprobs
from runtime.tokenizer import Detokenizer
from runtime.types import EngineConfig
from serving.backends.llm_io import GenerationJob, StopText, parse_job
from serving.config import bool_param, int_param, param
from serving.types import Backend, InferRequest, InferResponse, ResponseSink, ServingError

if TYPE_CHECKING:
    from runtime.worker import EngineSpec

log = logging.getLogger(__name__)
RECV_WAIT_S = 0.25  # the router wakes at least this often to look for cancelled requests
DRAIN_S = 30.0  # unload: how long in-flight requests may take to finish
ENGINE_MODES = ("process", "thread")
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
    engine_mode: str = "process"  # "process": an engine process; "thread": rank 0 in the server

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
        mode = param(config, "engine_mode", "process")
        if mode not in ENGINE_MODES:
            raise ServingError("INVALID_ARGUMENT", f"model '{name}': parameter 'engine_mode' "
                               f"must be one of {ENGINE_MODES}, got {mode!r}")
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
            prepack_weights=bool_param(config, "prepack_weights", d.prepack_weights),
            native_kernels=bool_param(config, "native_kernels", d.native_kernels),
        )
        return cls(model, int_param(config, "tp", 1, 1), int_param(config, "pp", 1, 1), dtype,
                   engine, backend, mode)


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
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # unsent, when asked for

    def add(self, token: int, lps: TokenLogprobs | None) -> None:
        self.ids.append(token)
        self.unsent_ids.append(token)
        if lps is not None and "logprobs" in self.job.returns:
            self.logprobs.append(lps)
        if self.detok is not None:
            self.stop.add(self.detok.add(token))

    def response(self, final: bool, extra: dict[str, Any]) -> InferResponse | None:
        """The next response (stream: the new chunk; otherwise everything), or None."""
        if final and self.detok is not None:
            self.stop.add(self.detok.flush())  # a partial last character is sent, not lost
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
        if text is not None:
            outputs["text_output"] = np.array([text.encode("utf-8")], dtype=object)
        outputs["output_ids"] = np.array(ids, dtype=np.int32)
        if self.job.returns:
            outputs.update(self._returns(ids, extra.get("finish_reason") if final else None))
        self.unsent_ids = []
        return InferResponse(outputs=outputs, parameters=extra)

    def _returns(self, ids: list[int], reason: str | None) -> dict[str, np.ndarray]:
        """The optional outputs of the vLLM convention that the request asked for."""
        r, out = self.job.returns, {}
        if "finish_reason" in r:
            out["finish_reason"] = np.array([(reason or "").encode()], dtype=object)
        if "num_input_tokens" in r:
            out["num_input_tokens"] = np.array([len(self.job.prompt_ids)], dtype=np.uint32)
        if "num_output_tokens" in r:
            out["num_output_tokens"] = np.array([len(ids)], dtype=np.uint32)
        if "logprobs" in r:
            out["logprobs"] = np.array([json.dumps(self._logprobs_json(ids, self.logprobs))
                                        .encode()], dtype=object)
            self.logprobs = []
        return out

    def _logprobs_json(self, ids: list[int], lps: list[TokenLogprobs]) -> list[dict]:
        """Per token: its id, logprob and text, and the top alternatives asked for (best
        first), each with its id, logprob and text."""
        tok = self.detok.tokenizer if self.detok is not None else None

        def one(tid: int, value: float) -> dict[str, Any]:
            item: dict[str, Any] = {"token_id": tid, "logprob": value}
            if tok is not None:
                item["decoded_token"] = tok.decode([tid])
            return item

        chosen = ids[len(ids) - len(lps):]
        return [{**one(token, lp), "top": [one(t, v) for t, v in top]}
                for token, (lp, top) in zip(chosen, lps, strict=True)]


def _error(status: str, message: str) -> InferResponse:
    return InferResponse(error=ServingError(status, message))


class TokenRouter:
    """Requests in flight on one engine: submits register them and send `add`; one router
    thread receives the engine's step batches and answers each request's sink."""

    def __init__(self, client: EngineClient, name: str) -> None:
        self.client, self.name = client, name
        self.stats: dict[str, Any] = dict(client.info.stats)
        self.failure: str | None = None  # why the engine died
        self._live: dict[str, _Live] = {}
        self._cancelled: dict[str, tuple[str, int]] = {}  # rid -> (request id, tokens sent)
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._ended: str | None = None  # set once: no request is taken after it
        self._thread = threading.Thread(target=self._run, name=f"router-{name}", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._ended is None and self._thread.is_alive()

    def submit(self, job: GenerationJob, request: InferRequest, sink: ResponseSink) -> None:
        if request.cancelled.is_set():
            sink.send(_error("CANCELLED", "the request was cancelled"), True)
            return
        tok = self.client.tokenizer
        live = _Live(request, sink, job, Detokenizer(tok) if tok else None,
                     StopText(job.stop_words))
        with self._cond:
            if self._ended is not None:
                raise ServingError("UNAVAILABLE", self._ended)
            rid = str(next(self._ids))
            self._live[rid] = live
        request.compute_start_ns = time.monotonic_ns()
        self.client.add(rid, job.prompt_ids, job.params)

    def close(self, drain_s: float = DRAIN_S) -> None:
        """Refuse new requests, let in-flight ones finish (up to drain_s), stop the engine."""
        with self._cond:
            if self._ended is None:
                self._ended = f"model '{self.name}' is being unloaded"
            self._cond.wait_for(lambda: not self._live or not self._thread.is_alive(), drain_s)
        if self._thread.is_alive():
            self.client.shutdown()
            self._thread.join(drain_s)
        self.client.close()
        self._fail_all(f"model '{self.name}' was unloaded")

    # --- the router thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                for batch in self.client.recv(RECV_WAIT_S):
                    self._apply(batch)
                self._reap_cancelled()
        except EngineStopped as e:
            for batch in e.batches:
                self._apply(batch)
            if e.failed:
                self.failure = e.message
                log.error("model %s: engine failed: %s", self.name, e.message)
                self._fail_all(f"model '{self.name}' is not available: {e.message}")
            else:
                self._fail_all(f"model '{self.name}' was unloaded")
        except Exception as e:  # a bug here must not leave requests waiting forever
            self.failure = f"{type(e).__name__}: {e}"
            log.exception("model %s: router failed", self.name)
            self._fail_all(f"model '{self.name}' is not available: {self.failure}")

    def _apply(self, batch: StepBatch) -> None:
        self.stats = batch.stats
        for rid, status, message in batch.rejects:
            live = self._pop(rid)
            if live is not None:
                live.sink.send(_error(status, message), True)
        for rid, token, finished, reason, lps in batch.tokens:
            if rid in self._cancelled and finished:
                self._log_cancel(rid)
                continue
            live = self._live.get(rid)
            if live is not None:
                self._route(rid, live, token, finished, reason, lps)

    def _route(self, rid: str, live: _Live, token: int | None, finished: bool,
               reason: str | None, lps: TokenLogprobs | None = None) -> None:
        if token is not None:
            live.add(token, lps)
        if live.stop.stopped and not finished:
            self.client.abort(rid)
            finished, reason = True, "stop"
        if finished:
            self._pop(rid)
            self._finish(live, reason or "stop")
        elif live.job.stream:
            resp = live.response(False, {})
            if resp is not None:
                live.sink.send(resp, False)

    def _finish(self, live: _Live, reason: str) -> None:
        if reason in ("error", "abort"):
            live.sink.send(_error("INTERNAL", f"generation ended: {reason}"), True)
            return
        s = self.stats
        extra = {"finish_reason": reason, "prompt_tokens": len(live.job.prompt_ids),
                 "completion_tokens": len(live.ids), "kv_free_blocks": s.get("free_blocks", 0),
                 "kv_total_blocks": s.get("total_blocks", 0),
                 "preemptions": s.get("preemptions", 0)}
        live.sink.send(live.response(True, extra), True)

    def _pop(self, rid: str) -> _Live | None:
        with self._cond:
            live = self._live.pop(rid, None)
            if not self._live:
                self._cond.notify_all()
        return live

    def _reap_cancelled(self) -> None:
        for rid in [r for r, lv in list(self._live.items()) if lv.request.cancelled.is_set()]:
            live = self._pop(rid)
            if live is None:
                continue
            self.client.abort(rid)
            self._cancelled[rid] = (live.request.id, len(live.ids))
            live.sink.send(_error("CANCELLED", "the request was cancelled"), True)

    def _log_cancel(self, rid: str) -> None:
        request_id, n = self._cancelled.pop(rid)
        s = self.stats
        log.info("model %s: request %r cancelled after %d tokens; KV blocks free %d/%d",
                 self.name, request_id, n, s.get("free_blocks", 0), s.get("total_blocks", 0))

    def _fail_all(self, message: str) -> None:
        with self._cond:
            if self._ended is None or self.failure is not None:
                self._ended = message
            live, self._live = list(self._live.values()), {}
            self._cond.notify_all()
        for lv in live:
            lv.sink.send(_error("UNAVAILABLE", message), True)


class LLMBackend(Backend):
    """A giant model: its engine (rank 0) behind an EngineClient, its ranks on this machine or
    in the world an external launcher started."""

    def __init__(self, config: mc.ModelConfig, model_dir: Path, version: int) -> None:
        super().__init__(config, model_dir, version)
        self._client: EngineClient | None = None
        self._router: TokenRouter | None = None

    def load(self) -> None:
        from runtime.worker import EngineSpec

        name = self.config.name
        s = LLMSettings.from_config(self.config, self.model_dir / str(self.version))
        spec = EngineSpec(str(s.model), s.tp, s.pp, s.dtype, s.engine, backend=s.dist_backend)
        t0 = time.perf_counter()
        try:
            self._client = self._start(spec, s.engine_mode)
        except ServingError:
            raise
        except Exception as e:
            raise ServingError("INTERNAL", f"model '{name}': starting {s.tp}x{s.pp} ranks "
                               f"failed: {e}") from e
        self._router = TokenRouter(self._client, name)
        info = self._client.info
        log.info("model %s version %d: tp=%d pp=%d loaded from %s in %.1fs (%s engine, rank "
                 "pids %s; %s)", name, self.version, s.tp, s.pp, s.model,
                 time.perf_counter() - t0, "in-process" if self._client.fatal else "process",
                 info.pids, info.stats)

    def _start(self, spec: EngineSpec, mode: str) -> EngineClient:
        """An engine process, or (launched world / engine_mode thread) rank 0 in this process."""
        from launcher.discovery import discover_ranks
        from launcher.engine_process import EngineProcessClient
        from runtime.engine_client import InProcessClient

        launched = discover_ranks().launched
        if not launched and mode == "process":
            return EngineProcessClient.start(spec, self.config.name)
        import torch.distributed as dist

        from launcher.launch import join_launched_world
        from launcher.local import start_local_engine

        if dist.is_initialized():
            raise ServingError("UNAVAILABLE", f"model '{self.config.name}': this process "
                               "already drives a giant model in-process (one torch.distributed "
                               "world per process); unload it first or use engine_mode process")
        # under torchrun/mpirun/srun: join that world (other ranks never return from here)
        local = join_launched_world(spec, on_peer_lost=self._peer_lost) if launched else (
            start_local_engine(spec))
        return InProcessClient(local, self.config.name)

    def _peer_lost(self, reason: str) -> None:
        report = getattr(self._client, "report_lost", None)
        if report is not None:
            report(reason)

    def submit(self, request: InferRequest, sink: ResponseSink) -> None:
        router = self._router
        if router is None or self._client is None:
            raise ServingError("UNAVAILABLE", f"model '{self.config.name}' is not running")
        if router.failure is not None:
            raise ServingError("UNAVAILABLE", f"model '{self.config.name}' is not available: "
                               f"{router.failure}")
        router.submit(parse_job(request, self._client.tokenizer), request, sink)

    def ready(self) -> bool:
        return self._router is not None and self._router.alive()

    def tokenizer(self) -> Any | None:
        return self._client.tokenizer if self._client is not None else None

    def max_model_len(self) -> int | None:
        return self._client.info.max_model_len if self._client is not None else None

    def failure(self) -> str | None:
        """Fatal only for an in-process engine (this process's world is broken); a dead
        engine process makes just this model unavailable."""
        if self._router is None or self._client is None or not self._client.fatal:
            return None
        return self._router.failure

    def stats(self) -> dict[str, Any]:
        return dict(self._router.stats) if self._router is not None else {}

    def unload(self) -> None:
        if self._router is not None:
            self._router.close()
        self._router = self._client = None
