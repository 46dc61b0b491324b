"""The SockJS transports (gateway/sockjs.py) against a real aiohttp server on 127.0.0.1.

Pinned here: the welcome and ``/info`` answers with their CORS and cache headers, the OPTIONS preflights,
the SockJS WebSocket framing (``o``, ``a[...]``, ``h``, ``c[code,"reason"]``, broken framing closes),
xhr_streaming (prelude, ``o``, frames, the response ending at the streaming limit and the session going
on in the next request), xhr polling, xhr_send's 204/404/413/500 answers (404 never opens a session),
``c[2010,...]`` for a second receiving request, a session closed after ``disconnect_delay_s`` without a
request, coalescing into one ``a[...]`` frame, the bounded outbound buffer (``write_now`` False, ``send``
waits), ``close(code, reason)`` repeated to a late request, ``on_session`` failures, the session and
authorization limits, and ``SockJSEndpoint.close`` cancelling the ``on_session`` tasks.

The ``on_session`` handlers are in-memory echo/recording handlers: the STOMP clients over SockJS are
tested end to end elsewhere.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from gateway.sockjs import PRELUDE, SockJSEndpoint, SockJSSession
from tests.support import eventually

PREFIX = "/sockjs"
Make = Callable[..., Awaitable[tuple[SockJSEndpoint, TestClient[Any, Any]]]]


async def echo(session: SockJSSession) -> None:
    """Echoes each message; ``close`` closes the session with 4000 "bye"."""
    async for data in session.inbound():
        if data == b"close":
            await session.close(4000, "bye")
            return
        await session.send(data)


@pytest.fixture
async def make(aiohttp_client: Any) -> AsyncIterator[Make]:
    """Builds an endpoint (heartbeat 0.2 s, disconnect delay 0.3 s) served on 127.0.0.1."""
    endpoints: list[SockJSEndpoint] = []

    async def build(
        on_session: Callable[[SockJSSession], Awaitable[None]] = echo, **options: Any
    ) -> tuple[SockJSEndpoint, TestClient[Any, Any]]:
        options = {"heartbeat_s": 0.2, "disconnect_delay_s": 0.3, **options}
        endpoint = SockJSEndpoint(PREFIX, on_session, **options)
        endpoints.append(endpoint)
        app = web.Application()
        endpoint.add_routes(app)
        client = await aiohttp_client(app, server_kwargs={"host": "127.0.0.1"})
        return endpoint, client

    yield build
    for endpoint in endpoints:
        await endpoint.close()


def url(session_id: str, transport: str) -> str:
    return f"{PREFIX}/000/{session_id}/{transport}"


async def read_frame(response: aiohttp.ClientResponse, *, skip_heartbeats: bool = True) -> str:
    """The next newline-terminated frame of an xhr response ('' at the end of the response)."""
    while True:
        line = (await asyncio.wait_for(response.content.readline(), 5)).decode()
        if skip_heartbeats and line == "h\n":
            continue
        return line.rstrip("\n")


def messages(frame: str) -> list[str]:
    assert frame.startswith("a"), frame
    decoded: list[str] = json.loads(frame[1:])
    return decoded


async def poll(client: TestClient[Any, Any], session_id: str, *, skip_heartbeats: bool = True) -> str:
    """One xhr polling request; its one frame (heartbeats re-polled unless asked for)."""
    while True:
        async with client.post(url(session_id, "xhr")) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/javascript; charset=UTF-8"
            body = (await response.read()).decode()
        assert body.endswith("\n") and body.count("\n") == 1, body
        if body != "h\n" or not skip_heartbeats:
            return body[:-1]


async def xhr_send(client: TestClient[Any, Any], session_id: str, body: str | bytes) -> aiohttp.ClientResponse:
    async with client.post(url(session_id, "xhr_send"), data=body) as response:
        await response.read()
        return response


async def test_welcome_info_and_preflight(make: Make) -> None:
    """Welcome text on the prefix; /info's JSON with no-cache and CORS echoing the Origin; 204 preflights."""
    _, client = await make()
    for path in (PREFIX, PREFIX + "/"):
        async with client.get(path) as response:
            assert response.status == 200
            assert response.content_type == "text/plain"
            assert await response.text() == "Welcome to SockJS!\n"

    entropies = set()
    for _ in range(2):
        async with client.get(PREFIX + "/info", headers={"Origin": "https://app.example"}) as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            assert response.headers["Cache-Control"] == "no-store, no-cache, no-transform, must-revalidate, max-age=0"
            assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert response.headers["Access-Control-Allow-Credentials"] == "true"
            info = await response.json()
        assert {k: v for k, v in info.items() if k != "entropy"} == {
            "websocket": True,
            "origins": ["*:*"],
            "cookie_needed": False,
        }
        assert isinstance(info["entropy"], int) and 0 <= info["entropy"] < 2**32
        entropies.add(info["entropy"])
    assert len(entropies) == 2
    async with client.get(PREFIX + "/info") as response:
        assert response.headers["Access-Control-Allow-Origin"] == "*"

    preflights = {PREFIX + "/info": "GET", url("s1", "xhr"): "POST", url("s1", "xhr_send"): "POST"}
    preflights[url("s1", "xhr_streaming")] = "POST"
    for path, method in preflights.items():
        headers = {"Origin": "https://app.example", "Access-Control-Request-Headers": "content-type"}
        async with client.options(path, headers=headers) as response:
            assert response.status == 204, path
            assert method in response.headers["Access-Control-Allow-Methods"]
            assert int(response.headers["Access-Control-Max-Age"]) > 0
            assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert response.headers["Access-Control-Allow-Headers"] == "content-type"


