"""The router HTTP API against a real router process, real gateways and a real Redis.

Pinned here: API-key auth and the JSON error shape, validation codes and statuses, batch order and
all-or-nothing validation, presence and node listings, Idempotency-Key (replay, racing retry,
mismatch), 503 with Retry-After while Redis is down and recovery without a restart, /metrics, and that
/openapi.json documents exactly the routes the app registers.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.app import OPENAPI_PATH, create_app
from shared.config import RouterConfig, load
from tests.support import API_KEY, Client, Cluster, RedisServer, Service, api_headers, api_send, eventually

pytestmark = pytest.mark.redis

HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
V1_CALLS: list[tuple[str, str, Any]] = [
    ("POST", "/v1/messages", {"to": "alice", "channel": "chat", "payload": 1}),
    ("POST", "/v1/messages/batch", {"messages": [{"to": "alice", "channel": "chat", "payload": 1}]}),
    ("GET", "/v1/presence/alice", None),
    ("POST", "/v1/presence/query", {"users": ["alice"]}),
    ("GET", "/v1/nodes", None),
    ("DELETE", "/v1/users/alice/connections", None),
]
PUBLIC_PATHS = ("/healthz", "/readyz", "/metrics", "/openapi.json")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def code(self) -> str:
        """The ``error.code`` of a JSON error body (fails the test when the body is not one)."""
        assert isinstance(self.body, dict) and set(self.body) == {"error"}, self.body
        error = self.body["error"]
        assert set(error) == {"code", "message"}, error
        assert isinstance(error["code"], str) and isinstance(error["message"], str) and error["message"], error
        return str(error["code"])


async def call(
    session: aiohttp.ClientSession,
    svc: Service,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One request; JSON bodies are decoded. ``headers`` defaults to a valid API key."""
    kwargs: dict[str, Any] = {"headers": api_headers() if headers is None else headers}
    if raw is not None:
        kwargs["data"] = raw
        kwargs["headers"] = {"Content-Type": "application/json", **kwargs["headers"]}
    elif body is not None:
        kwargs["json"] = body
    async with session.request(
        method, svc.base_url + path, timeout=aiohttp.ClientTimeout(total=timeout), **kwargs
    ) as r:
        payload: Any = await r.json() if r.content_type == "application/json" else await r.text()
        return Reply(r.status, dict(r.headers), payload)


def message(to: Any, payload: Any = "hi", channel: str = "chat", **extra: Any) -> dict[str, Any]:
    return {"to": to, "channel": channel, "payload": payload, **extra}


async def marker_is_first(client: Client, session: aiohttp.ClientSession, router: Service) -> None:
    """Proves that nothing was stored for ``client``'s user before: a marker sent now gets seq 1 and is
    the first message the client receives."""
    result = await api_send(session, router, client.user, payload="marker")
    assert result["results"][0]["seq"] == 1, result
    first = (await client.wait_messages(1))[0]
    assert first["payload"] == "marker" and first["seq"] == 1, first


# -- auth ----------------------------------------------------------------------------------------------


