"""The gateway's client protocol against a real gateway process and a real Redis.

Pinned here: authentication before the upgrade (HTTP 401 with a JSON error; 400 for a bad ``since``),
the ``welcome`` frame, the stamped ``from``, the stable ``error`` codes for every kind of bad input (after
which the connection keeps working), the close codes (1009 oversized frame, 4000 admin disconnect, 4001
token expired, 4008 slow consumer), catch-up of a large backlog at the reader's pace, the msgpack
subprotocol, and the connection limit (HTTP 503).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.protocol import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK, CloseCode, ErrorCode
from tests.support import (
    JWT_SECRET,
    Client,
    Cluster,
    Service,
    api_headers,
    api_send,
    assert_exactly_once_in_order,
    eventually,
    token,
)

pytestmark = pytest.mark.redis


# -- helpers -------------------------------------------------------------------------------------------


def make_jwt(claims: dict[str, Any], secret: str = JWT_SECRET, **kwargs: Any) -> str:
    """An HS256 token made with PyJWT directly, not with ``beeline token``."""
    return jwt.encode(claims, secret, algorithm="HS256", **kwargs)


def upgrade_headers(**extra: str) -> dict[str, str]:
    """A WebSocket upgrade request's headers, so the gateway answers what it answers a real client."""
    return {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        **extra,
    }


