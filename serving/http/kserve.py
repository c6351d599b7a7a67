"""Triton's KServe v2 REST API: health, metadata, config, statistics, repository control and
`infer` (JSON tensors and the binary tensor data extension), as Triton serves it."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from serving.api import EXTENSIONS, SERVER_NAME, SERVER_VERSION, Calls
from serving.convert import to_infer_request
from serving.http.kserve_codec import (
    HEADER_LENGTH,
    encode_infer,
    parse_infer,
    parse_json,
    proto_json,
)
from serving.manager import LoadedVersion, ModelState
from serving.types import InferRequest, InferResponse, ServingError

MODEL = "/v2/models/{model}"
VERSION = "/v2/models/{model}/versions/{version}"


def _ids(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


def single_response(responses: list[InferResponse], model: str, api: str) -> InferResponse:
    """The one response a non-streaming call must have (the first error wins)."""
    error = next((r.error for r in responses if r.error is not None), None)
    if error is not None:
        raise error
    if len(responses) != 1:
        raise ServingError("INVALID_ARGUMENT", f"model '{model}' sent {len(responses)} "
                           f"responses; use {api} for it")
    return responses[0]


class KServeRoutes:
    """The handlers; each answers JSON (errors via the app's middleware)."""

    def __init__(self, calls: Calls) -> None:
        self.calls, self.api = calls, calls.api

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": SERVER_NAME, "version": SERVER_VERSION,
                                  "extensions": EXTENSIONS})

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        ok = self.api.server_ready()
        return web.Response(status=200) if ok else _not_ready("the server is not ready")

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _ids(request)
        if await self.calls.run(self.api.manager.ready, name, version):
            return web.Response(status=200)
        return _not_ready(f"model '{name}' is not ready")

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = _ids(request)
        return web.json_response(proto_json(self.api.model_metadata(name, version)))

    async def model_config(self, request: web.Request) -> web.Response:
        name, version = _ids(request)
        return web.json_response(proto_json(self.api.model_config(name, version)))

    async def model_stats(self, request: web.Request) -> web.Response:
        name, version = request.match_info.get("model", ""), request.match_info.get(
            "version", "")
        stats = self.api.manager.statistics(name, version)
        return web.json_response({"model_stats": [proto_json(s) for s in stats]})

    async def index(self, request: web.Request) -> web.Response:
        body = await request.read()
        ready = False
        if body.strip():
            obj = parse_json(body)
            if not isinstance(obj, dict) or not isinstance(obj.get("ready", False), bool):
                raise ServingError("INVALID_ARGUMENT", "the index request must be a JSON "
                                   "object with an optional boolean 'ready'")
            ready = obj.get("ready", False)
        models = self.api.manager.index(ready)
        return web.json_response([proto_json(m) for m in models])

    async def _control_params(self, request: web.Request) -> dict[str, Any]:
        body = await request.read()
        if not body.strip():
            return {}
        obj = parse_json(body)
        params = obj.get("parameters", {}) if isinstance(obj, dict) else None
        if not isinstance(params, dict):
            raise ServingError("INVALID_ARGUMENT", "the request must be a JSON object with an "
                               "optional 'parameters' object")
        return params

    async def load(self, request: web.Request) -> web.Response:
        params = await self._control_params(request)
        await self.calls.run(self.api.load, request.match_info["model"], params)
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        await self._control_params(request)
        await self.calls.run(self.api.unload, request.match_info["model"])
        return web.Response(status=200)

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _ids(request)
        body = await request.read()
        header_length = request.headers.get(HEADER_LENGTH)
        seen: dict[str, Any] = {}

        def build(st: ModelState, lv: LoadedVersion) -> InferRequest:
            msg, wanted = parse_infer(body, header_length, name, version)
            seen.update(wanted=wanted, lv=lv)
            assert st.config is not None
            return to_infer_request(msg, st.config, str(lv.version), unary=True)

        call = await self.calls.start(name, version, build)
        try:
            responses = await call.collect()
        finally:
            call.close()
        resp = single_response(responses, name, "generate_stream or gRPC streaming")
        req, lv = call.request, seen["lv"]
        assert req is not None
        out, n = await self.calls.run(encode_infer, resp, name, req.model_version, req.id,
                                      seen["wanted"], lv.backend.config, lv.backend.model_dir)
        if n is None:
            return web.Response(body=out, content_type="application/json")
        return web.Response(body=out, content_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(n)})


def _not_ready(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


def add_routes(app: web.Application, calls: Calls) -> None:
    r = KServeRoutes(calls)
    app.router.add_get("/v2", r.server_metadata)
    app.router.add_get("/v2/health/live", r.live)
    app.router.add_get("/v2/health/ready", r.ready)
    app.router.add_get("/v2/models/stats", r.model_stats)
    for base in (MODEL, VERSION):
        app.router.add_get(base, r.model_metadata)
        app.router.add_get(base + "/ready", r.model_ready)
        app.router.add_get(base + "/config", r.model_config)
        app.router.add_get(base + "/stats", r.model_stats)
        app.router.add_post(base + "/infer", r.infer)
    app.router.add_post("/v2/repository/index", r.index)
    app.router.add_post("/v2/repository/models/{model}/load", r.load)
    app.router.add_post("/v2/repository/models/{model}/unload", r.unload)
