"""The KServe v2 / Triton operations, independent of the wire: the gRPC front and the HTTP
fronts both call these, so a model answers the same way whichever protocol reaches it.

`Calls` runs one inference request from an asyncio front: admission (the in-flight limit and
draining are shared by every front), submission on the thread pool, and the responses as an
async iterator; closing a call early (a client that went away) cancels its request.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from serving.config import parse_json_config, validate_config
from serving.convert import config_datatype
from serving.manager import LoadedVersion, ModelManager, ModelState
from serving.security import check_override
from serving.types import InferRequest, InferResponse, ServingError

SERVER_NAME = "shardserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["model_repository", "model_configuration", "statistics", "parameters",
              "binary_tensor_data", "classification", "generate"]


class Admission:
    """Counts in-flight inference requests (on the event loop only): past `limit` new ones are
    refused with RESOURCE_EXHAUSTED, and once draining (SIGTERM) with UNAVAILABLE, while
    shutdown waits for the count to reach zero. Tickets make `leave` idempotent."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()
        self._tickets: set[int] = set()
        self._next = itertools.count(1)

    @property
    def count(self) -> int:
        return len(self._tickets)

    def enter(self) -> int:
        """A ticket for one request, or ServingError when it must be refused."""
        if self.draining:
            raise ServingError("UNAVAILABLE", "shardserve is shutting down and accepts no new "
                               "requests")
        if len(self._tickets) >= self.limit:
            raise ServingError("RESOURCE_EXHAUSTED", f"the server already has {self.count} "
                               f"requests in flight (--max-inflight {self.limit}); retry later")
        ticket = next(self._next)
        self._tickets.add(ticket)
        self.idle.clear()
        return ticket

    def leave(self, ticket: int) -> None:
        self._tickets.discard(ticket)
        if not self._tickets:
            self.idle.set()


class Api:
    """Health, metadata, repository control and statistics over one model manager."""

    def __init__(self, manager: ModelManager, admission: Admission) -> None:
        self.manager = manager
        self.admission = admission
        self.started = False  # startup models loaded

    def server_ready(self) -> bool:
        m = self.manager
        return (self.started and not self.admission.draining and m.failure() is None
                and m.all_ready())

    def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        st, _ = self.manager.get(name, version)
        cfg = st.config
        assert cfg is not None
        batch = [-1] if cfg.max_batch_size > 0 else []
        resp = pb.ModelMetadataResponse(name=cfg.name, platform=cfg.platform or cfg.backend,
                                        versions=[str(v) for v in sorted(st.versions)])
        for tensors, target in ((cfg.input, resp.inputs), (cfg.output, resp.outputs)):
            for t in tensors:
                target.add(name=t.name, datatype=config_datatype(t.data_type),
                           shape=batch + list(t.dims))
        return resp

    def model_config(self, name: str, version: str) -> mc.ModelConfig:
        st, _ = self.manager.get(name, version)
        assert st.config is not None
        return st.config

    def _check_control(self, repository_name: str) -> None:
        if self.admission.draining:
            raise ServingError("UNAVAILABLE", "shardserve is shutting down")
        if self.manager.control_mode != "explicit":
            raise ServingError("UNAVAILABLE", "model control mode is 'none': start the server "
                               "with --model-control-mode explicit to load and unload models")
        if repository_name and repository_name != self.manager.repository.root.name:
            raise ServingError("NOT_FOUND", f"unknown repository '{repository_name}'")

    def load(self, name: str, params: dict[str, Any], repository_name: str = "") -> None:
        """Load or reload `name`; a "config" parameter (JSON) overrides its config.pbtxt."""
        self._check_control(repository_name)
        if any(k.startswith("file:") for k in params):
            raise ServingError("UNIMPLEMENTED", "'file:' load parameters are not supported")
        config = None
        if "config" in params:
            where = f"load parameter 'config' of '{name}'"
            repo = self.manager.repository
            model_dir = repo.model_dir(name)
            config = validate_config(parse_json_config(str(params["config"]), where), name,
                                     where)
            on_disk = repo.config(name) if repo.exists(name) else None
            check_override(config, on_disk, model_dir, repo.root)
        self.manager.load(name, config)

    def unload(self, name: str, repository_name: str = "") -> None:
        self._check_control(repository_name)
        self.manager.unload(name)


class Call:
    """One inference request in flight for an asyncio front: a sink that any thread may send
    to, read back on the loop as an async iterator of (response or None, final)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, admission: Admission) -> None:
        self.loop, self.admission = loop, admission
        self.queue: asyncio.Queue[tuple[InferResponse | None, bool]] = asyncio.Queue()
        self.request: InferRequest | None = None
        self.decoupled = False
        self.done = False
        self.closed = False
        self._ticket: int | None = admission.enter()

    def send(self, response: InferResponse | None, final: bool) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (response, final))
        except RuntimeError:  # loop closed: the server is shutting down
            pass

    async def __aiter__(self) -> AsyncIterator[tuple[InferResponse | None, bool]]:
        while not self.done:
            response, final = await self.queue.get()
            self.done = final
            yield response, final

    async def collect(self) -> list[InferResponse]:
        """Every response until the final one (errors included, None dropped)."""
        return [r async for r, _ in self if r is not None]

    def close(self) -> None:
        """Release the admission ticket; a request not finished yet is cancelled."""
        self.closed = True
        if not self.done and self.request is not None:
            self.request.cancelled.set()
        if self._ticket is not None:
            self.admission.leave(self._ticket)
            self._ticket = None


class Calls:
    """Starts inference calls: `build(state, version) -> InferRequest` runs on the pool (it
    decodes and checks the request against the model's config), then the backend gets it."""

    def __init__(self, api: Api, pool: ThreadPoolExecutor) -> None:
        self.api, self.pool = api, pool

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def start(self, name: str, version: str,
                    build: Callable[[ModelState, LoadedVersion], InferRequest]) -> Call:
        call = Call(asyncio.get_running_loop(), self.api.admission)
        try:
            await self.run(self._submit, call, name, version, build)
        except BaseException:
            call.close()
            raise
        return call

    def _submit(self, call: Call, name: str, version: str,
                build: Callable[[ModelState, LoadedVersion], InferRequest]) -> None:
        st, lv = self.api.manager.get(name, version)
        assert st.config is not None
        call.request = build(st, lv)
        if call.closed:  # the client went away while the request was being decoded
            call.request.cancelled.set()
        call.decoupled = st.config.model_transaction_policy.decoupled
        self.api.manager.submit(lv, call.request, call)
