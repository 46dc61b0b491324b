"""STOMP sessions on the gateway's delivery core, with a raw WebSocket client (the real npm clients are
in tests/e2e/test_stomp_clients.py): which messages a connection gets on SUBSCRIBE, that none comes
twice, and what counts as read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.stomp import StompFrame, StompParser, encode_frame
from tests.support import Cluster, RedisServer, Service, api_headers, eventually, token

pytestmark = pytest.mark.redis


class RawStomp:
    """A STOMP 1.2 client on a bare aiohttp WebSocket, keeping every frame it received."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[StompFrame] = []
        self._parser = StompParser(max_frame_bytes=1 << 20)
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, session: aiohttp.ClientSession, gateway: Service, user: str) -> RawStomp:
        ws = await session.ws_connect(gateway.ws_url, protocols=["v12.stomp"])
        client = cls(ws)
        await client.send("CONNECT", ("accept-version", "1.2"), ("passcode", token(user)))
        await client.wait_for(lambda f: f.command == "CONNECTED", "CONNECTED")
        return client

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.frames.extend(self._parser.feed(msg.data.encode()))

    async def send(self, command: str, *headers: tuple[str, str], body: bytes = b"") -> None:
        await self.ws.send_str(encode_frame(command, headers, body).decode())

    async def wait_for(self, predicate: Any, what: str) -> StompFrame:
        await eventually(lambda: any(predicate(f) for f in self.frames), timeout=10, what=what)
        return next(f for f in self.frames if predicate(f))

    def messages(self, channel: str | None = None) -> list[tuple[str, int]]:
        """(destination, seq) of each MESSAGE, in arrival order."""
        return [
            (str(f.header("destination")), int(f.header("beeline-seq") or 0))
            for f in self.frames
            if f.command == "MESSAGE" and (channel is None or f.header("destination") == f"/user/topic/{channel}")
        ]

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


@pytest.fixture
async def gateway(redis_server: RedisServer, prefix: str) -> AsyncIterator[tuple[Service, Service]]:
    cluster = Cluster(redis_url=redis_server.url, prefix=prefix)
    try:
        yield cluster.gateway("g1"), cluster.router()
    finally:
        cluster.stop()


async def _send(session: aiohttp.ClientSession, router: Service, channel: str, n: int) -> None:
    body = {"to": "bob", "channel": channel, "payload": {"n": n}}
    async with session.post(f"{router.base_url}/v1/messages", json=body, headers=api_headers()) as r:
        assert r.status == 202, await r.text()


async def test_a_later_subscribe_delivers_that_channels_unread_once(gateway: tuple[Service, Service]) -> None:
    """Delivery starts at the first SUBSCRIBE with that channel's unread messages; a second SUBSCRIBE
    replays the other channel's unread ones (in their order), and an UNSUBSCRIBE then SUBSCRIBE again
    delivers only what came meanwhile: no seq is written twice to the connection."""
    g1, router = gateway
    async with aiohttp.ClientSession() as session:
        for n, channel in enumerate(["a", "b", "a", "b"], start=1):
            await _send(session, router, channel, n)  # seqs 1-4 wait in the mailbox
        bob = await RawStomp.connect(session, g1, "bob")
        await bob.send("SUBSCRIBE", ("id", "s-a"), ("destination", "/user/topic/a"))
        await eventually(lambda: len(bob.messages()) == 2, timeout=10, what="channel a's unread")
        assert bob.messages() == [("/user/topic/a", 1), ("/user/topic/a", 3)]
        await bob.send("SUBSCRIBE", ("id", "s-b"), ("destination", "/user/topic/b"), ("receipt", "r"))
        await eventually(lambda: len(bob.messages("b")) == 2, timeout=10, what="channel b replayed")
        assert bob.messages("b") == [("/user/topic/b", 2), ("/user/topic/b", 4)]
        await _send(session, router, "b", 5)
        await eventually(lambda: len(bob.messages("b")) == 3, timeout=10, what="a live message on b")
        await bob.send("UNSUBSCRIBE", ("id", "s-b"))
        await _send(session, router, "b", 6)
        await _send(session, router, "a", 7)
        await eventually(lambda: len(bob.messages("a")) == 3, timeout=10, what="seq 7 on a")
        await bob.send("SUBSCRIBE", ("id", "s-b2"), ("destination", "/user/topic/b"))
        await eventually(lambda: len(bob.messages("b")) == 4, timeout=10, what="seq 6 replayed")
        seqs = [seq for _, seq in bob.messages()]
        assert sorted(seqs) == [1, 2, 3, 4, 5, 6, 7], "every message once"
        assert bob.messages("b")[-1] == ("/user/topic/b", 6)
        await bob.close()


