"""The KServe v2 / Triton `inference.GRPCInferenceService` on grpc.aio.

The event loop only moves messages: request decoding and `Backend.submit` run on a thread pool,
and backends answer through sinks that convert responses in the sending thread and hand them to
the loop with `call_soon_threadsafe`, so model compute never blocks the loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from serving.config import parse_json_config, validate_config
from serving.convert import config_datatype, param_value, to_infer_request, to_infer_response
from serving.manager import LoadedVersion, ModelManager
from serving.types import InferRequest, InferResponse, ServingError

log = logging.getLogger(__name__)
SERVER_NAME = "shardserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["model_repository", "model_configuration", "statistics", "parameters"]
FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"
_CHECK = object()  # stream queue marker: a request finished or reading ended


def status_of(error: ServingError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.status, grpc.StatusCode.INTERNAL)


class _UnarySink:
    """Collects a ModelInfer request's responses on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop, self.queue = loop, queue

    def send(self, response: InferResponse | None, final: bool) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (response, final))
        except RuntimeError:  # loop closed: the server is shutting down
            pass


class _StreamSink:
    """Encodes one stream request's responses (in the sender's thread) and queues them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, out: asyncio.Queue,
                 finished: Callable[[], None], request: InferRequest, decoupled: bool) -> None:
        self.loop, self.out, self.finished = loop, out, finished
        self.request, self.decoupled = request, decoupled
        self.empty_final = bool(request.parameters.get(EMPTY_FINAL, False))

    def _encode(self, response: InferResponse | None, final: bool
                ) -> pb.ModelStreamInferResponse | None:
        r = self.request
        if response is not None and response.error is not None:
            head = pb.ModelInferResponse(model_name=r.model_name, model_version=r.model_version,
                                         id=r.id)
            return pb.ModelStreamInferResponse(error_message=response.error.message,
                                               infer_response=head)
        if response is None and not (self.decoupled and final and self.empty_final):
            return None
        params = {FINAL: final} if self.decoupled else None
        msg = to_infer_response(response or InferResponse(), r.model_name, r.model_version,
                                r.id, r.requested_outputs, params)
        return pb.ModelStreamInferResponse(infer_response=msg)

    def _deliver(self, msg: pb.ModelStreamInferResponse | None, final: bool) -> None:
        if msg is not None:
            self.out.put_nowait(msg)
        if final:
            self.finished()

    def send(self, response: InferResponse | None, final: bool) -> None:
        try:
            msg = self._encode(response, final)
        except ServingError as e:
            msg = pb.ModelStreamInferResponse(error_message=e.message)
        try:
            self.loop.call_soon_threadsafe(self._deliver, msg, final)
        except RuntimeError:
            pass


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Every RPC of the KServe v2 gRPC protocol that this server supports."""

    def __init__(self, manager: ModelManager, pool: ThreadPoolExecutor) -> None:
        self.manager = manager
        self.pool = pool
        self.started = False  # startup models loaded

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # --- health and metadata ----------------------------------------------------------------
    async def ServerLive(self, request, context):  # noqa: N802 (protocol names)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        ok = self.started and self.manager.failure() is None and self.manager.all_ready()
        return pb.ServerReadyResponse(ready=ok)

    async def ModelReady(self, request, context):  # noqa: N802
        return pb.ModelReadyResponse(ready=self.manager.ready(request.name, request.version))

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                         extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):  # noqa: N802
        try:
            st, _ = self.manager.get(request.name, request.version)
        except ServingError as e:
            await context.abort(status_of(e), e.message)
        cfg = st.config
        batch = [-1] if cfg.max_batch_size > 0 else []
        resp = pb.ModelMetadataResponse(name=cfg.name, platform=cfg.platform or cfg.backend,
                                        versions=[str(v) for v in sorted(st.versions)])
        for tensors, target in ((cfg.input, resp.inputs), (cfg.output, resp.outputs)):
            for t in tensors:
                target.add(name=t.name, datatype=config_datatype(t.data_type),
                           shape=batch + list(t.dims))
        return resp

    async def ModelConfig(self, request, context):  # noqa: N802
        try:
            st, _ = self.manager.get(request.name, request.version)
        except ServingError as e:
            await context.abort(status_of(e), e.message)
        return pb.ModelConfigResponse(config=st.config)

    async def ModelStatistics(self, request, context):  # noqa: N802
        try:
            stats = self.manager.statistics(request.name, request.version)
        except ServingError as e:
            await context.abort(status_of(e), e.message)
        return pb.ModelStatisticsResponse(model_stats=stats)

    # --- repository -------------------------------------------------------------------------
    async def RepositoryIndex(self, request, context):  # noqa: N802
        return pb.RepositoryIndexResponse(models=self.manager.index(request.ready))

    def _check_control(self, repository_name: str) -> None:
        if self.manager.control_mode != "explicit":
            raise ServingError("UNAVAILABLE", "model control mode is 'none': start the server "
                               "with --model-control-mode explicit to load and unload models")
        if repository_name and repository_name != self.manager.repository.root.name:
            raise ServingError("NOT_FOUND", f"unknown repository '{repository_name}'")

    def _load(self, request: pb.RepositoryModelLoadRequest) -> None:
        self._check_control(request.repository_name)
        params = {k: param_value(v) for k, v in request.parameters.items()}
        if any(k.startswith("file:") for k in params):
            raise ServingError("UNIMPLEMENTED", "'file:' load parameters are not supported")
        config = None
        if "config" in params:
            where = f"load parameter 'config' of '{request.model_name}'"
            self.manager.repository.model_dir(request.model_name)
            config = validate_config(parse_json_config(str(params["config"]), where),
                                     request.model_name, where)
        self.manager.load(request.model_name, config)

    async def RepositoryModelLoad(self, request, context):  # noqa: N802
        try:
            await self._run(self._load, request)
        except ServingError as e:
            await context.abort(status_of(e), e.message)
        return pb.RepositoryModelLoadResponse()

    def _unload(self, request: pb.RepositoryModelUnloadRequest) -> None:
        self._check_control(request.repository_name)
        self.manager.unload(request.model_name)

    async def RepositoryModelUnload(self, request, context):  # noqa: N802
        try:
            await self._run(self._unload, request)
        except ServingError as e:
            await context.abort(status_of(e), e.message)
        return pb.RepositoryModelUnloadResponse()

    # --- inference --------------------------------------------------------------------------
    def _prepare(self, request: pb.ModelInferRequest, unary: bool
                 ) -> tuple[LoadedVersion, InferRequest, bool]:
        st, lv = self.manager.get(request.model_name, request.model_version)
        req = to_infer_request(request, st.config, str(lv.version), unary)
        return lv, req, st.config.model_transaction_policy.decoupled

    def _prepare_submit(self, request: pb.ModelInferRequest, make_sink: Callable[..., Any]
                        ) -> InferRequest:
        lv, req, decoupled = self._prepare(request, False)
        sink = make_sink(req, decoupled)
        self.manager.submit(lv, req, sink)
        return req

    async def ModelInfer(self, request, context):  # noqa: N802
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        try:
            lv, req, _ = await self._run(self._prepare, request, True)
        except ServingError as e:
            await context.abort(status_of(e), e.message)
        await self._run(self.manager.submit, lv, req, _UnarySink(loop, queue))
        responses: list[InferResponse] = []
        try:
            while True:
                resp, final = await queue.get()
                if resp is not None:
                    responses.append(resp)
                if final:
                    break
        except asyncio.CancelledError:
            req.cancelled.set()
            raise
        error = next((r.error for r in responses if r.error is not None), None)
        if error is None and len(responses) != 1:
            error = ServingError("INVALID_ARGUMENT", f"model '{req.model_name}' sent "
                                 f"{len(responses)} responses; use ModelStreamInfer for it")
        if error is not None:
            await context.abort(status_of(error), error.message)
        return to_infer_response(responses[0], req.model_name, req.model_version, req.id,
                                 req.requested_outputs)

    async def ModelStreamInfer(self, request_iterator, context  # noqa: N802
                               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        out: asyncio.Queue = asyncio.Queue()
        live: dict[int, InferRequest] = {}
        reading = [True]
        reader = asyncio.create_task(self._read_stream(request_iterator, out, live, reading))
        try:
            while True:
                item = await out.get()
                if item is _CHECK:
                    if not reading[0] and not live:
                        break
                    continue
                yield item
        finally:
            reader.cancel()
            for req in list(live.values()):
                req.cancelled.set()

    async def _read_stream(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                           out: asyncio.Queue, live: dict[int, InferRequest],
                           reading: list[bool]) -> None:
        loop = asyncio.get_running_loop()
        keys = itertools.count()
        try:
            async for request in request_iterator:
                key = next(keys)

                def finished(key: int = key) -> None:
                    live.pop(key, None)
                    out.put_nowait(_CHECK)

                def make_sink(req: InferRequest, decoupled: bool, key: int = key,
                              finished: Callable[[], None] = finished) -> _StreamSink:
                    live[key] = req  # from the pool thread, before submit can answer
                    return _StreamSink(loop, out, finished, req, decoupled)

                try:
                    await self._run(self._prepare_submit, request, make_sink)
                except ServingError as e:
                    head = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                    out.put_nowait(pb.ModelStreamInferResponse(error_message=e.message,
                                                               infer_response=head))
        finally:
            reading[0] = False
            out.put_nowait(_CHECK)


# --- running the server -------------------------------------------------------------------------
async def _watch(manager: ModelManager, stop: asyncio.Event, period_s: float = 1.0) -> str | None:
    """Wait for a stop request or a fatal backend failure (returned)."""
    while not stop.is_set():
        why = manager.failure()
        if why:
            return why
        try:
            await asyncio.wait_for(stop.wait(), period_s)
        except asyncio.TimeoutError:
            pass
    return None


class _Extras:
    """The Prometheus endpoint and, in poll mode, the repository poller."""

    def __init__(self, manager: ModelManager, host: str, metrics_port: int | None,
                 poll_secs: float) -> None:
        self.manager, self.host = manager, host
        self.metrics_port, self.poll_secs = metrics_port, poll_secs
        self.metrics_server: Any = None
        self.poller: Any = None

    def start_metrics(self) -> None:
        if self.manager.metrics is None or self.metrics_port is None:
            return
        from serving.metrics import MetricsServer

        try:
            self.metrics_server = MetricsServer(self.manager.metrics.registry, self.host,
                                                self.metrics_port).start()
        except OSError as e:  # e.g. the port is taken: serve inference anyway
            log.error("metrics disabled: cannot listen on %s:%d: %s", self.host,
                      self.metrics_port, e)
            return
        log.info("metrics on http://%s:%d/metrics", self.host, self.metrics_server.port)

    def start_poller(self) -> None:
        if self.manager.control_mode != "poll":
            return
        from serving.poll import RepositoryPoller

        self.poller = RepositoryPoller(self.manager, self.poll_secs)
        self.poller.mark_loaded()
        self.poller.start()

    def stop(self) -> None:
        if self.poller is not None:
            self.poller.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()


async def serve(manager: ModelManager, host: str, port: int, startup: list[str] | None,
                workers: int = 64, max_message_bytes: int = 64 * 2**20,
                exit_on_error: bool = True, metrics_port: int | None = None,
                poll_secs: float = 15.0) -> int:
    """Serve until SIGINT/SIGTERM (0) or a fatal model failure (1). Health answers while the
    startup models load; the "ready" line is logged once they have."""
    import signal

    pool = ThreadPoolExecutor(workers, thread_name_prefix="shardserve")
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    server = grpc.aio.server(options=options)
    servicer = InferenceServicer(manager, pool)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise ServingError("UNAVAILABLE", f"cannot listen on {host}:{port}")
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    extras = _Extras(manager, host, metrics_port, poll_secs)
    try:
        extras.start_metrics()
        failed = await loop.run_in_executor(pool, manager.load_startup, startup)
        for line in failed:
            log.error("startup load failed: %s", line)
        if failed and exit_on_error:
            return 1
        servicer.started = True
        extras.start_poller()
        names = [m.name for m in manager.index(ready_only=True)]
        log.info("shardserve ready: gRPC on %s:%d, models %s", host, bound, sorted(set(names)))
        why = await _watch(manager, stop)
        if why:
            log.error("fatal: %s; shutting down", why)
            code = 1
    finally:
        extras.stop()
        await server.stop(grace=2.0)
        await loop.run_in_executor(pool, manager.close)
        pool.shutdown(wait=False, cancel_futures=True)
    return code
