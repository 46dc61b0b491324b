"""HTTP handlers of the router API (``/v1``); see ``router/openapi.json`` for the contract."""

from __future__ import annotations

import hashlib
import json
from functools import partial
from typing import Any, Final

from aiohttp import web

from router.app import OPENAPI_PATH, ROUTER_KEY, SCOPE_KEY, Router, read_json
from router.idempotency import IdempotencyConflict
from shared.envelope import Envelope
from shared.errors import InvalidRequest, StoreUnavailable
from shared.http import json_error, json_response
from shared.metrics import CONTENT_TYPE_LATEST
from shared.presence import UserPresence
from shared.protocol import ErrorCode, parse_send, valid_user_id
from shared.routing import Message, SendResult

MAX_BATCH: Final = 1000
MAX_PRESENCE_QUERY: Final = 1000
DEFAULT_SENDER: Final = "system"


def _message(router: Router, body: dict[str, Any], request: web.Request, index: int = 0) -> Message:
    return parse_message(router, body, request[SCOPE_KEY], request.headers.get("Idempotency-Key"), index)


def parse_message(router: Router, body: dict[str, Any], scope: str, key: str | None, index: int = 0) -> Message:
    """Validates one send. Under an Idempotency-Key the msg id is derived from (API key, key, index),
    so a retry carries the same id and the mailbox appends it at most once per receiver."""
    parsed = parse_send(body, max_receivers=router.cfg.max_receivers)
    sender = body.get("from", DEFAULT_SENDER)
    valid_user_id(sender, "from")
    msg_id = None
    if key is not None:
        msg_id = hashlib.sha256(f"{scope}\0{key}\0{index}".encode()).hexdigest()[:32]
    envelope = Envelope.create(sender=sender, channel=parsed.channel, payload=parsed.payload, msg_id=msg_id)
    return Message(envelope, parsed.to, idempotent=key is not None)


async def send_one(router: Router, message: Message) -> dict[str, Any]:
    """Sends one message; the 202 body ``{id, results}``."""
    [results] = await router.sender.send([message])
    return message_result(message, results)


def message_result(message: Message, results: list[SendResult]) -> dict[str, Any]:
    return {"id": message.envelope.msg_id, "results": [r.as_json() for r in results]}


async def _idempotent(request: web.Request, body_bytes: bytes, make: Any) -> web.Response:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return json_response(await make(), status=202)
    store = request.app[ROUTER_KEY].idempotency
    try:
        response, replayed = await store.run_once(request[SCOPE_KEY], key, body_bytes, make)
    except IdempotencyConflict as e:
        return json_error(e.status, e.code, e.message)
    return json_response(response, status=202, headers={"Idempotent-Replayed": "true" if replayed else "false"})


async def send_message(request: web.Request) -> web.Response:
    """POST /v1/messages {to, channel, payload, from?} -> 202 {id, results: [{to, seq, status, nodes}]}."""
    router = request.app[ROUTER_KEY]
    raw = await request.read()
    message = _message(router, await read_json(request), request)

    return await _idempotent(request, raw, partial(send_one, router, message))


async def send_batch(request: web.Request) -> web.Response:
    """POST /v1/messages/batch {messages: [...]} -> 202 {results: [...]}, one item per message, in order.

    The whole batch is validated before anything is stored: a bad item rejects the request (400, the
    message names its index) and nothing is sent.
    """
    router = request.app[ROUTER_KEY]
    raw = await request.read()
    body = await read_json(request)
    items = body.get("messages")
    if not isinstance(items, list) or not items:
        raise InvalidRequest(ErrorCode.INVALID_FIELD, "messages must be a non-empty list")
    if len(items) > MAX_BATCH:
        raise InvalidRequest(ErrorCode.INVALID_FIELD, f"at most {MAX_BATCH} messages per batch")
    messages = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidRequest(ErrorCode.INVALID_FIELD, f"messages[{index}] must be an object")
        try:
            messages.append(_message(router, item, request, index))
        except InvalidRequest as e:
            raise InvalidRequest(e.code, f"messages[{index}]: {e.message}") from None
    for message in messages:
        router.sender.pack(message.envelope)  # size check before anything is stored

    async def make() -> dict[str, Any]:
        results = await router.sender.send(messages)
        out = []
        for message, per_message in zip(messages, results, strict=True):
            item = message_result(message, per_message)
            if len(per_message) == 1:  # a single receiver: its fields inline, like a one-to-one send
                item.update(per_message[0].as_json())
            out.append(item)
        return {"results": out}

    return await _idempotent(request, raw, make)


async def _presence(router: Router, user_ids: list[str]) -> list[UserPresence]:
    raws = await router.presence.lookup_many(user_ids)
    result = []
    for user_id, raw in zip(user_ids, raws, strict=True):
        live = await router.nodes.live_subset(raw)
        result.append(UserPresence(user_id, sum(live.values()), tuple(sorted(live))))
    return result


async def get_presence(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    user_id = valid_user_id(request.match_info["user"], "user")
    [presence] = await _presence(router, [user_id])
    return json_response(presence.as_json())


async def query_presence(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    users = (await read_json(request)).get("users")
    if not isinstance(users, list) or not users:
        raise InvalidRequest(ErrorCode.INVALID_FIELD, "users must be a non-empty list")
    if len(users) > MAX_PRESENCE_QUERY:
        raise InvalidRequest(ErrorCode.INVALID_FIELD, f"at most {MAX_PRESENCE_QUERY} users per query")
    user_ids = [valid_user_id(u, "users[]") for u in users]
    return json_response({"results": [p.as_json() for p in await _presence(router, user_ids)]})


async def list_nodes(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    view = await router.nodes.refresh()
    infos = await router.nodes.infos(view.live_nodes())
    return json_response(
        {
            "nodes": [
                {"node": i.node_id, "connections": i.connections, "stream_lag": i.stream_lag, "draining": i.draining}
                for i in infos
            ]
        }
    )


async def disconnect_user(request: web.Request) -> web.Response:
    """DELETE /v1/users/{user}/connections: the command goes only to the nodes holding the user."""
    router = request.app[ROUTER_KEY]
    user_id = valid_user_id(request.match_info["user"], "user")
    [presence] = await _presence(router, [user_id])
    if presence.nodes:
        await router.delivery.disconnect(user_id, presence.nodes)
    return json_response(
        {"user": user_id, "nodes": list(presence.nodes), "connections": presence.connections}, status=202
    )


async def healthz(_request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    try:
        await router.nodes.refresh()
    except StoreUnavailable:
        return json_error(503, "unavailable", "redis unavailable", retry_after=1)
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    return web.Response(body=router.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(_request: web.Request) -> web.Response:
    return json_response(json.loads(OPENAPI_PATH.read_text(encoding="utf-8")))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", send_message)
    app.router.add_post("/v1/messages/batch", send_batch)
    app.router.add_get("/v1/presence/{user}", get_presence)
    app.router.add_post("/v1/presence/query", query_presence)
    app.router.add_get("/v1/nodes", list_nodes)
    app.router.add_delete("/v1/users/{user}/connections", disconnect_user)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
