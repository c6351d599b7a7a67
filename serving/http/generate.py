"""Triton's generate extension: `POST /v2/models/{m}[/versions/{v}]/generate` answers one JSON
object, `.../generate_stream` a Server-Sent Event per response. Each top-level key of the
request (but `id` and `parameters`) is the input of that name, typed by the model's config;
each output comes back as a key (one element: a scalar, more: a list)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from aiohttp import web
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from serving.api import Calls
from serving.convert import config_datatype, set_param, to_infer_request
from serving.http.app import http_status, open_sse
from serving.http.kserve import MODEL, VERSION, single_response
from serving.http.kserve_codec import json_tensor, parse_json
from serving.manager import LoadedVersion, ModelState
from serving.types import InferRequest, InferResponse, ServingError


def _bad(message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", message)


def _shape(value: Any, spec: mc.ModelInput, batched: bool) -> list[int]:
    """The tensor shape of a JSON value for input `spec`: a scalar fills one element, a list
    (possibly nested) its own shape."""
    shape: list[int] = []
    v = value
    while isinstance(v, list):
        shape.append(len(v))
        v = v[0] if v else None
    if not shape:
        shape = [1] * max(1, len(spec.dims))
    return [1, *shape] if batched else shape


def to_request_message(obj: dict[str, Any], config: mc.ModelConfig, name: str,
                       version: str, stream: bool) -> pb.ModelInferRequest:
    """A generate body as a ModelInferRequest, every input typed by the config."""
    specs = {i.name: i for i in config.input}
    msg = pb.ModelInferRequest(model_name=name, model_version=version)
    request_id = obj.get("id", "")
    if not isinstance(request_id, str):
        raise _bad("'id' must be a string")
    msg.id = request_id
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise _bad("'parameters' must be a JSON object")
    for k, v in params.items():
        if not isinstance(v, (bool, int, float, str)):
            raise _bad(f"parameter '{k}' must be a bool, number or string")
        set_param(msg.parameters[k], v)
    values = {k: v for k, v in obj.items() if k not in ("id", "parameters")}
    if stream and "stream" in specs and "stream" not in values:
        values["stream"] = True  # generate_stream streams tokens without being told twice
    for key, value in values.items():
        spec = specs.get(key)
        if spec is None:
            raise _bad(f"unexpected key '{key}' for model '{name}': it has inputs "
                       f"{sorted(specs)} (sampling settings may also go in 'parameters')")
        datatype = config_datatype(spec.data_type)
        shape = _shape(value, spec, config.max_batch_size > 0)
        msg.inputs.add(name=key, datatype=datatype, shape=shape)
        msg.raw_input_contents.append(json_tensor(value, datatype, shape, key))
    return msg


def _json_value(array: np.ndarray) -> Any:
    flat = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v
            for v in np.asarray(array).reshape(-1).tolist()]
    return flat[0] if len(flat) == 1 else flat


def response_json(resp: InferResponse, req: InferRequest) -> dict[str, Any]:
    out: dict[str, Any] = {"model_name": req.model_name, "model_version": req.model_version}
    if req.id:
        out["id"] = req.id
    for k, array in resp.outputs.items():
        if req.requested_outputs is None or k in req.requested_outputs:
            out[k] = _json_value(array)
    for k, v in resp.parameters.items():
        out.setdefault(k, v)
    return out


class GenerateRoutes:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def _start(self, request: web.Request, stream: bool) -> Any:
        name = request.match_info["model"]
        version = request.match_info.get("version", "")
        obj = parse_json(await request.read())
        if not isinstance(obj, dict):
            raise _bad("the generate request must be a JSON object")

        def build(st: ModelState, lv: LoadedVersion) -> InferRequest:
            assert st.config is not None
            msg = to_request_message(obj, st.config, name, version, stream)
            return to_infer_request(msg, st.config, str(lv.version), unary=not stream)

        return await self.calls.start(name, version, build)

    async def generate(self, request: web.Request) -> web.Response:
        call = await self._start(request, False)
        try:
            responses = await call.collect()
        finally:
            call.close()
        resp = single_response(responses, request.match_info["model"], "generate_stream")
        return web.json_response(response_json(resp, call.request))

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        call = await self._start(request, True)
        try:
            async with open_sse(request) as sse:
                async for resp, _ in call:
                    if resp is None:
                        continue
                    if resp.error is not None:
                        await sse.send(json.dumps({"error": resp.error.message,
                                                   "status": http_status(resp.error)}))
                        break
                    await sse.send(json.dumps(response_json(resp, call.request),
                                              separators=(",", ":")))
            return sse
        finally:
            call.close()


def add_routes(app: web.Application, calls: Calls) -> None:
    r = GenerateRoutes(calls)
    for base in (MODEL, VERSION):
        app.router.add_post(base + "/generate", r.generate)
        app.router.add_post(base + "/generate_stream", r.generate_stream)
