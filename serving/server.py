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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from serving.api import EXTENSIONS, SERVER_NAME, SERVER_VERSION, Admission, Api
from serving.convert import param_value, to_infer_request, to_infer_response
from serving.http.app import HttpFront, HttpOptions
from serving.manager import LoadedVersion, ModelManager
from serving.security import (
    BearerTokenInterceptor,
    Undecodable,
    add_service,
    server_credentials,
)
from serving.types import InferRequest, InferResponse, ServingError

log = logging.getLogger(__name__)
FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"
_CHECK = object()  # stream queue marker: a request finished or reading ended


def status_of(error: ServingError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.status, grpc.StatusCode.INTERNAL)


def too_big(msg: Any, limit: int) -> ServingError | None:
    """RESOURCE_EXHAUSTED for a response over the send limit (gRPC would fail it anyway, with
    a message that does not say why)."""
    size = msg.ByteSize()
    if size <= limit:
        return None
    return ServingError("RESOURCE_EXHAUSTED", f"the response is {size} bytes, more than "
                        f"the server's --max-message-bytes {limit}")


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
                 finished: Callable[[], None], request: InferRequest, decoupled: bool,
                 max_bytes: int = 64 * 2**20) -> None:
        self.loop, self.out, self.finished = loop, out, finished
        self.request, self.decoupled, self.max_bytes = request, decoupled, max_bytes
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
        wrapped = pb.ModelStreamInferResponse(infer_response=msg)
        error = too_big(wrapped, self.max_bytes)
        if error is not None:
            raise error
        return wrapped

    def _deliver(self, msg: pb.ModelStreamInferResponse | None, final: bool) -> None:
        if msg is not None:
            self.out.put_nowait(msg)
        if final:
            self.finished()

    def send(self, response: InferResponse | None, final: bool) -> None:
        try:
            msg = self._encode(response, final)
        except ServingError as e:
            r = self.request
            head = pb.ModelInferResponse(model_name=r.model_name, model_version=r.model_version,
                                         id=r.id)
            msg = pb.ModelStreamInferResponse(error_message=e.message, infer_response=head)
        try:
            self.loop.call_soon_threadsafe(self._deliver, msg, final)
        except RuntimeError:
            pass


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Every RPC of the KServe v2 gRPC protocol that this server supports."""

    def __init__(self, api: Api, pool: ThreadPoolExecutor,
                 max_message_bytes: int = 64 * 2**20) -> None:
        self.api = api
        self.manager = api.manager
        self.admission = api.admission
        self.pool = pool
        self.max_message_bytes = max_message_bytes

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # --- health and metadata ----------------------------------------------------------------
    async def ServerLive(self, request, context):  # noqa: N802 (protocol names)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.api.server_ready())

    async def ModelReady(self, request, context):  # noqa: N802
        return pb.ModelReadyResponse(ready=self.manager.ready(request.name, request.version))

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                         extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):  # noqa: N802
        try:
            return self.api.model_metadata(request.name, request.version)
        except ServingError as e:
            await context.abort(status_of(e), e.message)

    async def ModelConfig(self, request, context):  # noqa: N802
        try:
            return pb.ModelConfigResponse(config=self.api.model_config(request.name,
                                                                       request.version))
        except ServingError as e:
            await context.abort(status_of(e), e.message)

    async def ModelStatistics(self, request, context):  # noqa: N802
        try:
            stats = self.manager.statistics(request.name, request.version)
        except ServingError as e:
            await context.abort(status_of(e), e.message)
        return pb.ModelStatisticsResponse(model_stats=stats)

    # --- repository -------------------------------------------------------------------------
    async def RepositoryIndex(self, request, context):  # noqa: N802
        return pb.RepositoryIndexResponse(models=self.manager.index(request.ready))

    def _load(self, request: pb.RepositoryModelLoadRequest) -> None:
        params = {k: param_value(v) for k, v in request.parameters.items()}
        self.api.load(request.model_name, params, request.repository_name)

    async def RepositoryModelLoad(self, request, context):  # noqa: N802
        try:
            await self._run(self._load, request)
        except ServingError as e:
            await context.abort(status_of(e), e.message)
        return pb.RepositoryModelLoadResponse()

    def _unload(self, request: pb.RepositoryModelUnloadRequest) -> None:
        self.api.unload(request.model_name, request.repository_name)

    async def RepositoryModelUnload(self, request, context):  # noqa: N802
        try:
            await self._run(self._unload, request)
        except ServingError as e:
            await context.abort(status_of(e), e.message)
        return pb.RepositoryModelUnloadResponse()

    # --- inference --------------------------------------------------------------------------
    def _prepare(self, request: pb.ModelInferRequest, unary: bool
                 ) -> tuple[LoadedVersion, InferRequest, bool]:
        try:
            st, lv = self.manager.get(request.model_name, request.model_version)
            req = to_infer_request(request, st.config, str(lv.version), unary)
        except ServingError:
            raise
        except Exception as e:  # a decoding bug must answer, not kill the RPC with UNKNOWN
            log.exception("decoding a request for model %r failed", request.model_name)
            raise ServingError("INTERNAL", f"cannot decode the request: {type(e).__name__}: "
                               f"{e}") from e
        return lv, req, st.config.model_transaction_policy.decoupled

    def _prepare_submit(self, request: pb.ModelInferRequest, make_sink: Callable[..., Any]
                        ) -> InferRequest:
        lv, req, decoupled = self._prepare(request, False)
        sink = make_sink(req, decoupled)
        self.manager.submit(lv, req, sink)
        return req

    async def ModelInfer(self, request, context):  # noqa: N802
        try:
            ticket = self.admission.enter()
        except ServingError as e:
            await context.abort(status_of(e), e.message)
        try:
            return await self._infer(request, context)
        finally:
            self.admission.leave(ticket)

    async def _infer(self, request: pb.ModelInferRequest, context: Any
                     ) -> pb.ModelInferResponse:
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
        msg = to_infer_response(responses[0], req.model_name, req.model_version, req.id,
                                req.requested_outputs)
        error = too_big(msg, self.max_message_bytes)
        if error is not None:
            await context.abort(status_of(error), error.message)
        return msg

    async def ModelStreamInfer(self, request_iterator, context  # noqa: N802
                               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        stream = _Stream(asyncio.get_running_loop(), self.admission, self.max_message_bytes)
        reader = asyncio.create_task(self._read_stream(request_iterator, stream))
        try:
            while True:
                item = await stream.out.get()
                if item is _CHECK:
                    # the state may already be ahead of the queue: end only once every queued
                    # response has gone out (a final response is followed by its own _CHECK)
                    if not stream.reading and not stream.tickets and stream.out.empty():
                        break
                    continue
                yield item
        finally:
            reader.cancel()
            stream.close()

    async def _read_stream(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                           stream: _Stream) -> None:
        keys = itertools.count()
        try:
            async for request in request_iterator:
                key = next(keys)
                if isinstance(request, Undecodable):
                    stream.out.put_nowait(pb.ModelStreamInferResponse(
                        error_message=request.message))
                    continue
                try:
                    stream.admit(key)
                    await self._run(self._prepare_submit, request,
                                    lambda r, d, key=key: stream.sink(key, r, d))
                except ServingError as e:
                    if key not in stream.live:  # refused before a sink existed
                        stream.finished(key)
                    head = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                    stream.out.put_nowait(pb.ModelStreamInferResponse(error_message=e.message,
                                                                      infer_response=head))
        finally:
            stream.reading = False
            stream.out.put_nowait(_CHECK)


class _Stream:
    """One ModelStreamInfer call: its outgoing queue and its admitted requests."""

    def __init__(self, loop: asyncio.AbstractEventLoop, admission: Admission,
                 max_bytes: int) -> None:
        self.loop, self.admission, self.max_bytes = loop, admission, max_bytes
        self.out: asyncio.Queue = asyncio.Queue()
        self.tickets: dict[int, int] = {}  # request key -> admission ticket (loop only)
        self.live: dict[int, InferRequest] = {}  # requests handed to a backend
        self.reading = True
        self.closed = False

    def admit(self, key: int) -> None:
        self.tickets[key] = self.admission.enter()

    def finished(self, key: int) -> None:
        """On the loop, when request `key` got its final response (or was refused)."""
        self.live.pop(key, None)
        ticket = self.tickets.pop(key, None)
        if ticket is not None:
            self.admission.leave(ticket)
        self.out.put_nowait(_CHECK)

    def sink(self, key: int, req: InferRequest, decoupled: bool) -> _StreamSink:
        """Called from the pool thread before the request is submitted."""
        self.live[key] = req
        if self.closed:
            req.cancelled.set()
        return _StreamSink(self.loop, self.out, lambda: self.finished(key), req, decoupled,
                           self.max_bytes)

    def close(self) -> None:
        """The call ended: cancel what is still running and release its admission."""
        self.closed = True
        for req in list(self.live.values()):
            req.cancelled.set()
        for ticket in self.tickets.values():
            self.admission.leave(ticket)
        self.tickets.clear()


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


@dataclass
class FrontOptions:
    """How the gRPC front listens, whom it lets in and how it shuts down."""

    host: str = "127.0.0.1"
    port: int = 8001
    workers: int = 64
    max_message_bytes: int = 64 * 2**20
    exit_on_error: bool = True
    metrics_port: int | None = None
    poll_secs: float = 15.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth_token: str | None = None
    grace_period_s: float = 30.0
    max_inflight: int = 1024
    max_concurrent_rpcs: int = 4096
    http: HttpOptions | None = None  # None: no HTTP fronts


def _grpc_server(servicer: InferenceServicer, opts: FrontOptions) -> tuple[Any, int]:
    """A grpc.aio server with explicit message-size and concurrency limits, TLS and the token
    check when configured; returns it with the bound port."""
    options = [("grpc.max_receive_message_length", opts.max_message_bytes),
               ("grpc.max_send_message_length", opts.max_message_bytes)]
    interceptors = [BearerTokenInterceptor(opts.auth_token)] if opts.auth_token else []
    server = grpc.aio.server(options=options, interceptors=interceptors,
                             maximum_concurrent_rpcs=opts.max_concurrent_rpcs)
    add_service(service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, servicer, server)
    address = f"{opts.host}:{opts.port}"
    if (opts.tls_cert is None) != (opts.tls_key is None):
        raise ServingError("INVALID_ARGUMENT", "TLS needs both --grpc-tls-cert and "
                           "--grpc-tls-key")
    if opts.tls_cert is not None and opts.tls_key is not None:
        bound = server.add_secure_port(address, server_credentials(opts.tls_cert,
                                                                   opts.tls_key))
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise ServingError("UNAVAILABLE", f"cannot listen on {address}")
    return server, bound


async def _drain(admission: Admission, stop: asyncio.Event, grace_s: float) -> None:
    """Refuse new requests and wait (up to grace_s, or until a second signal) for the
    in-flight ones to finish."""
    admission.draining = True
    stop.clear()
    log.info("shutting down: no new requests; waiting up to %.0fs for %d in flight",
             grace_s, admission.count)
    idle = asyncio.ensure_future(admission.idle.wait())
    again = asyncio.ensure_future(stop.wait())
    done, pending = await asyncio.wait({idle, again}, timeout=grace_s,
                                       return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    if idle in done:
        log.info("in-flight requests finished")
    else:
        log.warning("grace period over (%s): cancelling %d requests still in flight",
                    "second signal" if again in done else f"{grace_s:.0f}s", admission.count)


async def serve(manager: ModelManager, startup: list[str] | None,
                opts: FrontOptions | None = None) -> int:
    """Serve until SIGINT/SIGTERM (0, after draining in-flight requests) or a fatal model
    failure (1). Health answers while the startup models load; the "ready" line is logged once
    they have."""
    import signal

    opts = opts or FrontOptions()
    pool = ThreadPoolExecutor(opts.workers, thread_name_prefix="shardserve")
    api = Api(manager, Admission(opts.max_inflight))
    servicer = InferenceServicer(api, pool, opts.max_message_bytes)
    server, bound = _grpc_server(servicer, opts)
    http = HttpFront(api, pool, opts.http) if opts.http is not None else None
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    extras = _Extras(manager, opts.host, opts.metrics_port, opts.poll_secs)
    try:
        http_port = await http.start() if http is not None else None
        extras.start_metrics()
        failed = await loop.run_in_executor(pool, manager.load_startup, startup)
        for line in failed:
            log.error("startup load failed: %s", line)
        if failed and opts.exit_on_error:
            return 1
        api.started = True
        extras.start_poller()
        names = [m.name for m in manager.index(ready_only=True)]
        tls = " (TLS)" if opts.tls_cert else ""
        http_line = "" if opts.http is None else (
            f", HTTP on {opts.http.host}:{http_port}{' (TLS)' if opts.http.tls_cert else ''}")
        log.info("shardserve ready: gRPC on %s:%d%s%s, models %s", opts.host, bound, tls,
                 http_line, sorted(set(names)))
        why = await _watch(manager, stop)
        if why:
            log.error("fatal: %s; shutting down", why)
            code = 1
        else:
            await _drain(api.admission, stop, opts.grace_period_s)
    finally:
        api.admission.draining = True
        extras.stop()
        if http is not None:
            await http.stop()
        await server.stop(grace=1.0)
        await loop.run_in_executor(pool, manager.close)
        pool.shutdown(wait=False, cancel_futures=True)
    log.info("shardserve stopped (exit %d)", code)
    return code
