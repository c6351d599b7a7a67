"""The OpenAI-compatible API (placeholder until its routes land)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from serving.api import Calls


def add_routes(app: web.Application, calls: Calls, chat_template: Path | None) -> None:
    """No OpenAI routes yet."""
