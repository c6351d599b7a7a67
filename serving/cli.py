"""`shardserve serve` (the gRPC front on a model repository) and `shardserve repo add` (write a
ready model entry for an HF checkpoint or shard folder)."""

from __future__ import annotations

import argparse
import asyncio
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.errors import CommandError
from serving.types import ServingError

if TYPE_CHECKING:
    from serving.http.app import HttpOptions
    from serving.server import FrontOptions


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model repository (KServe v2 gRPC + HTTP, OpenAI API)")
    p.add_argument("--model-repository", required=True, type=Path, metavar="DIR")
    p.add_argument("--grpc-port", type=int, default=8001, help="0 picks a free port")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--http-port", type=int, default=8000,
                   help="HTTP port of the REST, generate and OpenAI fronts (0 picks a free port)")
    p.add_argument("--allow-http", type=_bool, default=True, metavar="true|false",
                   help="serve the HTTP fronts (default true)")
    p.add_argument("--chat-template", type=Path, metavar="FILE",
                   help="Jinja chat template for /v1/chat/completions, instead of the one in "
                   "the model's tokenizer files")
    p.add_argument("--model-control-mode", choices=["none", "explicit", "poll"], default="none",
                   help="none: load every model at start; explicit: load through the API; "
                   "poll: load at start, then follow repository changes")
    p.add_argument("--repository-poll-secs", type=float, default=15.0, metavar="S",
                   help="poll mode: seconds between repository checks")
    p.add_argument("--metrics-port", type=int, default=8002,
                   help="Prometheus metrics port (0 picks a free port)")
    p.add_argument("--no-metrics", dest="allow_metrics", action="store_false",
                   help="do not serve Prometheus metrics")
    p.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="explicit mode: load NAME at start ('*' for all); repeatable")
    p.add_argument("--workers", type=int, default=64, help="request-handling threads")
    p.add_argument("--max-message-bytes", type=int, default=64 * 2**20,
                   help="largest gRPC message received or sent (bigger: RESOURCE_EXHAUSTED)")
    p.add_argument("--no-exit-on-error", dest="exit_on_error", action="store_false",
                   help="keep serving when a startup model fails to load")
    _add_reliability_options(p)
    p.set_defaults(func=run_serve)

    repo = sub.add_parser("repo", help="model repository tools")
    rsub = repo.add_subparsers(dest="repo_command", required=True, metavar="ACTION")
    a = rsub.add_parser("add", help="add a giant model (HF checkpoint or shard folder)")
    a.add_argument("repository", type=Path, metavar="REPO")
    a.add_argument("name", metavar="NAME")
    a.add_argument("--model", required=True, type=Path, metavar="DIR",
                   help="HF checkpoint directory or shard folder")
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    a.add_argument("--copy", action="store_true",
                   help="copy the checkpoint into the version folder instead of referencing it")
    a.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="extra backend parameter (e.g. num_blocks=512); repeatable")
    a.add_argument("--force", action="store_true", help="replace an existing entry")
    a.set_defaults(func=run_repo_add)


def _add_reliability_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grpc-tls-cert", type=Path, metavar="PEM",
                   help="serve gRPC over TLS with this certificate (needs --grpc-tls-key)")
    p.add_argument("--grpc-tls-key", type=Path, metavar="PEM", help="the TLS private key")
    p.add_argument("--http-tls-cert", type=Path, metavar="PEM",
                   help="serve HTTP over TLS with this certificate (default: the gRPC one)")
    p.add_argument("--http-tls-key", type=Path, metavar="PEM",
                   help="the HTTP TLS private key (default: the gRPC one)")
    p.add_argument("--auth-token", metavar="TOKEN",
                   help="require 'authorization: Bearer TOKEN' on every RPC (default: "
                   "$SHARDSERVE_AUTH_TOKEN; unset: no token)")
    p.add_argument("--grace-period-s", type=float, default=30.0, metavar="S",
                   help="on SIGTERM/SIGINT, wait up to S seconds for in-flight requests")
    p.add_argument("--max-inflight", type=int, default=1024, metavar="N",
                   help="in-flight inference requests; more are refused (RESOURCE_EXHAUSTED)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=4096, metavar="N",
                   help="concurrent gRPC calls of any kind; more are refused by gRPC")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