async def test_bad_paths_are_404(make: Make) -> None:
    """Server and session segments with a dot, or empty, are not SockJS routes."""
    _, client = await make()
    for path in (f"{PREFIX}/0.0/s1/xhr", f"{PREFIX}/000/s.1/xhr", f"{PREFIX}/000//xhr", f"{PREFIX}//s1/xhr"):
        async with client.post(path) as response:
            assert response.status == 404, path
    async with client.get(PREFIX + "/websocket") as response:
        assert response.status == 404  # no raw_websocket handler given


async def test_websocket_open_messages_heartbeat_close(make: Make) -> None:
    """``o`` first; an array or a single JSON string is read; echoes come back as ``a[...]`` (NUL kept);
    ``h`` when idle; ``close(4000, "bye")`` sends ``c[4000,"bye"]`` and closes the socket."""
    endpoint, client = await make()
    async with client.ws_connect(url("ws1", "websocket")) as ws:
        assert await ws.receive_str(timeout=5) == "o"
        await ws.send_str(json.dumps(["CONNECT\n\n\x00", "two"]))
        await ws.send_str(json.dumps("three"))
        received: list[str] = []
        while len(received) < 3:
            frame = await ws.receive_str(timeout=5)
            if frame != "h":
                received += messages(frame)
        assert received == ["CONNECT\n\n\x00", "two", "three"]
        assert endpoint.sessions() == 1
        assert await ws.receive_str(timeout=5) == "h"  # heartbeat_s=0.2 and nothing to send
        await ws.send_str('["close"]')
        frame = await ws.receive_str(timeout=5)
        while frame == "h":
            frame = await ws.receive_str(timeout=5)
        assert frame == 'c[4000,"bye"]'
        closing = await ws.receive(timeout=5)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    await eventually(lambda: endpoint.sessions() == 0, timeout=5, what="websocket session forgotten")


async def test_websocket_broken_framing_and_client_close(make: Make) -> None:
    """A client message that is not JSON closes the socket (3000); the session ends with it."""
    seen: list[SockJSSession] = []
    ended = asyncio.Event()

    async def record(session: SockJSSession) -> None:
        seen.append(session)
        async for _ in session.inbound():
            pass
        ended.set()

    endpoint, client = await make(record)
    async with client.ws_connect(url("ws2", "websocket")) as ws:
        assert await ws.receive_str(timeout=5) == "o"
        await ws.send_str("not json")
        msg = await ws.receive(timeout=5)
        while msg.type is aiohttp.WSMsgType.TEXT:
            msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 3000
    await asyncio.wait_for(ended.wait(), 5)
    assert seen[0].closed and seen[0].transport == "websocket"

    ended.clear()
    async with client.ws_connect(url("ws3", "websocket")) as ws:
        assert await ws.receive_str(timeout=5) == "o"
    await asyncio.wait_for(ended.wait(), 5)  # the client closing ends inbound()
    await eventually(lambda: endpoint.sessions() == 0, timeout=5, what="sessions forgotten")


