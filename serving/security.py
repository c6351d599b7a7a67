"""Access control for the gRPC front and containment of model files.

- TLS: `server_credentials` turns a PEM certificate and key into gRPC server credentials.
- Bearer token: `BearerTokenInterceptor` checks `authorization: Bearer <token>` on every RPC
  (missing or wrong -> UNAUTHENTICATED), with a constant-time comparison.
- Hostile bytes: `add_service` registers the service with deserializers that turn a message
  that does not parse into INVALID_ARGUMENT (gRPC would answer UNKNOWN and log a traceback).
- Containment: everything a model loads must resolve inside the repository, so that neither a
  name, a symlink, a `default_model_filename` nor a config override sent over the network can
  make the server import or read a file elsewhere.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from tritonclient.grpc import model_config_pb2 as mc

from serving.types import ServingError

TOKEN_ENV = "SHARDSERVE_AUTH_TOKEN"
# files a backend opens by default in a version folder (pytorch tries both)
DEFAULT_FILES = {"python": ["model.py"], "pytorch": ["model.pt", "model.pt2"],
                 "pytorch_libtorch": ["model.pt", "model.pt2"], "onnxruntime": ["model.onnx"],
                 "onnxruntime_onnx": ["model.onnx"]}
# config parameters whose value is a path (relative to the version folder)
PATH_PARAMETERS = ("model_path",)


# --- TLS and tokens ------------------------------------------------------------------------------
def server_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    """gRPC server credentials from a PEM certificate (chain) and its private key."""
    pems = []
    for what, path in (("certificate", cert), ("key", key)):
        try:
            pems.append(Path(path).read_bytes())
        except OSError as e:
            raise ServingError("INVALID_ARGUMENT", f"TLS {what} {path}: {e.strerror}") from None
        if b"-----BEGIN" not in pems[-1]:
            raise ServingError("INVALID_ARGUMENT", f"TLS {what} {path} is not PEM")
    return grpc.ssl_server_credentials([(pems[1], pems[0])])


def auth_token(given: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The bearer token: the command-line value, else $SHARDSERVE_AUTH_TOKEN, else None."""
    token = given if given is not None else (os.environ if env is None else env).get(TOKEN_ENV)
    if token is not None and not token.strip():
        raise ServingError("INVALID_ARGUMENT", "the auth token is empty")
    return token


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC whose `authorization` metadata is not `Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key.lower() == "authorization":
                got = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(got, self._expected)
        return False

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or self._authorized(handler_call_details):
            return handler
        has = any(k.lower() == "authorization"
                  for k, _ in handler_call_details.invocation_metadata or ())
        message = ("invalid bearer token" if has else
                   "missing 'authorization: Bearer <token>' metadata")
        return _refusal(handler, message)


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails with UNAUTHENTICATED."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **codec)
    return grpc.unary_unary_rpc_method_handler(refuse, **codec)


# --- undecodable messages -----------------------------------------------------------------------
class Undecodable:
    """Stands for a request message that did not parse (a stream handler answers it)."""

    def __init__(self, error: Exception) -> None:
        self.message = f"malformed request message: {error}"


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # DecodeError and friends: protobuf's message names the type
            return Undecodable(e)
    return decode


def _checked_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behavior(request, context)
    return call


class _Capture:
    """Stands in for a server to collect the generated code's handler registration."""

    handlers: tuple = ()

    def add_generic_rpc_handlers(self, handlers: tuple) -> None:
        self.handlers = tuple(handlers)


class _TolerantHandler(grpc.GenericRpcHandler):
    """The generated handlers with tolerant deserializers; unary behaviours answer
    INVALID_ARGUMENT themselves, streaming ones receive `Undecodable` items."""

    def __init__(self, inner: tuple) -> None:
        self._inner = inner

    def service(self, handler_call_details: grpc.HandlerCallDetails
                ) -> grpc.RpcMethodHandler | None:
        for generic in self._inner:
            handler = generic.service(handler_call_details)
            if handler is not None:
                return self._wrap(handler)
        return None

    @staticmethod
    def _wrap(h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        codec = {"request_deserializer": _tolerant(h.request_deserializer),
                 "response_serializer": h.response_serializer}
        if h.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_checked_unary(h.unary_unary), **codec)
        if h.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(h.stream_stream, **codec)
        return h  # no other kind in the inference service


def add_service(add_to_server: Callable[[Any, Any], None], servicer: Any, server: Any) -> None:
    """Register `servicer` (through the generated `add_..._to_server`) with tolerant decoding."""
    capture = _Capture()
    add_to_server(servicer, capture)
    server.add_generic_rpc_handlers((_TolerantHandler(capture.handlers),))


# --- containment ---------------------------------------------------------------------------------
def inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every symlink resolved, lies in `root` (itself resolved)."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def _refuse(message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", message)


def check_model_folder(model_dir: Path, root: Path) -> None:
    """Refuse a model folder holding a symlink that points outside the repository."""
    if not inside(model_dir, root):
        raise _refuse(f"model folder {model_dir} resolves outside the repository {root}")
    for folder, dirs, files in os.walk(model_dir):
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink() and not inside(path, root):
                raise _refuse(f"{path} is a symlink to {os.readlink(path)}, outside the "
                              f"repository {root}; only the repository's own files are loaded")


def check_model_files(config: mc.ModelConfig, model_dir: Path, version: int,
                      root: Path) -> None:
    """The version folder and the model file a backend will open stay inside the repository."""
    name = config.default_model_filename
    if name and (Path(name).name != name or name in (".", "..") or "\\" in name):
        raise _refuse(f"model '{config.name}': default_model_filename {name!r} must be a "
                      "file name inside the version folder, not a path")
    folder = model_dir / str(version)
    if not inside(folder, root):
        raise _refuse(f"model '{config.name}': version folder {folder} resolves outside the "
                      f"repository {root}")
    kind = config.backend or config.platform
    for file in [name] if name else DEFAULT_FILES.get(kind, []):
        path = folder / file
        if (path.exists() or path.is_symlink()) and not inside(path, root):
            raise _refuse(f"model '{config.name}': {path} resolves outside the repository "
                          f"{root}")


def check_override(override: mc.ModelConfig, on_disk: mc.ModelConfig | None, model_dir: Path,
                   root: Path) -> None:
    """A config sent with RepositoryModelLoad may not point at files outside the repository:
    path parameters must resolve inside the model folder unless config.pbtxt (written by
    whoever runs the server) already says the same."""
    for key in PATH_PARAMETERS:
        p = override.parameters.get(key)
        if p is None:
            continue
        old = on_disk.parameters.get(key) if on_disk is not None else None
        if old is not None and old.string_value == p.string_value:
            continue
        raw = p.string_value or "."
        if Path(raw).is_absolute() or not inside(model_dir / "1" / raw, model_dir):
            raise _refuse(f"load parameter 'config' of '{override.name}': parameter '{key}' "
                          f"({raw!r}) points outside the model folder {model_dir}; only "
                          "config.pbtxt may name files elsewhere")
