"""HTTP answers both services give the same way: JSON bodies (orjson) and the JSON error body
``{error: {code, message}}``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from shared.protocol import dumps_json


def json_response(data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """``data`` as an ``application/json; charset=utf-8`` response."""
    return web.Response(
        body=dumps_json(data), status=status, headers=headers, content_type="application/json", charset="utf-8"
    )


def json_error(status: int, code: str, message: str, *, retry_after: int | None = None) -> web.Response:
    """A JSON error with a stable ``code``; ``retry_after`` (seconds) adds the Retry-After header."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)
