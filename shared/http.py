"""HTTP answers both services give the same way: the JSON error body ``{error: {code, message}}``."""

from __future__ import annotations

from aiohttp import web


def json_error(status: int, code: str, message: str, *, retry_after: int | None = None) -> web.Response:
    """A JSON error with a stable ``code``; ``retry_after`` (seconds) adds the Retry-After header."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)