async def refused_upgrade(
    session: aiohttp.ClientSession,
    gw: Service,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """Sends an upgrade request that the gateway must refuse; returns (status, headers, JSON body)."""
    async with session.get(gw.ws_url, headers=upgrade_headers(**(headers or {})), params=params) as r:
        assert r.status != 101, "the gateway upgraded a request it should have refused"
        assert r.content_type == "application/json", (r.status, r.content_type, await r.text())
        return r.status, dict(r.headers), await r.json()


class Wire:
    """A raw WebSocket client that records each frame with its WebSocket kind (text or binary)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[tuple[aiohttp.WSMsgType, dict[str, Any]]] = []
        self.close_code: int | None = None
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(
        cls,
        session: aiohttp.ClientSession,
        gw: Service,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        protocols: tuple[str, ...] = (),
    ) -> Wire:
        ws = await session.ws_connect(gw.ws_url, headers=headers, params=params, protocols=protocols, heartbeat=None)
        return cls(ws)

    async def _read(self) -> None:
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.frames.append((msg.type, dict(json.loads(msg.data))))
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    self.frames.append((msg.type, dict(msgpack.unpackb(msg.data, raw=False))))
                else:
                    return
                self._changed.set()
        finally:
            self.close_code = self.ws.close_code
            self._changed.set()

    async def wait_for(
        self, predicate: Callable[[aiohttp.WSMsgType, dict[str, Any]], bool], timeout: float = 10.0, what: str = ""
    ) -> tuple[aiohttp.WSMsgType, dict[str, Any]]:
        """The first recorded frame matching ``predicate``; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            for kind, frame in self.frames:
                if predicate(kind, frame):
                    return kind, frame
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._reader.done():
                raise AssertionError(f"no frame {what}; got {self.frames[-5:]} (close={self.close_code})")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.5))

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        """Waits (bounded) until the server closed the connection; returns the close code."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), timeout=timeout)
        assert self._reader.done(), f"still open after {timeout}s"
        return self.close_code

    async def welcome(self) -> dict[str, Any]:
        return (await self.wait_for(lambda _k, f: f["type"] == "welcome", what="welcome"))[1]

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def bearer(user_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {user_token}"}


async def sample(session: aiohttp.ClientSession, svc: Service, name: str) -> float:
    """The sum of every sample called ``name`` in ``svc``'s /metrics (0 when absent)."""
    async with session.get(f"{svc.base_url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


def send_frame(to: Any, payload: Any = "hi", channel: str = "chat", **extra: Any) -> dict[str, Any]:
    return {"type": "send", "to": to, "channel": channel, "payload": payload, **extra}


async def assert_still_serves(sender: Client, receiver: Client, payload: str) -> None:
    """A fresh message from ``sender`` reaches ``receiver``: both connections still work."""
    before = len(receiver.messages())
    reply = await sender.send_and_wait(send_frame(receiver.user, payload))
    assert reply["type"] == "sent", reply
    await receiver.wait_for(lambda c: len(c.messages()) > before, what=f"message {payload!r}")
    assert receiver.messages()[-1]["payload"] == payload


# -- authentication ------------------------------------------------------------------------------------


async def test_bad_or_missing_token_gets_401_json_before_upgrade(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """A missing, garbage, foreign-secret, expired, sub-less or alg=none token gets HTTP 401 with
    ``{error: {code: unauthorized, message}}`` instead of a WebSocket upgrade; a real WebSocket client is
    refused with 401 too."""
    gw = cluster.gateway("g1")
    now = int(time.time())
    cases: dict[str, dict[str, str]] = {
        "no token": {},
        "garbage bearer": bearer("not-a-jwt"),
        "garbage query": {"token": "a.b.c"},
        "other secret": bearer(make_jwt({"sub": "eve", "exp": now + 600}, secret="another-secret-" + "y" * 32)),
        "expired": bearer(make_jwt({"sub": "eve", "iat": now - 7200, "exp": now - 3600})),
        "no sub": bearer(make_jwt({"exp": now + 600})),
        "empty sub": bearer(make_jwt({"sub": "", "exp": now + 600})),
        "no exp": bearer(make_jwt({"sub": "eve"})),
        "alg none": bearer(jwt.encode({"sub": "eve", "exp": now + 600}, None, algorithm="none")),
        "basic scheme": {"Authorization": "Basic " + base64.b64encode(b"eve:pw").decode()},
    }
    for name, auth in cases.items():
        params = {"token": auth["token"]} if "token" in auth else None
        headers = {k: v for k, v in auth.items() if k != "token"}
        status, _, body = await refused_upgrade(session, gw, headers=headers, params=params)
        assert status == 401, (name, status, body)
        assert body["error"]["code"] == "unauthorized", (name, body)
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], (name, body)

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(gw.ws_url, headers=bearer("not-a-jwt"))
    assert refused.value.status == 401


async def test_token_in_query_or_header_and_any_hs256_token_is_accepted(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """A token works as ``?token=`` (browsers) and as ``Authorization: Bearer``; any HS256 token signed
    with the secret is accepted, whatever extra standard or custom claims and headers it carries, and
    ``sub`` names the user."""
    gw = cluster.gateway("g1")
    now = int(time.time())
    by_query = await Wire.connect(session, gw, params={"token": token("qa")})
    assert (await by_query.welcome())["user"] == "qa"

    foreign = make_jwt(
        {
            "sub": "dave",
            "exp": now + 600,
            "iat": now - 5,
            "nbf": now - 5,
            "iss": "https://idp.example",
            "jti": uuid.uuid4().hex,
            "name": "Dave",
            "roles": ["admin", "ops"],
        },
        headers={"kid": "key-1"},
    )
    by_header = await Wire.connect(session, gw, headers=bearer(foreign))
    assert (await by_header.welcome())["user"] == "dave"
    by_query_foreign = await Wire.connect(session, gw, params={"token": foreign})
    assert (await by_query_foreign.welcome())["user"] == "dave"

    # The connections are real: a message from one reaches the other.
    await by_header.ws.send_json(send_frame("qa", "via header", ref="r1"))
    _, sent = await by_header.wait_for(lambda _k, f: f["type"] == "sent", what="sent")
    assert sent["ref"] == "r1"
    _, msg = await by_query.wait_for(lambda _k, f: f["type"] == "message", what="message")
    assert msg["from"] == "dave" and msg["payload"] == "via header"
    for wire in (by_query, by_header, by_query_foreign):
        await wire.close()


async def test_token_expiring_while_connected_closes_with_4001(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """``exp`` is enforced during the connection too: when it passes, the gateway closes with 4001."""
    gw = cluster.gateway("g1")
    short = make_jwt({"sub": "erin", "exp": int(time.time()) + 2})
    erin = await Wire.connect(session, gw, headers=bearer(short))
    assert (await erin.welcome())["user"] == "erin"
    await erin.wait_closed(timeout=15)
    assert erin.close_code == CloseCode.TOKEN_EXPIRED


async def test_bad_since_is_400_json_before_upgrade(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """A ``since`` that is not a non-negative integer gets HTTP 400 ``invalid_field`` instead of an upgrade."""
    gw = cluster.gateway("g1")
    for since in ("abc", "-1", "1.5"):
        status, _, body = await refused_upgrade(session, gw, headers=bearer(token("bob")), params={"since": since})
        assert (status, body["error"]["code"]) == (400, "invalid_field"), (since, status, body)


# -- welcome and sender stamping ----------------------------------------------------------------------


async def test_welcome_fields_and_from_is_stamped_by_the_server(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """``welcome`` is {type, node, user, conn, epoch}: conn ids differ per connection, the epoch is the
    user's; a client cannot forge ``from``: the server stamps the authenticated user."""
    gw = cluster.gateway("g1")
    bob = await Client.connect(session, gw, "bob")
    bob2 = await Client.connect(session, gw, "bob")
    carol = await Client.connect(session, gw, "carol")
    assert set(bob.welcome) == {"type", "node", "user", "conn", "epoch"}
    assert bob.welcome["node"] == "g1"
    assert bob.welcome["user"] == "bob"
    assert isinstance(bob.welcome["conn"], str) and bob.welcome["conn"]
    assert bob.welcome["conn"] != bob2.welcome["conn"]
    assert isinstance(bob.welcome["epoch"], str) and bob.welcome["epoch"]
    assert bob.welcome["epoch"] == bob2.welcome["epoch"]

    reply = await bob.send_and_wait(send_frame("carol", {"text": "hi"}, **{"from": "mallory"}))
    assert reply["type"] == "sent", reply
    [result] = reply["results"]
    assert result["to"] == "carol" and result["seq"] == 1 and result["status"] == "local"
    [msg] = await carol.wait_messages(1)
    assert msg["from"] == "bob"
    assert msg["payload"] == {"text": "hi"}
    assert msg["seq"] == 1 and msg["epoch"] == carol.epoch
    assert msg["id"] == reply["id"]
    for c in (bob, bob2, carol):
        await c.close()


# -- bad input -----------------------------------------------------------------------------------------

# (name, frame to send: text, bytes or an object sent as JSON, expected code, expected ref in the error)
BAD_INPUT: list[tuple[str, str | bytes | dict[str, Any], str, Any]] = [
    ("not json", "{not json", ErrorCode.BAD_FRAME, None),
    ("empty text", "", ErrorCode.BAD_FRAME, None),
    ("json array", "[1, 2]", ErrorCode.BAD_FRAME, None),
    ("json string", '"send"', ErrorCode.BAD_FRAME, None),
    ("json null", "null", ErrorCode.BAD_FRAME, None),
    ("binary on json", msgpack.packb(send_frame("carol")), ErrorCode.WRONG_FRAME_KIND, None),
    ("unknown type", {"type": "shout", "ref": "u1"}, ErrorCode.UNKNOWN_TYPE, "u1"),
    ("missing type", {"to": "carol", "channel": "c", "payload": 1, "ref": "u2"}, ErrorCode.UNKNOWN_TYPE, "u2"),
    ("type not a string", {"type": 7, "ref": "u3"}, ErrorCode.UNKNOWN_TYPE, "u3"),
    ("to is a number", send_frame(5, ref="f1"), ErrorCode.INVALID_FIELD, "f1"),
    ("to is an object", send_frame({"user": "carol"}, ref="f2"), ErrorCode.INVALID_FIELD, "f2"),
    ("to is empty string", send_frame("", ref="f3"), ErrorCode.INVALID_FIELD, "f3"),
    ("to is empty list", send_frame([], ref="f4"), ErrorCode.INVALID_FIELD, "f4"),
    ("to has a non-string", send_frame(["carol", 5], ref="f5"), ErrorCode.INVALID_FIELD, "f5"),
    ("to too long", send_frame("u" * 257, ref="f6"), ErrorCode.INVALID_FIELD, "f6"),
    ("to missing", {"type": "send", "channel": "c", "payload": 1, "ref": "f7"}, ErrorCode.INVALID_FIELD, "f7"),
    ("channel missing", {"type": "send", "to": "carol", "payload": 1, "ref": "f8"}, ErrorCode.INVALID_FIELD, "f8"),
    ("channel not a string", send_frame("carol", channel=5, ref="f9"), ErrorCode.INVALID_FIELD, "f9"),  # type: ignore[arg-type]
    ("channel empty", send_frame("carol", channel="", ref="f10"), ErrorCode.INVALID_FIELD, "f10"),
    ("payload missing", {"type": "send", "to": "carol", "channel": "c", "ref": "f11"}, ErrorCode.INVALID_FIELD, "f11"),
    ("ref is an object", send_frame("carol", ref={"id": 1}), ErrorCode.INVALID_FIELD, None),
    ("ref is a list", send_frame("carol", ref=[1]), ErrorCode.INVALID_FIELD, None),
    ("too many receivers", send_frame(["r1", "r2", "r3", "r4"], ref="m1"), ErrorCode.TOO_MANY_RECEIVERS, "m1"),
    ("payload too large", send_frame("carol", "x" * 2048, ref="p1"), ErrorCode.PAYLOAD_TOO_LARGE, "p1"),
    ("payload int beyond 64 bits", send_frame("carol", 1 << 70, ref="p2"), ErrorCode.INVALID_FIELD, "p2"),
    ("nested deeper than Python parses", "[" * 100_000, ErrorCode.BAD_FRAME, None),
    ("ack seq string", {"type": "ack", "seq": "3", "ref": "a1"}, ErrorCode.INVALID_FIELD, "a1"),
    ("ack seq float", {"type": "ack", "seq": 1.5, "ref": "a2"}, ErrorCode.INVALID_FIELD, "a2"),
    ("ack seq bool", {"type": "ack", "seq": True, "ref": "a3"}, ErrorCode.INVALID_FIELD, "a3"),
    ("ack seq negative", {"type": "ack", "seq": -1, "ref": "a4"}, ErrorCode.INVALID_FIELD, "a4"),
    ("ack seq missing", {"type": "ack", "ref": "a5"}, ErrorCode.INVALID_FIELD, "a5"),
    ("subscribe no channel", {"type": "subscribe", "ref": "s1"}, ErrorCode.INVALID_FIELD, "s1"),
    ("unsubscribe channel int", {"type": "unsubscribe", "channel": 3, "ref": "s2"}, ErrorCode.INVALID_FIELD, "s2"),
]


async def send_raw(client: Client, frame: str | bytes | dict[str, Any]) -> None:
    if isinstance(frame, bytes):
        await client.ws.send_bytes(frame)
    elif isinstance(frame, str):
        await client.ws.send_str(frame)
    else:
        await client.ws.send_json(frame)


async def test_each_bad_input_gets_its_error_code_and_the_connection_keeps_working(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """Every kind of bad input gets exactly one ``error`` frame with its stable code (echoing a valid
    ``ref``), nothing is sent, and the same connection then sends a valid message that is delivered."""
    gw = cluster.gateway("g1", BEELINE_MAX_RECEIVERS="3", BEELINE_MAX_PAYLOAD_BYTES="1024")
    bob = await Client.connect(session, gw, "bob")
    carol = await Client.connect(session, gw, "carol")
    failures = []
    for name, frame, code, ref in BAD_INPUT:
        errors_before = len(bob.of_type("error"))
        await send_raw(bob, frame)
        # Frames of one connection are handled in order, so the reply to this valid send comes after
        # whatever the bad frame produced.
        reply = await bob.send_and_wait(send_frame("carol", f"after {name}"))
        errors = bob.of_type("error")[errors_before:]
        if reply["type"] != "sent":
            failures.append(f"{name}: the valid send after it failed: {reply}")
        if [(e["code"], e["ref"]) for e in errors] != [(code, ref)]:
            failures.append(f"{name}: expected one error {(code, ref)}, got {errors}")
        elif not isinstance(errors[0]["message"], str) or not errors[0]["message"]:
            failures.append(f"{name}: error without a message: {errors[0]}")
    assert not failures, "\n".join(failures)

    # Only the valid sends reached carol, each once and in order: no bad frame stored anything.
    messages = await carol.wait_messages(len(BAD_INPUT))
    assert [m["payload"] for m in messages] == [f"after {name}" for name, *_ in BAD_INPUT]
    assert_exactly_once_in_order(carol.seqs(), range(1, len(BAD_INPUT) + 1))
    assert bob.close_code is None and carol.close_code is None
    for c in (bob, carol):
        await c.close()


async def test_rate_limit_gives_rate_limited_and_the_connection_recovers(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """Frames over the per-connection rate get ``rate_limited`` errors (the frame is dropped, the
    connection stays open); once the bucket refills, the same connection sends again, and another
    connection on the node was never limited."""
    gw = cluster.gateway("g1", BEELINE_RATE_LIMIT_PER_SECOND="5", BEELINE_RATE_LIMIT_BURST="5")
    bob = await Client.connect(session, gw, "bob")
    carol = await Client.connect(session, gw, "carol")
    # 60 frames: the bucket holds 5 and refills 5/s, so without a 11 s pause between them some are over.
    for _ in range(60):
        await bob.send({"type": "ack", "seq": 0})
    await bob.wait_for(lambda c: bool(c.of_type("error")), what="rate_limited errors")
    assert bob.close_code is None

    # carol has her own bucket: not limited.
    reply = await carol.send_and_wait(send_frame("bob", "from carol"))
    assert reply["type"] == "sent", reply

    # bob recovers by himself: retry (bounded) until a send is accepted again.
    ref = ""
    deadline = time.monotonic() + 10
    while not any(f["type"] == "sent" and f.get("ref") == ref for f in bob.frames):
        assert time.monotonic() < deadline, f"bob never recovered from the rate limit: {bob.frames[-3:]}"
        ref = uuid.uuid4().hex
        await bob.send(send_frame("carol", "after the storm", ref=ref))
        with contextlib.suppress(AssertionError):
            await bob.wait_for(lambda c, r=ref: any(f.get("ref") == r for f in c.frames), timeout=0.5)
    messages = await carol.wait_messages(1)
    assert {m["payload"] for m in messages} == {"after the storm"}
    # Every answer bob got to the flood and the retries was rate_limited or the one success.
    assert {e["code"] for e in bob.of_type("error")} == {ErrorCode.RATE_LIMITED}
    assert bob.close_code is None and carol.close_code is None
    for c in (bob, carol):
        await c.close()


async def test_oversized_frame_closes_with_1009_and_other_connections_are_unaffected(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """A frame over BEELINE_MAX_FRAME_BYTES closes that connection with 1009 (message too big); other
    connections on the same node, including another one of the same user, keep sending and receiving."""
    gw = cluster.gateway("g1", BEELINE_MAX_FRAME_BYTES="4096")
    bob = await Client.connect(session, gw, "bob")
    bob_phone = await Client.connect(session, gw, "bob")
    carol = await Client.connect(session, gw, "carol")
    await bob.send(send_frame("carol", "x" * 8192))
    assert await bob.wait_closed() == CloseCode.MESSAGE_TOO_BIG
    await assert_still_serves(carol, bob_phone, "to bob's phone")
    await assert_still_serves(bob_phone, carol, "to carol")
    assert carol.close_code is None and bob_phone.close_code is None
    # Nothing of the oversized frame was sent.
    assert [m["payload"] for m in carol.messages()] == ["to carol"]
    async with session.get(f"{gw.base_url}/healthz") as r:
        assert r.status == 200
    for c in (bob_phone, carol):
        await c.close()


async def test_bad_input_storm_does_not_affect_other_users_delivery(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """While one connection floods the node with every kind of bad frame, messages between other users
    on the same node are all delivered, exactly once and in order."""
    gw = cluster.gateway("g1")
    mallory = await Client.connect(session, gw, "mallory")
    alice = await Client.connect(session, gw, "alice")
    carol = await Client.connect(session, gw, "carol")
    # Every frame that is bad whatever the limits are (the size and receiver cases depend on them), 12
    # times over: more than the default burst, so the storm is also rate limited.
    limits = (ErrorCode.PAYLOAD_TOO_LARGE, ErrorCode.TOO_MANY_RECEIVERS)
    storm_frames = [frame for _, frame, code, _ in BAD_INPUT if code not in limits] * 12
    count = 60

    async def storm() -> None:
        for frame in storm_frames:
            await send_raw(mallory, frame)

    async def traffic() -> None:
        for i in range(count):
            reply = await alice.send_and_wait(send_frame("carol", i))
            assert reply["type"] == "sent", reply

    await asyncio.gather(storm(), traffic())
    messages = await carol.wait_messages(count)
    assert [m["payload"] for m in messages] == list(range(count))
    assert_exactly_once_in_order(carol.seqs(), range(1, count + 1))
    assert all(m["from"] == "alice" for m in messages)
    await mallory.wait_for(lambda c: len(c.of_type("error")) >= 1, what="errors")
    assert alice.close_code is None and carol.close_code is None
    async with session.get(f"{gw.base_url}/healthz") as r:
        assert r.status == 200
    for c in (mallory, alice, carol):
        await c.close()


# -- msgpack subprotocol -------------------------------------------------------------------------------


async def test_msgpack_subprotocol_uses_binary_frames(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """On ``beeline.v1.msgpack`` every server frame (welcome, sent, message, error) is a binary msgpack
    frame; sends in msgpack work (binary payloads stay bytes); a text frame gets ``wrong_frame_kind``,
    bad msgpack or a non-map gets ``bad_frame``, an extension type ``invalid_field``, and the connection
    keeps working."""
    gw = cluster.gateway("g1")
    bob = await Wire.connect(session, gw, headers=bearer(token("bob")), protocols=(SUBPROTOCOL_MSGPACK,))
    assert bob.ws.protocol == SUBPROTOCOL_MSGPACK
    carol = await Wire.connect(session, gw, headers=bearer(token("carol")), protocols=(SUBPROTOCOL_MSGPACK,))
    welcome_kind, welcome = await bob.wait_for(lambda _k, f: f["type"] == "welcome", what="welcome")
    assert welcome_kind == aiohttp.WSMsgType.BINARY
    assert welcome["user"] == "bob" and welcome["node"] == "g1"
    await carol.welcome()

    payload = {"text": "hi", "blob": b"\x00\xffbin"}
    await bob.ws.send_bytes(msgpack.packb(send_frame("carol", payload, ref=1), use_bin_type=True))
    kind, sent = await bob.wait_for(lambda _k, f: f["type"] == "sent" and f["ref"] == 1, what="sent")
    assert kind == aiohttp.WSMsgType.BINARY
    assert sent["results"][0]["to"] == "carol" and sent["results"][0]["seq"] == 1
    kind, msg = await carol.wait_for(lambda _k, f: f["type"] == "message", what="message")
    assert kind == aiohttp.WSMsgType.BINARY
    assert msg["payload"] == payload and msg["from"] == "bob" and msg["seq"] == 1

    bad: list[tuple[str | bytes, str]] = [
        (json.dumps(send_frame("carol", ref=2)), ErrorCode.WRONG_FRAME_KIND),
        (b"\xc1", ErrorCode.BAD_FRAME),  # 0xc1 is never used in msgpack
        (msgpack.packb([1, 2, 3]), ErrorCode.BAD_FRAME),
        (msgpack.packb({"type": "nope", "ref": 3}), ErrorCode.UNKNOWN_TYPE),
        # An application's own extension type: no JSON receiver could be given it.
        (msgpack.packb(send_frame("carol", {"x": msgpack.ExtType(5, b"x")}, ref=5)), ErrorCode.INVALID_FIELD),
    ]

    def errors() -> list[tuple[aiohttp.WSMsgType, dict[str, Any]]]:
        return [(k, f) for k, f in bob.frames if f["type"] == "error"]

    for frame, code in bad:
        before = len(errors())
        if isinstance(frame, str):
            await bob.ws.send_str(frame)
        else:
            await bob.ws.send_bytes(frame)
        await bob.wait_for(lambda _k, _f, n=before: len(errors()) > n, what=f"error for {frame!r}")
        [(kind, error)] = errors()[before:]
        assert error["code"] == code, (frame, error)
        assert kind == aiohttp.WSMsgType.BINARY

    await bob.ws.send_bytes(msgpack.packb(send_frame("carol", "still here", ref=4)))
    await bob.wait_for(lambda _k, f: f["type"] == "sent" and f["ref"] == 4, what="sent after errors")
    _, msg = await carol.wait_for(lambda _k, f: f["type"] == "message" and f["seq"] == 2, what="second message")
    assert msg["payload"] == "still here"
    assert len([f for _, f in carol.frames if f["type"] == "message"]) == 2
    for wire in (bob, carol):
        await wire.close()


async def test_json_and_msgpack_connections_of_one_user_both_receive(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """A user connected once with JSON and once with msgpack gets each message on both connections, the
    same message (id, seq, epoch, from, payload), each in its own encoding; a binary payload reaches
    the JSON connection base64-encoded, a msgpack timestamp as an RFC 3339 string."""
    gw = cluster.gateway("g1")
    as_json = await Wire.connect(session, gw, headers=bearer(token("alice")), protocols=(SUBPROTOCOL_JSON,))
    assert as_json.ws.protocol == SUBPROTOCOL_JSON
    as_msgpack = await Wire.connect(session, gw, headers=bearer(token("alice")), protocols=(SUBPROTOCOL_MSGPACK,))
    json_welcome, msgpack_welcome = await as_json.welcome(), await as_msgpack.welcome()
    assert json_welcome["epoch"] == msgpack_welcome["epoch"]
    bob = await Client.connect(session, gw, "bob")
    reply = await bob.send_and_wait(send_frame("alice", {"n": 1}))
    assert reply["results"][0]["status"] == "local" and reply["results"][0]["nodes"] == ["g1"]

    json_kind, json_msg = await as_json.wait_for(lambda _k, f: f["type"] == "message", what="json message")
    msgpack_kind, msgpack_msg = await as_msgpack.wait_for(lambda _k, f: f["type"] == "message", what="msgpack message")
    assert json_kind == aiohttp.WSMsgType.TEXT
    assert msgpack_kind == aiohttp.WSMsgType.BINARY
    assert json_msg == msgpack_msg
    assert json_msg["id"] == reply["id"] and json_msg["seq"] == 1 and json_msg["from"] == "bob"

    # A msgpack sender's binary payload: bytes for msgpack receivers, base64 text for JSON receivers.
    await as_msgpack.ws.send_bytes(msgpack.packb(send_frame("alice", b"\x01\x02", ref="self"), use_bin_type=True))
    _, json_msg = await as_json.wait_for(lambda _k, f: f["type"] == "message" and f["seq"] == 2, what="seq 2")
    _, msgpack_msg = await as_msgpack.wait_for(lambda _k, f: f["type"] == "message" and f["seq"] == 2, what="seq 2")
    assert msgpack_msg["payload"] == b"\x01\x02"
    assert json_msg["payload"] == base64.b64encode(b"\x01\x02").decode()

    # A msgpack timestamp: itself for msgpack receivers, an RFC 3339 UTC string for JSON receivers.
    stamp = msgpack.Timestamp(1_700_000_000, 250_000_000)
    await as_msgpack.ws.send_bytes(msgpack.packb(send_frame("alice", {"at": stamp}, ref="stamp")))
    _, json_msg = await as_json.wait_for(lambda _k, f: f["type"] == "message" and f["seq"] == 3, what="seq 3")
    _, msgpack_msg = await as_msgpack.wait_for(lambda _k, f: f["type"] == "message" and f["seq"] == 3, what="seq 3")
    assert msgpack_msg["payload"] == {"at": stamp}
    assert json_msg["payload"] == {"at": "2023-11-14T22:13:20.250000Z"}
    await bob.close()
    for wire in (as_json, as_msgpack):
        await wire.close()


# -- slow consumer -------------------------------------------------------------------------------------


def small_receive_buffer_socket(addr_info: Any) -> socket.socket:
    """A client socket with a small receive buffer (set before connect), so the server's socket fills
    with a few MiB rather than with whatever the kernel would auto-tune the window up to."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=kind, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    return sock


async def test_client_that_stops_reading_is_closed_4008_and_catches_up_from_the_mailbox(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """A client that never reads while messages keep coming is closed with 4008 (slow consumer) once
    its outbound queue is over its bound (the node's memory per connection stays bounded); what it
    missed waits in the mailbox and a reconnect gets all of it, exactly once and in order.

    How this is made deterministic: the slow client reads its welcome and then nothing; aiohttp stops
    reading the socket after 64 KiB, the socket's receive buffer is small, so the server's writes block
    and its bounded queue fills after a bounded number of large messages. The only timing dependency is
    that the client must read the close frame within the gateway's 2 s close-handshake timeout (after
    which it aborts the TCP connection and the client would see 1006): the test starts reading as soon
    as the gateway's slow-close counter moves, which is milliseconds later.
    """
    gw = cluster.gateway(
        "g1",
        BEELINE_OUTBOUND_MAX_FRAMES="8",
        BEELINE_MAX_PAYLOAD_BYTES=str(1 << 20),
        BEELINE_MAX_FRAME_BYTES=str(2 << 20),
    )
    payload = "s" * (256 * 1024)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer_socket)) as raw:
        ws = await raw.ws_connect(gw.ws_url, headers=bearer(token("slow")), heartbeat=None)
        welcome = await ws.receive(timeout=10)
        assert json.loads(welcome.data)["type"] == "welcome"
        sender = await Client.connect(session, gw, "sender")
        sent = 0
        # Bounded: 160 x 256 KiB = 40 MiB is far more than kernel buffers plus an 8-frame queue hold.
        while await sample(session, gw, "beeline_gateway_slow_client_closes_total") < 1:
            assert sent < 160, "the slow client was never closed"
            reply = await sender.send_and_wait(send_frame("slow", payload, ref=f"m{sent}"))
            assert reply["type"] == "sent", reply
            sent += 1
        # Now read: what was buffered, then the close frame.
        for _ in range(sent + 10):
            msg = await ws.receive(timeout=10)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                break
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
        assert ws.close_code == CloseCode.SLOW_CONSUMER, (ws.close_code, msg)
        await ws.close()

    # Nothing was lost: the mailbox holds every message; a reconnect (no ack was sent) that reads gets
    # them all, exactly once and in order, at its own pace.
    slow = await Client.connect(session, gw, "slow")
    await slow.wait_for(lambda c: len(c.messages()) >= sent or c.close_code is not None, timeout=30, what="catch-up")
    assert slow.close_code is None, f"closed {slow.close_code} after {len(slow.messages())} of {sent} messages"
    assert_exactly_once_in_order(slow.seqs(), range(1, sent + 1))
    await sender.close()
    await slow.close()


async def test_backlog_over_the_outbound_bound_streams_at_the_readers_pace(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """With default settings, a user who connects to a backlog bigger than the outbound buffer bound
    (here 40 messages of 60 kB, each within the payload limit: 2.4 MB > 2 MiB) and reads at full speed
    gets all of it, exactly once and in order: catch-up waits for room, it is not a slow consumer."""
    gw = cluster.gateway("g1")
    sender = await Client.connect(session, gw, "sender")
    count = 40
    for i in range(count):
        reply = await sender.send_and_wait(send_frame("zed", f"{i:05d}" + "z" * 60_000))
        assert reply["type"] == "sent" and reply["results"][0]["status"] == "stored", reply["type"]
    zed = await Client.connect(session, gw, "zed")
    await zed.wait_for(lambda c: len(c.messages()) >= count or c.close_code is not None, timeout=20, what="backlog")
    assert zed.close_code is None, f"closed {zed.close_code} after {len(zed.messages())} of {count} messages"
    assert_exactly_once_in_order(zed.seqs(), range(1, count + 1))
    assert [m["payload"][:5] for m in zed.messages()] == [f"{i:05d}" for i in range(count)]
    await sender.close()
    await zed.close()


# -- admin disconnect ----------------------------------------------------------------------------------


async def test_admin_disconnect_closes_the_users_connections_on_every_node_with_4000(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """DELETE /v1/users/{user}/connections closes every connection of that user, on every node, with
    close code 4000; other users' connections on the same nodes stay open and keep receiving."""
    g1, g2 = cluster.gateway("g1"), cluster.gateway("g2")
    router = cluster.router()
    alice_1 = await Client.connect(session, g1, "alice")
    alice_2 = await Client.connect(session, g2, "alice")
    bob = await Client.connect(session, g1, "bob")
    dave = await Client.connect(session, g2, "dave")

    async def alice_everywhere() -> bool:
        async with session.get(f"{router.base_url}/v1/presence/alice", headers=api_headers()) as r:
            return bool((await r.json())["nodes"] == ["g1", "g2"])

    await eventually(alice_everywhere, what="alice present on g1 and g2")
    async with session.delete(f"{router.base_url}/v1/users/alice/connections", headers=api_headers()) as r:
        assert r.status == 202, await r.text()
        body = await r.json()
    assert body == {"user": "alice", "nodes": ["g1", "g2"], "connections": 2}
    assert await alice_1.wait_closed() == CloseCode.DISCONNECTED_BY_ADMIN
    assert await alice_2.wait_closed() == CloseCode.DISCONNECTED_BY_ADMIN

    result = await api_send(session, router, ["bob", "dave"], payload="still here")
    assert [r["status"] for r in result["results"]] == ["routed", "routed"]
    assert [m["payload"] for m in await bob.wait_messages(1)] == ["still here"]
    assert [m["payload"] for m in await dave.wait_messages(1)] == ["still here"]
    assert bob.close_code is None and dave.close_code is None

    async def alice_offline() -> bool:
        async with session.get(f"{router.base_url}/v1/presence/alice", headers=api_headers()) as r:
            return bool((await r.json())["online"] is False)

    await eventually(alice_offline, what="alice offline")
    for c in (bob, dave):
        await c.close()


# -- capacity ------------------------------------------------------------------------------------------


async def test_over_max_connections_gets_503_json(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """At BEELINE_MAX_CONNECTIONS a new upgrade gets HTTP 503 ``over_capacity`` with Retry-After and a
    JSON error; the open connections keep working, and a slot freed by a close is usable again."""
    gw = cluster.gateway("g1", BEELINE_MAX_CONNECTIONS="2")
    bob = await Client.connect(session, gw, "bob")
    carol = await Client.connect(session, gw, "carol")
    status, headers, body = await refused_upgrade(session, gw, headers=bearer(token("dave")))
    assert status == 503, body
    assert body["error"]["code"] == "over_capacity"
    assert int(headers["Retry-After"]) >= 1
    await assert_still_serves(bob, carol, "capacity is not an error for us")

    await bob.close()
    dave: Client | None = None

    async def dave_connects() -> bool:
        nonlocal dave
        try:
            dave = await Client.connect(session, gw, "dave")
        except aiohttp.WSServerHandshakeError as e:
            if e.status != 503:
                raise
            return False
        return True

    await eventually(dave_connects, interval=0.05, what="a freed slot")
    assert dave is not None
    await assert_still_serves(carol, dave, "welcome dave")
    for c in (carol, dave):
        await c.close()