async def test_xhr_streaming_limit_and_next_request(make: Make) -> None:
    """Prelude, ``o``, then frames; the response ends past streaming_limit_bytes and the session goes on:
    what was queued meanwhile arrives on the next request, without a second ``o``."""
    seen: list[SockJSSession] = []

    async def record_echo(session: SockJSSession) -> None:
        seen.append(session)
        await echo(session)

    endpoint, client = await make(record_echo, streaming_limit_bytes=300)
    async with client.post(url("st1", "xhr_streaming"), headers={"Origin": "https://app.example"}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/javascript; charset=UTF-8"
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "no-cache" in response.headers["Cache-Control"]
        assert await response.content.readexactly(len(PRELUDE)) == PRELUDE
        assert await read_frame(response) == "o"
        assert (await xhr_send(client, "st1", '["hello"]')).status == 204
        assert messages(await read_frame(response)) == ["hello"]
        assert (await xhr_send(client, "st1", json.dumps(["x" * 400]))).status == 204
        assert messages(await read_frame(response)) == ["x" * 400]
        assert await read_frame(response) == ""  # over the limit: the response ended
    assert seen[0].transport == "xhr-streaming" and not seen[0].closed
    assert seen[0].request.headers["Origin"] == "https://app.example"

    assert (await xhr_send(client, "st1", '["between"]')).status == 204
    async with client.post(url("st1", "xhr_streaming")) as response:
        assert await response.content.readexactly(len(PRELUDE)) == PRELUDE
        assert messages(await read_frame(response)) == ["between"]
        heartbeat = await read_frame(response, skip_heartbeats=False)
        assert heartbeat == "h"
    assert len(seen) == 1 and endpoint.sessions() == 1


async def test_xhr_polling(make: Make) -> None:
    """``o`` on the first poll; a poll waits for messages (``h`` after heartbeat_s) and returns one frame."""
    seen: list[SockJSSession] = []

    async def record_echo(session: SockJSSession) -> None:
        seen.append(session)
        await echo(session)

    _, client = await make(record_echo)
    assert await poll(client, "p1") == "o"
    assert await poll(client, "p1", skip_heartbeats=False) == "h"
    assert (await xhr_send(client, "p1", '["ping","pong"]')).status == 204
    received: list[str] = []
    while len(received) < 2:
        received += messages(await poll(client, "p1"))
    assert received == ["ping", "pong"]
    assert seen[0].transport == "xhr-polling"


async def test_xhr_send_answers(make: Make) -> None:
    """204 text/plain for an open session; 404 for an unknown one (and no session opened); 500
    "Payload expected." for an empty or non-array body, "Broken JSON encoding." for bad JSON; 413 past
    max_message_bytes."""
    endpoint, client = await make(max_message_bytes=1000)
    response = await xhr_send(client, "nobody", '["hi"]')
    assert response.status == 404
    assert endpoint.sessions() == 0

    assert await poll(client, "s1") == "o"
    response = await xhr_send(client, "s1", '["hi"]')
    assert response.status == 204
    assert response.headers["Content-Type"] == "text/plain; charset=UTF-8"
    assert "Access-Control-Allow-Origin" in response.headers
    for body, text in (("", "Payload expected."), ('"hi"', "Payload expected."), ("[1,", "Broken JSON encoding.")):
        async with client.post(url("s1", "xhr_send"), data=body) as response:
            assert response.status == 500
            assert await response.text() == text
    async with client.post(url("s1", "xhr_send"), data=json.dumps(["y" * 2000])) as response:
        assert response.status == 413
    assert messages(await poll(client, "s1")) == ["hi"]


async def test_second_receiving_request_gets_2010(make: Make) -> None:
    """A receiving request on a session already being served gets ``c[2010,...]``; the first keeps it."""
    _, client = await make()
    async with client.post(url("dup", "xhr_streaming")) as response:
        assert await response.content.readexactly(len(PRELUDE)) == PRELUDE
        assert await read_frame(response) == "o"
        assert await poll(client, "dup") == 'c[2010,"Another connection still open"]'
        async with client.post(url("dup", "xhr_streaming")) as second:
            assert await second.content.readexactly(len(PRELUDE)) == PRELUDE
            assert await read_frame(second) == 'c[2010,"Another connection still open"]'
            assert await read_frame(second) == ""
        assert (await xhr_send(client, "dup", '["still here"]')).status == 204
        assert messages(await read_frame(response)) == ["still here"]


async def test_session_closed_after_disconnect_delay(make: Make) -> None:
    """With no receiving request for disconnect_delay_s the session closes, inbound() ends and the
    endpoint forgets it."""
    seen: list[SockJSSession] = []
    ended = asyncio.Event()

    async def record(session: SockJSSession) -> None:
        seen.append(session)
        async for _ in session.inbound():
            pass
        ended.set()

    endpoint, client = await make(record)
    assert await poll(client, "gone") == "o"
    assert endpoint.sessions() == 1
    await asyncio.wait_for(ended.wait(), 5)
    assert seen[0].closed
    await eventually(lambda: endpoint.sessions() == 0, timeout=5, what="session forgotten")
    with pytest.raises(ConnectionError):
        await seen[0].send(b"late")


async def test_coalescing_and_bounded_buffer(make: Make) -> None:
    """Messages queued while no request is open leave as one ``a[...]``; past max_buffered_bytes
    write_now is False and send() waits until a request drains the buffer."""
    results: list[Any] = []
    sent = asyncio.Event()

    async def writer(session: SockJSSession) -> None:
        results.extend(session.write_now(m) for m in (b"m1", b"m2\x00", b"m3"))
        results.append(session.write_now(b"x" * 60))
        results.append(session.write_now(b"y" * 60))
        await session.send(b"y" * 60)
        sent.set()
        async for _ in session.inbound():
            pass

    _, client = await make(writer, max_buffered_bytes=100)
    assert await poll(client, "c1") == "o"
    await eventually(lambda: len(results) == 5, timeout=5, what="writes attempted")
    assert results == [True, True, True, True, False]
    assert not sent.is_set()
    assert messages(await poll(client, "c1")) == ["m1", "m2\x00", "m3", "x" * 60]
    await asyncio.wait_for(sent.wait(), 5)
    assert messages(await poll(client, "c1")) == ["y" * 60]


async def test_close_frame_repeated_to_late_requests(make: Make) -> None:
    """close(code, reason) after queued messages: the messages, then ``c[code,"reason"]``, which a later
    request within disconnect_delay_s gets again; xhr_send to it is accepted and dropped."""

    async def closer(session: SockJSSession) -> None:
        await session.send(b"last words")
        await session.close(4001, "later")

    endpoint, client = await make(closer)
    assert await poll(client, "cl") == "o"
    assert messages(await poll(client, "cl")) == ["last words"]
    assert await poll(client, "cl") == 'c[4001,"later"]'
    async with client.post(url("cl", "xhr_streaming")) as response:
        assert await response.content.readexactly(len(PRELUDE)) == PRELUDE
        assert await read_frame(response) == 'c[4001,"later"]'
        assert await read_frame(response) == ""
    await eventually(lambda: endpoint.sessions() == 0, timeout=5, what="closed session forgotten")


async def test_on_session_failure_closes_with_go_away(make: Make) -> None:
    """An on_session that raises is logged as sockjs_session_failed and its session gets c[3000,"Go away!"]."""

    async def broken(session: SockJSSession) -> None:
        raise RuntimeError("boom")

    _, client = await make(broken)
    with capture_logs() as logs:
        async with client.ws_connect(url("bad", "websocket")) as ws:
            assert await ws.receive_str(timeout=5) == "o"
            assert await ws.receive_str(timeout=5) == 'c[3000,"Go away!"]'
    assert any(entry["event"] == "sockjs_session_failed" for entry in logs)


async def test_limits_and_authorize(make: Make) -> None:
    """authorize's answer replaces the opening of a session; max_sessions answers 503 beyond it."""

    def authorize(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("Origin") == "https://evil.example":
            return web.Response(status=403, text="origin not allowed")
        return None

    endpoint, client = await make(max_sessions=1, authorize=authorize)
    async with client.post(url("a1", "xhr"), headers={"Origin": "https://evil.example"}) as response:
        assert response.status == 403
    assert endpoint.sessions() == 0
    assert await poll(client, "a1") == "o"
    async with client.post(url("a2", "xhr")) as response:
        assert response.status == 503
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(url("a3", "websocket"))
    assert refused.value.status == 503


async def test_endpoint_close_cancels_session_tasks(make: Make) -> None:
    """endpoint.close() cancels and awaits every on_session task, closes the sessions; twice is fine."""
    started = asyncio.Event()
    cancelled: list[bool] = []

    async def stuck(session: SockJSSession) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    endpoint, client = await make(stuck)
    async with client.ws_connect(url("w", "websocket")) as ws:
        assert await ws.receive_str(timeout=5) == "o"
        await asyncio.wait_for(started.wait(), 5)
        await endpoint.close()
        assert cancelled == [True]
        frame = await ws.receive_str(timeout=5)
        while frame == "h":
            frame = await ws.receive_str(timeout=5)
        assert frame == 'c[3000,"Go away!"]'
    await endpoint.close()
    async with client.post(url("after", "xhr")) as response:
        assert response.status == 503


async def test_abort_drops_without_close_frame(make: Make) -> None:
    """abort() drops what was queued and writes no close frame: the streaming response just ends; a
    later request gets ``c[1002,...]`` and the session is forgotten after disconnect_delay_s."""
    go = asyncio.Event()

    async def aborter(session: SockJSSession) -> None:
        await go.wait()
        assert session.write_now(b"never delivered")
        session.abort()

    endpoint, client = await make(aborter)
    async with client.post(url("ab", "xhr_streaming")) as response:
        assert await response.content.readexactly(len(PRELUDE)) == PRELUDE
        assert await read_frame(response) == "o"
        go.set()
        assert await read_frame(response) == ""
    assert await poll(client, "ab") == 'c[1002,"Connection interrupted"]'
    await eventually(lambda: endpoint.sessions() == 0, timeout=5, what="aborted session forgotten")


async def test_client_dropping_streaming_request_closes_session(make: Make) -> None:
    """A client that drops its xhr_streaming request (noticed at the next heartbeat at the latest) ends
    the session: inbound() ends."""
    ended = asyncio.Event()

    async def record(session: SockJSSession) -> None:
        async for _ in session.inbound():
            pass
        ended.set()

    _, client = await make(record)
    response = await client.post(url("drop", "xhr_streaming"))
    assert await response.content.readexactly(len(PRELUDE)) == PRELUDE
    assert await read_frame(response) == "o"
    response.close()
    await asyncio.wait_for(ended.wait(), 5)


async def test_frames_escape_what_browsers_mangle(make: Make) -> None:
    """U+2028 and friends leave as \\uXXXX escapes; other non-ASCII text stays UTF-8; invalid UTF-8 from
    the outlet is replaced, not an error."""
    async with asyncio.timeout(10):

        async def writer(session: SockJSSession) -> None:
            await session.send("line\u2028sep é".encode())
            await session.send(b"bad \xff byte")
            async for _ in session.inbound():
                pass

        _, client = await make(writer)
        assert await poll(client, "u1") == "o"
        frame = ""
        while not frame.startswith("a"):
            frame = await poll(client, "u1")
        received = messages(frame)
        while len(received) < 2:
            received += messages(await poll(client, "u1"))
        assert "\\u2028" in frame and "é" in frame
        assert received == ["line\u2028sep é", "bad \ufffd byte"]


async def test_websocket_oversized_message_and_binary(make: Make) -> None:
    """A WebSocket message over max_message_bytes closes with 1009; a binary one with 3000."""
    _, client = await make(max_message_bytes=100)
    async with client.ws_connect(url("big", "websocket")) as ws:
        assert await ws.receive_str(timeout=5) == "o"
        await ws.send_str(json.dumps(["z" * 200]))
        msg = await ws.receive(timeout=5)
        while msg.type is aiohttp.WSMsgType.TEXT:
            msg = await ws.receive(timeout=5)
        assert ws.close_code == 1009
    async with client.ws_connect(url("bin", "websocket")) as ws:
        assert await ws.receive_str(timeout=5) == "o"
        await ws.send_bytes(b"[]")
        msg = await ws.receive(timeout=5)
        while msg.type is aiohttp.WSMsgType.TEXT:
            msg = await ws.receive(timeout=5)
        assert ws.close_code == 3000


async def test_raw_websocket_is_routed_after_authorize(make: Make) -> None:
    """``<prefix>/websocket`` goes to raw_websocket (no SockJS framing), after authorize."""

    async def raw(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str("raw:" + msg.data)
        return ws

    def authorize(request: web.Request) -> web.StreamResponse | None:
        return web.Response(status=403) if "deny" in request.query else None

    endpoint, client = await make(raw_websocket=raw, authorize=authorize)
    async with client.ws_connect(PREFIX + "/websocket") as ws:
        await ws.send_str("hi")
        assert await ws.receive_str(timeout=5) == "raw:hi"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(PREFIX + "/websocket?deny=1")
    assert refused.value.status == 403
    assert endpoint.sessions() == 0