async def test_auto_ack_marks_written_messages_read_and_a_filtered_channel_stays_unread(
    gateway: tuple[Service, Service],
) -> None:
    """With ack:auto a written message is read: a new connection does not get it again. A message of a
    channel the connection did not subscribe to stays unread, and so does everything after it."""
    g1, router = gateway
    async with aiohttp.ClientSession() as session:
        bob = await RawStomp.connect(session, g1, "bob")
        await bob.send("SUBSCRIBE", ("id", "s"), ("destination", "/user/topic/a"))
        await _send(session, router, "a", 1)
        await eventually(lambda: len(bob.messages()) == 1, timeout=10, what="seq 1")
        await bob.send("DISCONNECT", ("receipt", "bye"))
        await bob.wait_for(lambda f: f.command == "RECEIPT" and f.header("receipt-id") == "bye", "RECEIPT")
        await bob.close()

        await _send(session, router, "z", 2)  # a channel nobody subscribes to here
        await _send(session, router, "a", 3)
        again = await RawStomp.connect(session, g1, "bob")
        await again.send("SUBSCRIBE", ("id", "s"), ("destination", "/user/topic/a"))
        await eventually(lambda: len(again.messages()) == 1, timeout=10, what="seq 3")
        assert again.messages() == [("/user/topic/a", 3)], "seq 1 was read (written with ack:auto)"
        await again.close()

        third = await RawStomp.connect(session, g1, "bob")
        await third.send("SUBSCRIBE", ("id", "s"), ("destination", "/user/topic/z"))
        await eventually(lambda: len(third.messages()) == 1, timeout=10, what="seq 2 still unread")
        assert third.messages() == [("/user/topic/z", 2)]
        await third.close()


async def test_a_sockjs_request_on_another_gateway_gets_session_not_found(
    redis_server: RedisServer, prefix: str
) -> None:
    """The xhr transports send several requests per session, and a session lives on the gateway that
    opened it: an ``xhr_send`` that a non-sticky balancer sends to another gateway gets SockJS's own
    "session not found" (404) there and opens nothing, and the session on its own gateway is unharmed."""
    cluster = Cluster(redis_url=redis_server.url, prefix=prefix)
    try:
        g1, g2 = cluster.gateway("g1"), cluster.gateway("g2")
        base = "/chat-websocket/123/s3ss10n"
        connect = encode_frame("CONNECT", [("accept-version", "1.1"), ("passcode", token("bob"))]).decode()
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{g1.base_url}{base}/xhr") as opened:
                assert (await opened.text()).strip() == "o"
            async with session.post(f"{g2.base_url}{base}/xhr_send", json=[connect]) as elsewhere:
                assert elsewhere.status == 404
            async with session.post(f"{g1.base_url}{base}/xhr_send", json=[connect]) as sent:
                assert sent.status == 204
            async with session.post(f"{g1.base_url}{base}/xhr") as polled:
                text = await polled.text()
            assert text.startswith("a[") and "CONNECTED" in text and "user-name:bob" in text
            async with session.get(f"{g2.base_url}/metrics") as metrics:
                assert (
                    'beeline_gateway_connections{node="g2",protocol="sockjs-xhr-polling"} 0.0' in await metrics.text()
                )
    finally:
        cluster.stop()
