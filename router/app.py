"""The router service: owns its Redis pool and the node-registry refresher; ``create_app`` wires it
into aiohttp. Handlers live in :mod:`router.handlers`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from prometheus_client import CollectorRegistry

from router.idempotency import IdempotencyStore
from shared.auth import ApiKeys, bearer
from shared.config import RouterConfig
from shared.errors import AuthError, InvalidRequest, StoreUnavailable
from shared.http import json_response
from shared.keys import Keys
from shared.logs import get_logger
from shared.metrics import Metrics
from shared.redis import describe_target
from shared.routing import Sender
from shared.runtime import stop_task
from shared.store import Store

log = get_logger("beeline.router")

RETRY_AFTER_S: Final = 1
PUBLIC_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})


class Router:
    """Redis pool, mailbox, presence, node registry view and delivery transport of one router process."""

    def __init__(self, cfg: RouterConfig, *, registry: CollectorRegistry | None = None) -> None:
        self.cfg = cfg
        self.keys = Keys(cfg.key_prefix)
        self.metrics = Metrics(registry or CollectorRegistry(), service="router")
        self.api_keys = ApiKeys(cfg.api_keys)
        self._store: Store | None = None
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        cfg = self.cfg
        self._store = store = Store.open(cfg, self.keys, self.metrics, dedup_ttl_s=cfg.idempotency_window_s)
        self.mailbox = store.mailbox
        self.presence = store.presence
        self.nodes = store.nodes
        self.delivery = store.delivery
        self.sender = Sender(
            self.mailbox,
            self.nodes,
            self.delivery,
            max_payload_bytes=cfg.max_payload_bytes,
            metrics=self.metrics,
            push_in_append=store.push_in_append,
        )
        self.idempotency = IdempotencyStore(store.redis, self.keys, self.metrics, window_s=cfg.idempotency_window_s)
        self._refresher = asyncio.create_task(self._refresh_nodes(), name="node-registry-refresh")
        log.info("router_started", routing=cfg.routing, redis=describe_target(cfg), port=cfg.port)

    async def _refresh_nodes(self) -> None:
        # Every min(1 s, interval / 2): see shared.nodes for why this keeps live nodes live.
        period = min(1.0, self.cfg.heartbeat_interval_s / 2)
        while True:
            with contextlib.suppress(StoreUnavailable):
                await self.nodes.refresh()
            await asyncio.sleep(period)

    async def stop(self) -> None:
        await stop_task(self._refresher)
        self._refresher = None
        if self._store is not None:
            await self._store.aclose()
            self._store = None
        log.info("router_stopped")


ROUTER_KEY: Final = web.AppKey("router", Router)
SCOPE_KEY: Final = "beeline.api_scope"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """How a failed request is answered: status, stable error code, message and extra headers."""

    status: int
    code: str
    message: str
    headers: Mapping[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


def error_reply(router: Router, error: Exception, route: str) -> ErrorReply:
    """Maps a request's exception to its answer and counts rejections; unexpected ones are logged."""
    if isinstance(error, AuthError):
        router.metrics.reject("unauthorized")
        return ErrorReply(401, "unauthorized", str(error), {"WWW-Authenticate": "Bearer"})
    if isinstance(error, InvalidRequest):
        router.metrics.reject(error.code)
        return ErrorReply(413 if error.code == "payload_too_large" else 400, error.code, error.message)
    if isinstance(error, StoreUnavailable):
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        return ErrorReply(503, "unavailable", "message store unavailable; retry later", retry)
    if isinstance(error, ConnectionError):
        # The client went away before its request was read: nobody will see the answer, and it is not
        # a server fault (aiohttp raises ConnectionResetError from request.read()).
        log.info("request_abandoned", route=route)
        return ErrorReply(400, "incomplete_request", "the connection closed before the request was read")
    if isinstance(error, web.HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(error.status, "http_error")
        return ErrorReply(error.status, code, error.reason)
    log.error("request_failed", route=route, exc_info=error)
    return ErrorReply(500, "internal", "internal error")


def authenticate(router: Router, authorization: str | None) -> str:
    """The API key's scope, from the Authorization header; raises :class:`AuthError`."""
    token = bearer(authorization)
    if token is None:
        raise AuthError("missing bearer API key")
    return router.api_keys.check(token)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticates, maps errors to JSON responses, and counts requests by route and status."""
    router = request.app[ROUTER_KEY]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    start = time.perf_counter()
    response: web.StreamResponse
    try:
        if request.path not in PUBLIC_PATHS:
            request[SCOPE_KEY] = authenticate(router, request.headers.get("Authorization"))
        response = await handler(request)
    except Exception as e:  # every failure gets a JSON answer; unexpected ones are logged
        reply = error_reply(router, e, route)
        response = json_response(reply.as_json(), status=reply.status, headers=reply.headers)
    router.metrics.observe_http(route, response.status, time.perf_counter() - start)
    return response


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object; raises :class:`InvalidRequest` otherwise."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # invalid JSON or UTF-8, or nested deeper than Python recurses
        raise InvalidRequest("bad_json", "request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidRequest("bad_json", "request body must be a JSON object")
    return body


async def read_json(request: web.Request) -> dict[str, Any]:
    return parse_json_object(await request.read())


def create_app(cfg: RouterConfig, *, registry: CollectorRegistry | None = None) -> web.Application:
    """The router's aiohttp application; the ``Router`` lives under ``ROUTER_KEY``."""
    from router import handlers  # noqa: PLC0415 - handlers import this module's helpers

    app = web.Application(middlewares=[errors_middleware], client_max_size=16 * 1024 * 1024)
    router = Router(cfg, registry=registry)
    app[ROUTER_KEY] = router

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await router.start()
        yield
        await router.stop()

    app.cleanup_ctx.append(lifecycle)
    handlers.add_routes(app)
    return app


OPENAPI_PATH: Final = Path(__file__).with_name("openapi.json")
