"""The HTTP fronts on aiohttp, in the same event loop as the gRPC front: Triton's REST API and
its generate extension (`/v2/...`) and an OpenAI-compatible API (`/v1/...`), over the same
model manager, admission limit and thread pool.

aiohttp was measured against uvicorn + starlette on this machine (a JSON echo, 16 concurrent
clients): 6.1-7.2k vs 5.5-5.7k requests/s, 0.59-0.68 vs 0.65-0.93 ms per sequential request;
and it runs inside the server's asyncio loop without a second server framework's signal
handling.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp_sse import sse_response

from serving.api import Api, Calls
from serving.types import ServingError

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# ServingError status -> HTTP status (Triton's mapping; overload and not-ready are 503)
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
    "CANCELLED": 499, "INTERNAL": 500, "UNKNOWN": 500, "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "RESOURCE_EXHAUSTED": 503,
    "DEADLINE_EXCEEDED": 504,
}
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
                503: "service_unavailable", 500: "internal_error"}
LIVENESS = ("/v2/health/live", "/health")  # answered without a token (Kubernetes probes)
RETRY_AFTER_S = "1"


def http_status(error: ServingError) -> int:
    return HTTP_STATUS.get(error.status, 500)


def error_response(path: str, status: int, message: str) -> web.Response:
    """Triton's `{"error": msg}` on /v2 routes, OpenAI's error object on /v1 routes."""
    if path.startswith("/v1/"):
        body: dict[str, Any] = {"error": {"message": message,
                                          "type": OPENAI_TYPES.get(status, "error"),
                                          "param": None, "code": status}}
    else:
        body = {"error": message}
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ServingError as e:
        return error_response(request.path, http_status(e), e.message)
    except web.HTTPRequestEntityTooLarge as e:
        return error_response(request.path, 413, f"the request body is larger than the "
                              f"server's --max-message-bytes ({e.text})")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(request.path, e.status, f"{e.reason}: {request.method} "
                              f"{request.path}")
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:  # a bug must answer with a status and a message, not a bare 500
        log.exception("HTTP %s %s failed", request.method, request.path)
        return error_response(request.path, 500, f"internal error: {type(e).__name__}: {e}")


def _auth(token: str | None) -> Any:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is not None and request.path not in LIVENESS:
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                resp = error_response(request.path, 401, "missing or wrong bearer token: send "
                                      "'Authorization: Bearer <token>'")
                resp.headers["WWW-Authenticate"] = "Bearer"
                return resp
        return await handler(request)

    return check


def open_sse(request: web.Request) -> Any:
    """A Server-Sent Events response for a POST, events separated like Triton's and
    OpenAI's (`data: ...` then a blank line)."""
    return sse_response(request, sep="\n", allow_all_methods=True)


def json_body(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ServingError("INVALID_ARGUMENT", f"failed to parse the request JSON: {e}") from None


@dataclass
class HttpOptions:
    """Where and how the HTTP fronts listen."""

    host: str = "127.0.0.1"
    port: int = 8000
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth_token: str | None = None
    max_body_bytes: int = 64 * 2**20
    chat_template: Path | None = None


def _ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise ServingError("INVALID_ARGUMENT", f"HTTP TLS certificate {cert} / key {key}: "
                           f"{e}") from None
    return ctx


class HttpFront:
    """The aiohttp application with every HTTP route, started and stopped with the server."""

    def __init__(self, api: Api, pool: ThreadPoolExecutor, opts: HttpOptions) -> None:
        from serving.http import generate, kserve, openai_api

        self.opts = opts
        self.calls = Calls(api, pool)
        self.app = web.Application(middlewares=[_errors, _auth(opts.auth_token)],
                                   client_max_size=opts.max_body_bytes)
        kserve.add_routes(self.app, self.calls)
        generate.add_routes(self.app, self.calls)
        openai_api.add_routes(self.app, self.calls, opts.chat_template)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> int:
        """Listen; returns the bound port (the one asked for, or a free one for 0)."""
        ctx = None
        if self.opts.tls_cert is not None and self.opts.tls_key is not None:
            ctx = _ssl_context(self.opts.tls_cert, self.opts.tls_key)
        # handler_cancellation: a client that disconnects cancels its handler, which cancels
        # its request (KV blocks are freed at the next engine step)
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.opts.host, self.opts.port, ssl_context=ctx)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise ServingError("UNAVAILABLE", f"cannot listen on {self.opts.host}:"
                               f"{self.opts.port} (HTTP): {e.strerror}") from None
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
