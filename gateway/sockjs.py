"""SockJS server transports (sockjs-protocol 0.3.3, what sockjs-client 1.x speaks) on aiohttp.

A :class:`SockJSSession` is one logical client connection carried by a SockJS transport: a SockJS-framed
WebSocket, or a sequence of HTTP requests (``xhr_streaming`` / ``xhr`` polling to receive, ``xhr_send``
to send). The session is the gateway connection's outlet: the STOMP layer hands it whole frames
(``write_now`` / ``send``) and reads the client's messages from ``inbound()``.

Invariants:

- Frames to the client are ``o`` (once, first), ``a[...]`` (every message queued at that moment, in
  order: messages queued while no receiving request is open are coalesced), ``h`` after
  ``heartbeat_s`` without a frame, and ``c[code,"reason"]`` (last; repeated to any later request).
- At most one receiving request (or the WebSocket) is attached to a session; a second one is answered
  ``c[2010,"Another connection still open"]`` and the first keeps the session.
- The outbound buffer is bounded in bytes (``max_buffered_bytes``): ``write_now`` refuses beyond it and
  ``send`` waits. Bytes count until their frame has been written to the transport. The inbound side is
  bounded the same way, which pushes back on ``xhr_send`` and on the WebSocket reader.
- An xhr session without a receiving request for ``disconnect_delay_s`` is closed and forgotten; a
  session closed by the server stays ``disconnect_delay_s`` after its last receiver left, so a late
  request still gets the close frame. Only a receiving request opens a session: ``xhr_send`` to an
  unknown session is 404 (the request landed on another gateway), never a new session.
- ``on_session`` runs in a task the endpoint owns; when it ends the session is closed (3000 "Go away!"
  unless it closed the session itself). ``SockJSEndpoint.close`` cancels and awaits every such task.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from typing import Final

import orjson
from aiohttp import WSMsgType, web

from shared.logs import get_logger

log = get_logger("beeline.gateway.sockjs")

PRELUDE: Final = b"h" * 2048 + b"\n"
"""xhr_streaming prelude: browsers deliver the first chunk of a streamed response only after ~2 KiB."""
NO_CACHE: Final = "no-store, no-cache, no-transform, must-revalidate, max-age=0"
CACHE_FOR_S: Final = 365 * 24 * 3600
"""How long the browser may cache CORS preflight answers (sockjs-node's value)."""
JS_TYPE: Final = "application/javascript; charset=UTF-8"
TEXT_TYPE: Final = "text/plain; charset=UTF-8"

CLOSE_GO_AWAY: Final = (3000, "Go away!")
CLOSE_ANOTHER_CONNECTION: Final = (2010, "Another connection still open")
CLOSE_INTERRUPTED: Final = (1002, "Connection interrupted")
"""Repeated to a late request on a session whose client went away or that was aborted."""
WS_BROKEN_FRAMING: Final = (3000, "Broken framing.")
"""WebSocket close for a client message that is not JSON (no ``c`` frame, as sockjs-node does)."""

WS_CLOSE_TIMEOUT_S: Final = 2.0
"""How long a closing SockJS WebSocket waits for the client's close reply."""

_SEGMENT: Final = r"[^/.]+"
# Characters browsers mangle or that some JS engines reject unescaped (sockjs-node utils.quote);
# JSON.stringify already escapes the control characters.
_ESCAPABLE: Final = re.compile("[\u200c-\u200f\u2028-\u202f\u2060-\u206f\ufeff\ufff0-\uffff]")

OnSession = Callable[["SockJSSession"], Awaitable[None]]
Authorize = Callable[[web.Request], "web.StreamResponse | None"]
RawWebSocket = Callable[[web.Request], Awaitable[web.StreamResponse]]
FrameWriter = Callable[[str], Awaitable[None]]


def close_frame(code: int, reason: str) -> str:
    return "c" + orjson.dumps([code, reason]).decode()


def messages_frame(messages: list[str]) -> str:
    """``a[...]`` of the given messages, each a JSON string (a NUL becomes ``\\u0000``)."""
    body = orjson.dumps(messages).decode()
    if not body.isascii():
        body = _ESCAPABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", body)
    return "a" + body


def parse_messages(payload: str | bytes) -> list[str] | None:
    """Client messages: a JSON array of strings or one JSON string; None when it is neither."""
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


class PayloadError(ValueError):
    """An ``xhr_send`` body SockJS answers with 500 and this text."""


def decode_send_body(body: bytes) -> list[str]:
    """The messages of an ``xhr_send`` body (a JSON array of strings), or PayloadError."""
    if not body:
        raise PayloadError("Payload expected.")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PayloadError("Broken JSON encoding.") from exc
    if not isinstance(value, list):
        raise PayloadError("Payload expected.")
    if not all(isinstance(item, str) for item in value):
        raise PayloadError("Broken JSON encoding.")
    return value


class _ByteBound:
    """A byte budget that waiters can wait on: shared shape of the outbound and inbound buffers."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._room = asyncio.Event()
        self._room.set()

    def fits(self, size: int) -> bool:
        # One message larger than the whole budget still goes through when nothing else is buffered.
        return self.used == 0 or self.used + size <= self.limit

    def take(self, size: int) -> None:
        self.used += size
        if self.used >= self.limit:
            self._room.clear()

    def give(self, size: int) -> None:
        self.used = max(0, self.used - size)
        if self.used < self.limit:
            self._room.set()

    async def wait(self) -> None:
        self._room.clear()
        await self._room.wait()

    def wake(self) -> None:
        self._room.set()


class SockJSSession:
    """One SockJS session; also the gateway connection's outlet (its outbound side)."""

    abort_after_close: Final = False  # an unanswered session times out by SockJS's own rules

    def __init__(self, endpoint: SockJSEndpoint, session_id: str, transport: str, request: web.Request) -> None:
        self.session_id = session_id
        self.transport = transport
        self.request = request
        self._endpoint = endpoint
        self._outbox: deque[tuple[str, int]] = deque()
        self._out = _ByteBound(endpoint.max_buffered_bytes)
        self._inbox: deque[bytes] = deque()
        self._in = _ByteBound(endpoint.max_buffered_bytes)
        self._changed = asyncio.Event()  # outbox or close state changed: wakes the attached receiver
        self._inbox_ready = asyncio.Event()
        self._close_frame: str | None = None
        self._aborted = False
        self.opened = False  # the ``o`` frame was written
        self.attached = False  # a receiving request (or the WebSocket) is serving this session
        self._timer: asyncio.TimerHandle | None = None

    @property
    def closed(self) -> bool:
        return self._close_frame is not None

    # -- inbound -------------------------------------------------------------------------------------

    async def inbound(self) -> AsyncIterator[bytes]:
        """Each client message as UTF-8 bytes, in order; ends when the session closes."""
        while True:
            if self._inbox:
                data = self._inbox.popleft()
                self._in.give(len(data))
                yield data
                continue
            if self.closed:
                return
            self._inbox_ready.clear()
            await self._inbox_ready.wait()

    async def deliver(self, messages: list[str]) -> None:
        """Queues client messages for ``inbound()``, waiting for room; dropped once the session closed."""
        for message in messages:
            data = message.encode("utf-8", "replace")
            while not self.closed and not self._in.fits(len(data)):
                await self._in.wait()
            if self.closed:
                return
            self._inbox.append(data)
            self._in.take(len(data))
            self._inbox_ready.set()

    # -- outlet --------------------------------------------------------------------------------------

    def write_now(self, data: bytes) -> bool:
        """Queues one message if the outbound buffer has room; False if not (or the session is closed)."""
        if self.closed or not self._out.fits(len(data)):
            return False
        self._outbox.append((data.decode("utf-8", "replace"), len(data)))
        self._out.take(len(data))
        self._changed.set()
        return True

    async def send(self, data: bytes) -> None:
        """Queues one message once there is room; ConnectionError if the session is (or gets) closed."""
        while not self.write_now(data):
            if self.closed:
                raise ConnectionError(f"SockJS session {self.session_id} is closed")
            await self._out.wait()

    async def close(self, code: int = CLOSE_GO_AWAY[0], reason: str = CLOSE_GO_AWAY[1]) -> None:
        """Closes the session: queued messages, then ``c[code,"reason"]``, go to the attached receiver or
        the next request that arrives."""
        self.finish(close_frame(code, reason))

    def abort(self) -> None:
        """Drops the session at once: nothing more is written either way, not even a close frame (a late
        request gets ``c[1002,"Connection interrupted"]``)."""
        self._aborted = True
        self._outbox.clear()
        self._out.give(self._out.used)
        self._inbox.clear()
        self._in.give(self._in.used)
        self.finish(close_frame(*CLOSE_INTERRUPTED))

    # -- transport side: used by SockJSEndpoint's handlers only ----------------------------------------

    def finish(self, frame: str) -> None:
        """Marks the session closed with ``frame`` as its close frame and wakes every waiter."""
        if self._close_frame is not None:
            return
        self._close_frame = frame
        self._changed.set()
        self._inbox_ready.set()
        self._out.wake()
        self._in.wake()
        if not self.attached:
            self._endpoint.schedule_expiry(self)

    def client_gone(self) -> None:
        """The transport under an attached receiver failed: the session cannot be resumed."""
        self._aborted = True
        self.finish(close_frame(*CLOSE_INTERRUPTED))

    @property
    def has_pending(self) -> bool:
        """Messages wait for a receiver (never after an abort: those were dropped)."""
        return bool(self._outbox) and not self._aborted

    @property
    def aborted(self) -> bool:
        return self._aborted

    @property
    def final_frame(self) -> str | None:
        """The close frame every request gets once the session is closed."""
        return self._close_frame

    def attach(self) -> None:
        self.attached = True
        self.cancel_timer()

    def detach(self) -> None:
        self.attached = False
        self._endpoint.schedule_expiry(self)

    def timer_fired(self) -> None:
        self._timer = None

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def set_timer(self, timer: asyncio.TimerHandle) -> None:
        self.cancel_timer()
        self._timer = timer

    async def pump(self, write: FrameWriter, *, one_shot: bool = False, limit: int | None = None) -> None:
        """Writes frames to the attached receiver until the session closes (after writing the close
        frame), ``one_shot`` wrote a frame, or ``limit`` bytes were written."""
        heartbeat_s = self._endpoint.heartbeat_s
        written = 0
        while True:
            if self._aborted:
                return
            if self._outbox:
                batch = list(self._outbox)
                self._outbox.clear()
                size = sum(nbytes for _, nbytes in batch)
                frame = messages_frame([text for text, _ in batch])
                try:
                    await write(frame)
                finally:
                    self._out.give(size)
            elif self._close_frame is not None:
                await write(self._close_frame)
                return
            else:
                self._changed.clear()
                try:
                    async with asyncio.timeout(heartbeat_s):
                        await self._changed.wait()
                    continue
                except TimeoutError:
                    frame = "h"
                    await write(frame)
            written += len(frame)
            if one_shot or (limit is not None and written >= limit):
                return


class SockJSEndpoint:
    """Every SockJS route under ``prefix`` and the sessions they carry (per node)."""

    def __init__(
        self,
        prefix: str,
        on_session: OnSession,
        *,
        heartbeat_s: float = 25.0,
        disconnect_delay_s: float = 5.0,
        streaming_limit_bytes: int = 128 * 1024,
        max_message_bytes: int = 128 * 1024,
        max_buffered_bytes: int = 1024 * 1024,
        max_sessions: int = 100_000,
        raw_websocket: RawWebSocket | None = None,
        authorize: Authorize | None = None,
    ) -> None:
        self.prefix = prefix.rstrip("/")
        self.heartbeat_s = heartbeat_s
        self.disconnect_delay_s = disconnect_delay_s
        self.streaming_limit_bytes = streaming_limit_bytes
        self.max_message_bytes = max_message_bytes
        self.max_buffered_bytes = max_buffered_bytes
        self.max_sessions = max_sessions
        self._on_session = on_session
        self._raw_websocket = raw_websocket
        self._authorize = authorize
        self._sessions: dict[str, SockJSSession] = {}
        # SockJS WebSocket sessions have no session to resume, so xhr_send can never reach them.
        self._ws_sessions: set[SockJSSession] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    # -- routes --------------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        p = self.prefix
        session = f"{p}/{{server:{_SEGMENT}}}/{{session:{_SEGMENT}}}"
        app.router.add_get(p or "/", self._welcome)
        if p:
            app.router.add_get(p + "/", self._welcome)
        app.router.add_get(f"{p}/info", self._info)
        app.router.add_route("OPTIONS", f"{p}/info", self._options("OPTIONS, GET"))
        if self._raw_websocket is not None:
            app.router.add_get(f"{p}/websocket", self._raw)
        app.router.add_get(f"{session}/websocket", self._websocket)
        app.router.add_post(f"{session}/xhr_streaming", self._xhr_streaming)
        app.router.add_post(f"{session}/xhr", self._xhr_polling)
        app.router.add_post(f"{session}/xhr_send", self._xhr_send)
        for name in ("xhr_streaming", "xhr", "xhr_send"):
            app.router.add_route("OPTIONS", f"{session}/{name}", self._options("OPTIONS, POST"))

    def sessions(self) -> int:
        """Sessions on this node, including closed ones kept for disconnect_delay_s."""
        return len(self._sessions) + len(self._ws_sessions)

    async def close(self) -> None:
        """Closes every session and cancels and awaits every ``on_session`` task; idempotent."""
        self._closing = True
        for session in [*self._sessions.values(), *self._ws_sessions]:
            session.finish(close_frame(*CLOSE_GO_AWAY))
            session.cancel_timer()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sessions.clear()

    # -- session bookkeeping --------------------------------------------------------------------------

    def schedule_expiry(self, session: SockJSSession) -> None:
        """Starts the disconnect_delay_s countdown of a session no receiver is serving."""
        if session in self._ws_sessions or self._sessions.get(session.session_id) is not session:
            return
        loop = asyncio.get_running_loop()
        session.set_timer(loop.call_later(self.disconnect_delay_s, self._expire, session))

    def _expire(self, session: SockJSSession) -> None:
        session.timer_fired()
        if session.attached:
            return
        if not session.closed:
            # No receiving request for disconnect_delay_s: the client is gone (sockjs-node didTimeout).
            session.finish(close_frame(*CLOSE_INTERRUPTED))
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]

    def _admit(self, request: web.Request, *, session: bool = True) -> web.StreamResponse | None:
        """The answer to a request that would open a session, when it must not (None: open it)."""
        if self._closing:
            return web.Response(status=503, text="Shutting down\n")
        if self._authorize is not None:
            denied = self._authorize(request)
            if denied is not None:
                return denied
        if session and self.sessions() >= self.max_sessions:
            return web.Response(status=503, text="Too many sessions\n")
        return None

    def _start(self, session: SockJSSession) -> None:
        task = asyncio.create_task(self._run(session), name=f"sockjs-session-{session.session_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, session: SockJSSession) -> None:
        try:
            await self._on_session(session)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sockjs_session_failed", session_id=session.session_id, transport=session.transport)
        finally:
            session.finish(close_frame(*CLOSE_GO_AWAY))

    # -- plain handlers -------------------------------------------------------------------------------

    async def _welcome(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="Welcome to SockJS!\n", content_type="text/plain", charset="UTF-8")

    async def _info(self, request: web.Request) -> web.StreamResponse:
        body = {"websocket": True, "origins": ["*:*"], "cookie_needed": False, "entropy": secrets.randbits(32)}
        headers = {**_cors(request), "Cache-Control": NO_CACHE}
        return web.Response(body=orjson.dumps(body), headers=headers, content_type="application/json", charset="UTF-8")

    def _options(self, methods: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def preflight(request: web.Request) -> web.StreamResponse:
            headers = {
                **_cors(request),
                "Cache-Control": f"public, max-age={CACHE_FOR_S}",
                "Expires": formatdate(usegmt=True, timeval=_now() + CACHE_FOR_S),
                "Access-Control-Allow-Methods": methods,
                "Access-Control-Max-Age": str(CACHE_FOR_S),
            }
            return web.Response(status=204, headers=headers)

        return preflight

    async def _raw(self, request: web.Request) -> web.StreamResponse:
        # A raw WebSocket is the gateway's own connection, counted by its own limits, not a SockJS session.
        denied = self._admit(request, session=False)
        if denied is not None:
            return denied
        if self._raw_websocket is None:
            raise web.HTTPNotFound
        return await self._raw_websocket(request)

    # -- websocket transport --------------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=self.max_message_bytes, timeout=WS_CLOSE_TIMEOUT_S)
        if not ws.can_prepare(request).ok:
            return web.Response(status=400, text='Can "Upgrade" only to "WebSocket".')
        denied = self._admit(request)
        if denied is not None:
            return denied
        await ws.prepare(request)
        session = SockJSSession(self, request.match_info["session"], "websocket", request)
        session.attach()
        self._ws_sessions.add(session)
        reader = asyncio.create_task(self._read_ws(ws, session), name=f"sockjs-ws-reader-{session.session_id}")

        async def write(frame: str) -> None:
            if not ws.closed:
                await ws.send_str(frame)

        try:
            await write("o")
            session.opened = True
            self._start(session)
            await session.pump(write)
        except (ConnectionError, RuntimeError):
            pass  # the client went away mid-write; the reader notices too
        finally:
            session.client_gone()  # no-op on the close frame when the server closed it first
            self._ws_sessions.discard(session)
            broken = reader.done() and not reader.cancelled() and reader.exception() is None and reader.result()
            reader.cancel()
            # A reader failure must not become a 500 on an upgraded socket; the session is closed either way.
            await asyncio.gather(reader, return_exceptions=True)
        code, reason = broken or (1000, "")
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.close(code=code, message=reason.encode())
        return ws

    async def _read_ws(self, ws: web.WebSocketResponse, session: SockJSSession) -> tuple[int, str] | None:
        """Feeds client messages to the session; returns the close to send when the client broke framing."""
        try:
            async for msg in ws:
                if msg.type is WSMsgType.BINARY:
                    return WS_BROKEN_FRAMING
                if msg.type is not WSMsgType.TEXT:
                    return None  # an error (e.g. over max_message_bytes: aiohttp already closed with 1009)
                if not msg.data:
                    continue
                messages = parse_messages(msg.data)
                if messages is None:
                    return WS_BROKEN_FRAMING
                await session.deliver(messages)
            return None
        finally:
            # Whatever ended the read (close, error, broken framing), the session cannot continue.
            session.client_gone()

    # -- xhr transports -------------------------------------------------------------------------------

    async def _xhr_streaming(self, request: web.Request) -> web.StreamResponse:
        return await self._receive(request, "xhr-streaming")

    async def _xhr_polling(self, request: web.Request) -> web.StreamResponse:
        return await self._receive(request, "xhr-polling")

    async def _receive(self, request: web.Request, transport: str) -> web.StreamResponse:
        """One receiving request: opens the session, resumes it, or answers 2010 / its close frame."""
        session = self._find_or_open(request, transport)
        if not isinstance(session, SockJSSession):
            return session
        # Decided before the first await, so two racing requests cannot both attach.
        busy = session.attached
        # A closed session still hands what it had queued before its close frame to one more request.
        attach = not busy and (not session.closed or session.has_pending)
        if attach:
            session.attach()
        headers = {**_cors(request), "Cache-Control": NO_CACHE, "Content-Type": JS_TYPE}
        response = web.StreamResponse(headers=headers)

        async def write(frame: str) -> None:
            await response.write(frame.encode() + b"\n")

        try:
            await response.prepare(request)
            if transport == "xhr-streaming":
                await response.write(PRELUDE)
            if busy:
                await write(close_frame(*CLOSE_ANOTHER_CONNECTION))
            elif not attach:
                await write(session.final_frame or close_frame(*CLOSE_GO_AWAY))
            else:
                await self._serve(session, transport, write)
            await response.write_eof()
        except ConnectionError:
            # The client dropped the request: like sockjs-node's abort, the session cannot be resumed.
            if attach:
                session.client_gone()
        except asyncio.CancelledError:
            if attach:
                session.client_gone()
            raise
        finally:
            if attach:
                session.detach()
        return response

    def _find_or_open(self, request: web.Request, transport: str) -> SockJSSession | web.StreamResponse:
        """The session a receiving request names, a new one, or the answer refusing to open it."""
        session = self._sessions.get(request.match_info["session"])
        if session is not None:
            return session
        denied = self._admit(request)
        if denied is not None:
            return denied
        session = SockJSSession(self, request.match_info["session"], transport, request)
        self._sessions[session.session_id] = session
        return session

    async def _serve(self, session: SockJSSession, transport: str, write: FrameWriter) -> None:
        """Frames for the request attached to ``session``: ``o`` first, then what the transport allows."""
        streaming = transport == "xhr-streaming"
        if not session.opened:
            await write("o")
            session.opened = True
            self._start(session)
            if not streaming:
                return  # a polling response carries one frame
        await session.pump(write, one_shot=not streaming, limit=self.streaming_limit_bytes)

    async def _xhr_send(self, request: web.Request) -> web.StreamResponse:
        """Client messages for an open session: 204, 404 for an unknown session, 500 for a bad body."""
        body = await _read_body(request, self.max_message_bytes)
        if body is None:
            return web.Response(status=413, text="Payload too large.")
        try:
            messages = decode_send_body(body)
        except PayloadError as exc:
            return web.Response(status=500, text=str(exc))
        session = self._sessions.get(request.match_info["session"])
        if session is None:
            return web.Response(status=404, text="Session not found.")
        await session.deliver(messages)
        headers = {**_cors(request), "Cache-Control": NO_CACHE, "Content-Type": TEXT_TYPE}
        return web.Response(status=204, headers=headers)


def _cors(request: web.Request) -> dict[str, str]:
    origin = request.headers.get("Origin")
    headers = {
        "Access-Control-Allow-Origin": origin if origin and origin != "null" else "*",
        "Access-Control-Allow-Credentials": "true",
        "Vary": "Origin",
    }
    requested = request.headers.get("Access-Control-Request-Headers")
    if requested:
        headers["Access-Control-Allow-Headers"] = requested
    return headers


def _now() -> float:
    return time.time()


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The request body, or None when it is longer than ``limit`` (read no further than that)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)