async def test_v1_endpoints_need_a_valid_api_key(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """Every /v1 endpoint answers 401 ``unauthorized`` (JSON error, ``WWW-Authenticate: Bearer``) without
    a key, with an unknown key or with another scheme; nothing is sent."""
    router = cluster.router()
    wrong = [
        {},
        {"Authorization": "Bearer not-the-key"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": "Bearer"},
        {"Authorization": API_KEY},
    ]
    for method, path, body in V1_CALLS:
        for headers in wrong:
            reply = await call(session, router, method, path, body, headers=headers)
            assert reply.status == 401, (method, path, headers, reply)
            assert reply.code == "unauthorized", (method, path, reply)
            assert reply.headers.get("WWW-Authenticate") == "Bearer", reply.headers
    reply = await call(session, router, "GET", "/v1/presence/alice")
    assert reply.status == 200 and reply.body["connections"] == 0, reply


async def test_operational_endpoints_need_no_key(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """/healthz, /readyz, /metrics and /openapi.json answer 200 without an API key; unknown paths and
    wrong methods get JSON 404 ``not_found`` / 405 ``method_not_allowed``."""
    router = cluster.router()
    health = await call(session, router, "GET", "/healthz", headers={})
    assert (health.status, health.body) == (200, {"status": "ok"})
    ready = await call(session, router, "GET", "/readyz", headers={})
    assert (ready.status, ready.body) == (200, {"status": "ready"})
    metrics = await call(session, router, "GET", "/metrics", headers={})
    assert metrics.status == 200 and metrics.headers["Content-Type"].startswith("text/plain"), metrics.headers
    spec = await call(session, router, "GET", "/openapi.json", headers={})
    assert spec.status == 200 and spec.body["openapi"].startswith("3.1"), spec.status

    missing = await call(session, router, "GET", "/v1/nope")
    assert (missing.status, missing.code) == (404, "not_found")
    wrong_method = await call(session, router, "GET", "/v1/messages")
    assert (wrong_method.status, wrong_method.code) == (405, "method_not_allowed")


# -- POST /v1/messages ---------------------------------------------------------------------------------

INVALID_SENDS: list[tuple[str, bytes | dict[str, Any], int, str]] = [
    ("not json", b"{not json", 400, "bad_json"),
    ("empty body", b"", 400, "bad_json"),
    ("json array", b'[{"to": "alice"}]', 400, "bad_json"),
    ("json string", b'"hello"', 400, "bad_json"),
    ("invalid utf-8", b'{"to": "\xff\xfe"}', 400, "bad_json"),
    ("to missing", {"channel": "chat", "payload": 1}, 400, "invalid_field"),
    ("to a number", message(5), 400, "invalid_field"),
    ("to an object", message({"user": "alice"}), 400, "invalid_field"),
    ("to empty string", message(""), 400, "invalid_field"),
    ("to empty list", message([]), 400, "invalid_field"),
    ("to with a non-string", message(["alice", 5]), 400, "invalid_field"),
    ("to too long", message("u" * 257), 400, "invalid_field"),
    ("too many receivers", message(["alice", "b", "c", "d"]), 400, "too_many_receivers"),
    ("channel missing", {"to": "alice", "payload": 1}, 400, "invalid_field"),
    ("channel a number", message("alice", channel=5), 400, "invalid_field"),  # type: ignore[arg-type]
    ("channel empty", message("alice", channel=""), 400, "invalid_field"),
    ("channel too long", message("alice", channel="c" * 129), 400, "invalid_field"),
    ("payload missing", {"to": "alice", "channel": "chat"}, 400, "invalid_field"),
    ("from a number", message("alice", **{"from": 5}), 400, "invalid_field"),
    ("from empty", message("alice", **{"from": ""}), 400, "invalid_field"),
    ("payload too large", message("alice", "x" * 2048), 413, "payload_too_large"),
    (
        "payload integer beyond 64 bits",
        b'{"to": "alice", "channel": "c", "payload": 123456789012345678901}',
        400,
        "invalid_field",
    ),
    (
        "nested deeper than Python parses",
        b'{"to": "alice", "channel": "c", "payload": ' + b"[" * 100_000 + b"]",
        400,
        "bad_json",
    ),
]


async def test_send_validation_errors(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """Each invalid POST /v1/messages gets its status and stable code (400 bad_json / invalid_field /
    too_many_receivers, 413 payload_too_large, 400 for an over-long Idempotency-Key) and stores
    nothing; duplicate receivers count once against the receiver limit."""
    gw = cluster.gateway("g1")
    router = cluster.router(BEELINE_MAX_RECEIVERS="3", BEELINE_MAX_PAYLOAD_BYTES="1024")
    alice = await Client.connect(session, gw, "alice")
    failures = []
    for name, body, status, code in INVALID_SENDS:
        if isinstance(body, bytes):
            reply = await call(session, router, "POST", "/v1/messages", raw=body)
        else:
            reply = await call(session, router, "POST", "/v1/messages", body)
        if reply.status != status or reply.code != code:
            failures.append(f"{name}: expected {status} {code}, got {reply.status} {reply.body}")
    long_key = await call(
        session, router, "POST", "/v1/messages", message("alice"), headers=api_headers(**{"Idempotency-Key": "k" * 256})
    )
    if (long_key.status, long_key.code) != (400, "invalid_field"):
        failures.append(f"long Idempotency-Key: got {long_key.status} {long_key.body}")
    assert not failures, "\n".join(failures)
    await marker_is_first(alice, session, router)

    # Duplicates are one receiver: five entries naming two users are within a limit of 3.
    ok = await call(session, router, "POST", "/v1/messages", message(["alice", "bob", "alice", "bob", "alice"]))
    assert ok.status == 202, ok
    assert [(r["to"], r["seq"]) for r in ok.body["results"]] == [("alice", 2), ("bob", 1)]
    await alice.close()


async def test_send_result_shape(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """A send answers 202 {id, results: [{to, seq, epoch, status, nodes}]} in ``to`` order: ``routed``
    with the node for an online receiver, ``stored`` with no node for an offline one; ``from``
    defaults to ``system`` and can be set by the caller."""
    gw = cluster.gateway("g1")
    router = cluster.router()
    alice = await Client.connect(session, gw, "alice")
    reply = await call(session, router, "POST", "/v1/messages", message(["nobody", "alice"], {"k": [1, 2]}))
    assert reply.status == 202, reply
    assert isinstance(reply.body["id"], str) and len(reply.body["id"]) == 32
    assert "Idempotent-Replayed" not in reply.headers
    assert reply.body["results"] == [
        {"to": "nobody", "seq": 1, "epoch": reply.body["results"][0]["epoch"], "status": "stored", "nodes": []},
        {"to": "alice", "seq": 1, "epoch": alice.epoch, "status": "routed", "nodes": ["g1"]},
    ]
    await api_send(session, router, "alice", payload="signed", **{"from": "support"})
    first, second = await alice.wait_messages(2)
    assert (first["from"], first["payload"], first["id"]) == ("system", {"k": [1, 2]}, reply.body["id"])
    assert (second["from"], second["payload"], second["seq"]) == ("support", "signed", 2)
    await alice.close()


# -- POST /v1/messages/batch ---------------------------------------------------------------------------


async def test_batch_results_in_order_with_seq(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """A batch answers 202 with one result per message in request order, each with its own id and the
    per-receiver seq; single-receiver items also carry the receiver's fields inline; receivers get the
    messages in order."""
    gw = cluster.gateway("g1")
    router = cluster.router()
    alice = await Client.connect(session, gw, "alice")
    batch = {
        "messages": [
            message("alice", "a1"),
            message("bob", "b1"),
            message("alice", "a2", channel="other"),
            message(["bob", "carol"], "bc", **{"from": "ops"}),
        ]
    }
    reply = await call(session, router, "POST", "/v1/messages/batch", batch)
    assert reply.status == 202, reply
    results = reply.body["results"]
    assert len(results) == 4
    assert len({r["id"] for r in results}) == 4
    assert [(r["to"], r["seq"], r["status"], r["nodes"]) for r in results[:3]] == [
        ("alice", 1, "routed", ["g1"]),
        ("bob", 1, "stored", []),
        ("alice", 2, "routed", ["g1"]),
    ]
    for item in results[:3]:
        [inner] = item["results"]
        assert {k: item[k] for k in inner} == inner
    assert "to" not in results[3]
    assert [(r["to"], r["seq"], r["status"]) for r in results[3]["results"]] == [
        ("bob", 2, "stored"),
        ("carol", 1, "stored"),
    ]
    messages = await alice.wait_messages(2)
    assert [(m["seq"], m["payload"], m["channel"], m["id"]) for m in messages] == [
        (1, "a1", "chat", results[0]["id"]),
        (2, "a2", "other", results[2]["id"]),
    ]
    await alice.close()


async def test_batch_with_an_invalid_item_is_rejected_whole(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """One invalid message rejects the whole batch: 400 (413 for an oversized payload) whose message
    names the index, and nothing of the batch is stored or delivered; a malformed ``messages`` is 400."""
    gw = cluster.gateway("g1")
    router = cluster.router(BEELINE_MAX_PAYLOAD_BYTES="1024")
    alice = await Client.connect(session, gw, "alice")
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        (
            {"messages": [message("alice", 1), message("alice", 2), {"to": "alice", "payload": 3}]},
            400,
            "invalid_field",
            "messages[2]",
        ),
        ({"messages": [message("alice", 1), message(5)]}, 400, "invalid_field", "messages[1]"),
        ({"messages": [message("alice", 1), "not an object"]}, 400, "invalid_field", "messages[1]"),
        ({"messages": [message("alice", 1), message("alice", "x" * 4096)]}, 413, "payload_too_large", ""),
        ({"messages": []}, 400, "invalid_field", "messages"),
        ({"messages": {"to": "alice"}}, 400, "invalid_field", "messages"),
        ({}, 400, "invalid_field", "messages"),
        ({"messages": [message("alice")] * 1001}, 400, "invalid_field", "1000"),
    ]
    for body, status, code, mention in cases:
        reply = await call(session, router, "POST", "/v1/messages/batch", body)
        assert (reply.status, reply.code) == (status, code), (body if len(str(body)) < 300 else "...", reply)
        assert mention in reply.body["error"]["message"], reply.body
    # alice's first message is the marker, with seq 1: no item of any rejected batch was stored.
    await marker_is_first(alice, session, router)
    assert len(alice.messages()) == 1
    await alice.close()


# -- presence and nodes --------------------------------------------------------------------------------


async def test_presence_single_and_query_in_order(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """GET /v1/presence/{user} for a user never seen is 200 offline; POST /v1/presence/query answers one
    presence object per user in request order (connections on live nodes, sorted node ids); bad queries
    are 400."""
    g1, g2 = cluster.gateway("g1"), cluster.gateway("g2")
    router = cluster.router()
    never = await call(session, router, "GET", "/v1/presence/never-seen")
    assert never.status == 200
    assert never.body == {"user": "never-seen", "online": False, "connections": 0, "nodes": []}

    clients = [
        await Client.connect(session, g2, "alice"),
        await Client.connect(session, g1, "alice"),
        await Client.connect(session, g1, "alice"),
        await Client.connect(session, g1, "bob"),
    ]
    expected = [
        {"user": "bob", "online": True, "connections": 1, "nodes": ["g1"]},
        {"user": "never-seen", "online": False, "connections": 0, "nodes": []},
        {"user": "alice", "online": True, "connections": 3, "nodes": ["g1", "g2"]},
    ]
    latest: list[Any] = []

    async def as_expected() -> bool:
        reply = await call(session, router, "POST", "/v1/presence/query", {"users": ["bob", "never-seen", "alice"]})
        assert reply.status == 200, reply
        latest[:] = reply.body["results"]
        return bool(latest == expected)

    await eventually(as_expected, what=f"presence {expected} (last {latest})")
    alice = await call(session, router, "GET", "/v1/presence/alice")
    assert alice.body == expected[2]

    for body in ({"users": []}, {"users": "alice"}, {"users": ["alice", 5]}, {"users": [""]}, {}):
        reply = await call(session, router, "POST", "/v1/presence/query", body)
        assert (reply.status, reply.code) == (400, "invalid_field"), (body, reply)
    bad_json = await call(session, router, "POST", "/v1/presence/query", raw=b"users")
    assert (bad_json.status, bad_json.code) == (400, "bad_json")
    too_long = await call(session, router, "GET", "/v1/presence/" + "u" * 257)
    assert (too_long.status, too_long.code) == (400, "invalid_field")
    for c in clients:
        await c.close()


async def test_nodes_lists_live_gateways(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """GET /v1/nodes lists each live gateway with its connection count, stream lag and draining=false;
    a node that stopped leaves the list."""
    g1, g2 = cluster.gateway("g1"), cluster.gateway("g2")
    router = cluster.router()
    clients = [await Client.connect(session, g1, "alice"), await Client.connect(session, g1, "bob")]
    latest: list[Any] = []

    async def listed(expected: dict[str, int]) -> bool:
        reply = await call(session, router, "GET", "/v1/nodes")
        assert reply.status == 200, reply
        latest[:] = reply.body["nodes"]
        for node in latest:
            assert set(node) == {"node", "connections", "stream_lag", "draining"}, node
            assert isinstance(node["stream_lag"], int) and node["stream_lag"] >= 0, node
            assert node["draining"] is False, node
        return {n["node"]: n["connections"] for n in latest} == expected

    await eventually(lambda: listed({"g1": 2, "g2": 0}), what=f"g1 with 2 connections and g2 (last {latest})")
    g2.stop()
    await eventually(lambda: listed({"g1": 2}), what=f"g2 gone (last {latest})")
    for c in clients:
        await c.close()


# -- Idempotency-Key -----------------------------------------------------------------------------------


async def test_idempotent_retry_delivers_once_and_replays_the_answer(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """The same Idempotency-Key with the same body, sent again, delivers once and answers 202 with the
    first answer (same id and seq) and ``Idempotent-Replayed: true`` (the first says ``false``); the
    same holds for batches."""
    gw = cluster.gateway("g1")
    router = cluster.router()
    alice = await Client.connect(session, gw, "alice")
    headers = api_headers(**{"Idempotency-Key": "order-1-shipped"})
    first = await call(session, router, "POST", "/v1/messages", message("alice", "once"), headers=headers)
    second = await call(session, router, "POST", "/v1/messages", message("alice", "once"), headers=headers)
    assert first.status == second.status == 202, (first, second)
    assert first.body == second.body
    assert first.body["results"][0]["seq"] == 1
    assert first.headers["Idempotent-Replayed"] == "false"
    assert second.headers["Idempotent-Replayed"] == "true"

    batch = {"messages": [message("alice", "b1"), message("alice", "b2")]}
    batch_headers = api_headers(**{"Idempotency-Key": "batch-1"})
    batch_first = await call(session, router, "POST", "/v1/messages/batch", batch, headers=batch_headers)
    batch_again = await call(session, router, "POST", "/v1/messages/batch", batch, headers=batch_headers)
    assert batch_first.status == batch_again.status == 202
    assert batch_first.body == batch_again.body
    assert [r["seq"] for r in batch_first.body["results"]] == [2, 3]
    assert batch_again.headers["Idempotent-Replayed"] == "true"

    await api_send(session, router, "alice", payload="after")
    messages = await alice.wait_messages(4)
    assert [(m["seq"], m["payload"]) for m in messages] == [(1, "once"), (2, "b1"), (3, "b2"), (4, "after")]
    await alice.close()


async def test_idempotent_retry_racing_the_original_delivers_once(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """Two requests with the same Idempotency-Key and body fired at once: both answer 202 with the same
    body (one of them replayed), and the receiver gets the message once."""
    gw = cluster.gateway("g1")
    router = cluster.router()
    alice = await Client.connect(session, gw, "alice")
    for attempt in range(5):
        headers = api_headers(**{"Idempotency-Key": f"race-{attempt}"})
        body = message(["alice", "bob"], f"race {attempt}")
        a, b = await asyncio.gather(
            call(session, router, "POST", "/v1/messages", body, headers=headers),
            call(session, router, "POST", "/v1/messages", body, headers=headers),
        )
        assert a.status == b.status == 202, (a, b)
        assert a.body == b.body
        assert sorted([a.headers["Idempotent-Replayed"], b.headers["Idempotent-Replayed"]]) == ["false", "true"]
        assert [r["seq"] for r in a.body["results"]] == [attempt + 1, attempt + 1]
    await api_send(session, router, "alice", payload="after")
    messages = await alice.wait_messages(6)
    assert [m["payload"] for m in messages] == [f"race {i}" for i in range(5)] + ["after"]
    assert [m["seq"] for m in messages] == [1, 2, 3, 4, 5, 6]
    await alice.close()


async def test_idempotency_key_reused_with_another_body_is_422(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """The same Idempotency-Key with a different body is 422 ``idempotency_mismatch`` and sends nothing;
    keys are scoped per API key, so another API key may use the same key for its own request."""
    gw = cluster.gateway("g1")
    router = cluster.router(BEELINE_API_KEYS=f"{API_KEY},second-key")
    alice = await Client.connect(session, gw, "alice")
    headers = api_headers(**{"Idempotency-Key": "k1"})
    first = await call(session, router, "POST", "/v1/messages", message("alice", "one"), headers=headers)
    assert first.status == 202
    other = await call(session, router, "POST", "/v1/messages", message("alice", "two"), headers=headers)
    assert (other.status, other.code) == (422, "idempotency_mismatch")
    other_batch = await call(
        session, router, "POST", "/v1/messages/batch", {"messages": [message("alice", "three")]}, headers=headers
    )
    assert (other_batch.status, other_batch.code) == (422, "idempotency_mismatch")

    second_key = {"Authorization": "Bearer second-key", "Idempotency-Key": "k1"}
    own = await call(session, router, "POST", "/v1/messages", message("alice", "four"), headers=second_key)
    assert own.status == 202 and own.headers["Idempotent-Replayed"] == "false", own
    messages = await alice.wait_messages(2)
    assert [(m["seq"], m["payload"]) for m in messages] == [(1, "one"), (2, "four")]
    await api_send(session, router, "alice", payload="after")
    assert [m["payload"] for m in await alice.wait_messages(3)] == ["one", "four", "after"]
    await alice.close()


# -- Redis outage --------------------------------------------------------------------------------------


async def test_redis_down_gives_503_with_retry_after_and_the_router_recovers(
    own_redis: RedisServer, session: aiohttp.ClientSession
) -> None:
    """With Redis stopped, every /v1 endpoint answers 503 ``unavailable`` with Retry-After within
    seconds (no hang), /readyz is 503 and /healthz 200; when Redis is back on the same port the router
    serves again by itself, and a send that failed with an Idempotency-Key can be retried with it."""
    c = Cluster(redis_url=own_redis.url)
    try:
        router = c.router(BEELINE_REDIS_TIMEOUT_SECONDS="1")
        assert (await call(session, router, "POST", "/v1/messages", message("alice"))).status == 202
        own_redis.stop()

        for method, path, body in V1_CALLS:
            reply = await call(session, router, method, path, body, timeout=8)
            assert (reply.status, reply.code) == (503, "unavailable"), (method, path, reply)
            assert int(reply.headers["Retry-After"]) >= 1, reply.headers
        keyed = api_headers(**{"Idempotency-Key": "during-outage"})
        failed = await call(
            session, router, "POST", "/v1/messages", message("alice", "retried"), headers=keyed, timeout=8
        )
        assert failed.status == 503
        ready = await call(session, router, "GET", "/readyz", headers={}, timeout=8)
        assert (ready.status, ready.code) == (503, "unavailable")
        assert int(ready.headers["Retry-After"]) >= 1
        health = await call(session, router, "GET", "/healthz", headers={}, timeout=8)
        assert health.status == 200

        own_redis.start()

        async def serves() -> bool:
            reply = await call(session, router, "POST", "/v1/messages", message("alice", "back"), timeout=8)
            assert reply.status in (202, 503), reply
            return reply.status == 202

        await eventually(serves, timeout=15, interval=0.1, what="router serving after Redis came back")
        retried = await call(session, router, "POST", "/v1/messages", message("alice", "retried"), headers=keyed)
        assert retried.status == 202 and retried.headers["Idempotent-Replayed"] == "false", retried
        ready = await call(session, router, "GET", "/readyz", headers={})
        assert ready.status == 200
    finally:
        c.stop()


# -- metrics and the OpenAPI document ------------------------------------------------------------------


async def test_metrics_are_prometheus_text(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """/metrics is Prometheus text that parses, and counts sends in ``beeline_messages_total`` by outcome."""
    router = cluster.router()
    await api_send(session, router, ["alice", "bob"])
    reply = await call(session, router, "GET", "/metrics", headers={})
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    samples = [s for family in text_string_to_metric_families(reply.body) for s in family.samples]
    stored = [s for s in samples if s.name == "beeline_messages_total" and s.labels.get("outcome") == "stored"]
    assert sum(s.value for s in stored) == 2, stored
    names = {s.name for s in samples}
    assert {"beeline_http_requests_total", "beeline_mailbox_appends_total"} <= names, sorted(names)


def _resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = spec
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


async def test_openapi_documents_every_route(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """GET /openapi.json (no key) is an OpenAPI 3.1 document whose paths and methods are exactly the
    routes the router registers; /v1 operations need the bearer key and document 401 and 503 (with
    Retry-After), the public ones need none; every error response uses the {error: {code, message}}
    schema. When openapi-spec-validator is installed, the document also passes it."""
    router = cluster.router()
    reply = await call(session, router, "GET", "/openapi.json", headers={})
    assert reply.status == 200
    spec = reply.body
    assert spec["openapi"].startswith("3.1.")
    assert spec == json.loads(OPENAPI_PATH.read_text(encoding="utf-8"))

    app = create_app(load(RouterConfig, {"BEELINE_API_KEYS": "k"}))
    # aiohttp adds HEAD to every GET route by itself; the document lists the methods routes are made for.
    registered = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {(path, method) for path, item in spec["paths"].items() for method in item if method in HTTP_METHODS}
    assert registered == documented, {"undocumented": registered - documented, "not served": documented - registered}

    scheme = spec["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert spec["security"] == [{"apiKey": []}]
    error_schema = spec["components"]["schemas"]["Error"]
    assert error_schema["required"] == ["error"]
    assert set(error_schema["properties"]["error"]["required"]) == {"code", "message"}
    for path, method in sorted(documented):
        operation = spec["paths"][path][method]
        responses = {status: _resolve(spec, r) for status, r in operation["responses"].items()}
        if path in PUBLIC_PATHS:
            assert operation.get("security") == [], (path, method)
        else:
            assert "security" not in operation, (path, method)
            assert {"401", "503"} <= set(responses), (path, method)
            assert "Retry-After" in responses["503"]["headers"], (path, method)
        assert any(s.startswith("2") for s in responses), (path, method)
        for status, response in responses.items():
            if status.startswith(("4", "5")):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (path, method, status)
    for path in ("/v1/messages", "/v1/messages/batch"):
        operation = spec["paths"][path]["post"]
        assert {"202", "400", "401", "409", "413", "422", "503"} <= set(operation["responses"]), path
        params = [_resolve(spec, p) for p in operation["parameters"]]
        assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in params), path

    try:
        from openapi_spec_validator import validate
    except ImportError:  # a development tool, not a dependency of the project
        return
    validate(spec)