def _http_options(args: argparse.Namespace, token: str | None) -> HttpOptions | None:
    from serving.http.app import HttpOptions

    if not args.allow_http:
        return None
    if (args.http_tls_cert is None) != (args.http_tls_key is None):
        raise CommandError("--http-tls-cert and --http-tls-key go together")
    if args.chat_template is not None and not args.chat_template.is_file():
        raise CommandError(f"--chat-template {args.chat_template}: no such file")
    cert = args.http_tls_cert or args.grpc_tls_cert
    key = args.http_tls_key or args.grpc_tls_key
    return HttpOptions(host=args.host, port=args.http_port, tls_cert=cert, tls_key=key,
                       auth_token=token, max_body_bytes=args.max_message_bytes,
                       chat_template=args.chat_template)


def _front_options(args: argparse.Namespace, metrics: bool) -> FrontOptions:
    from serving.security import auth_token
    from serving.server import FrontOptions

    if (args.grpc_tls_cert is None) != (args.grpc_tls_key is None):
        raise CommandError("--grpc-tls-cert and --grpc-tls-key go together")
    for flag in ("max_inflight", "max_concurrent_rpcs", "max_message_bytes", "workers"):
        if getattr(args, flag) < 1:
            raise CommandError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.grace_period_s < 0:
        raise CommandError("--grace-period-s must be >= 0")
    try:
        token = auth_token(args.auth_token)
    except ServingError as e:
        raise CommandError(e.message) from None
    return FrontOptions(
        host=args.host, port=args.grpc_port, workers=args.workers,
        max_message_bytes=args.max_message_bytes, exit_on_error=args.exit_on_error,
        metrics_port=args.metrics_port if metrics else None,
        poll_secs=args.repository_poll_secs, tls_cert=args.grpc_tls_cert,
        tls_key=args.grpc_tls_key, auth_token=token, grace_period_s=args.grace_period_s,
        max_inflight=args.max_inflight, max_concurrent_rpcs=args.max_concurrent_rpcs,
        http=_http_options(args, token))


def run_serve(args: argparse.Namespace) -> int:
    from serving.manager import ModelManager
    from serving.metrics import ServerMetrics
    from serving.repository import ModelRepository
    from serving.server import serve

    metrics = ServerMetrics() if args.allow_metrics else None
    opts = _front_options(args, metrics is not None)
    try:
        manager = ModelManager(ModelRepository(args.model_repository), args.model_control_mode,
                               metrics=metrics)
    except ServingError as e:
        raise CommandError(e.message) from None
    explicit = args.model_control_mode == "explicit"
    startup = list(args.load_model) if explicit and "*" not in args.load_model else None
    if _launched_worker():  # a non-zero rank of a launched world: follow step plans, no front
        manager.load_startup(startup)
        return 0
    try:
        return asyncio.run(serve(manager, startup, opts))
    except ServingError as e:  # e.g. the port is taken or the TLS files are bad
        raise CommandError(e.message) from None


def _launched_worker() -> bool:
    """True on ranks 1.. of a world started by torchrun/mpirun/srun (they serve no gRPC)."""
    from launcher.discovery import discover_ranks

    info = discover_ranks()
    return info.launched and info.rank != 0


def _params(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--param {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def add_llm_model(repository: Path, name: str, model: Path, tp: int = 1, pp: int = 1,
                  dtype: str | None = None, copy: bool = False,
                  extra: dict[str, str] | None = None, force: bool = False) -> Path:
    """Write `<repository>/<name>/config.pbtxt` and version folder 1 for a giant model."""
    from serving.backends.llm_io import llm_model_config
    from serving.config import config_text
    from serving.repository import ModelRepository

    model = model.resolve()
    if not ((model / "config.json").is_file() or (model / "manifest.json").is_file()):
        raise CommandError(f"{model} is neither an HF checkpoint (config.json) nor a shard "
                           "folder (manifest.json)")
    if tp < 1 or pp < 1:
        raise CommandError("--tp and --pp must be >= 1")
    repository.mkdir(parents=True, exist_ok=True)
    try:
        entry = ModelRepository(repository).model_dir(name)
    except ServingError as e:
        raise CommandError(e.message) from None
    if entry.exists() and not force:
        raise CommandError(f"{entry} exists (use --force to replace it)")
    version = entry / "1"
    if copy:
        if version.exists():
            shutil.rmtree(version)
        shutil.copytree(model, version)
    version.mkdir(parents=True, exist_ok=True)
    cfg = llm_model_config(name, "." if copy else str(model), tp, pp, dtype, extra)
    (entry / "config.pbtxt").write_text(config_text(cfg), encoding="utf-8")
    return entry


def run_repo_add(args: argparse.Namespace) -> int:
    entry = add_llm_model(args.repository, args.name, args.model, args.tp, args.pp, args.dtype,
                          args.copy, _params(args.param), args.force)
    print(f"added {entry} (tp={args.tp}, pp={args.pp})")
    return 0
