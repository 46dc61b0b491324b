"""A lean HTTP/1.1 front for the router's hottest request, ``POST /v1/messages``, in front of aiohttp.

Why: aiohttp's request machinery (parser callbacks, request and response objects, middleware chain)
costs about 0.11 ms of CPU per request more than a plain asyncio protocol on the 2-core bench machine
(``bench/http_floor.py``: 0.17 vs 0.06 ms per request at 1,000 requests/s), which was a quarter of the
router's cost per message. Every connection starts here. A request this front can answer exactly as
the aiohttp app would (see :func:`_plain_send`: ``POST /v1/messages`` over HTTP/1.1 with one
Content-Length and nothing that changes its meaning: no Transfer-Encoding, Expect, Upgrade,
Idempotency-Key or Connection header) is answered here, with the app's own parsing, auth, error
mapping and metrics. The first request that is anything else hands the connection, with every byte not
yet answered, to aiohttp's protocol for good, which answers it and everything after it as before. So
aiohttp still decides every unusual request, including malformed ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Final, cast

from router.app import Router, authenticate, error_reply, parse_json_object
from router.handlers import message_result, parse_message
from shared.logs import get_logger
from shared.protocol import dumps_json
from shared.routing import Message, SendResult
from shared.runtime import KEEPALIVE_TIMEOUT_S

log = get_logger("beeline.router.front")

ROUTE: Final = "/v1/messages"
REQUEST_LINE: Final = b"POST /v1/messages HTTP/1.1"
MAX_HEAD_BYTES: Final = 8 * 1024
"""A longer head goes to aiohttp (its limit is 8,190 bytes per line)."""
MAX_HEADERS: Final = 64
"""A head with more header lines goes to aiohttp (which allows 128, then answers 400)."""
MAX_BODY_BYTES: Final = 1024 * 1024
"""A larger body goes to aiohttp (it answers up to ``client_max_size``, then 413)."""
SYNC_ANSWERS_PER_TURN: Final = 32
"""Bad requests answered in one loop turn for one connection before the rest wait for the next turn."""
PAUSE_READING_AT: Final = 256 * 1024
"""Bytes buffered ahead of the answer in progress (pipelining) at which the front stops reading..."""
RESUME_READING_AT: Final = 64 * 1024
"""...and the level it must drain to before it reads again."""
KEEPALIVE_S: Final = KEEPALIVE_TIMEOUT_S
"""An idle connection, or one whose request has not arrived in full this long after it began (a client
trickling bytes), is closed: the keep-alive timeout the services give aiohttp."""
_HEADER_LINE: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*"
_HEADER_LINES: Final = re.compile(_HEADER_LINE + rb"(?:\r\n" + _HEADER_LINE + rb")*")
"""Header lines (token, colon, value without control characters), all checked in one regex call."""
_BARE_LF: Final = re.compile(rb"(?<!\r)\n")
_RESPONSE_HEADS: Final = {
    s.value: b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\n" % (s.value, s.phrase.encode())
    for s in HTTPStatus
}
"""The fixed start of each answer, per status (formatting it per request showed in the profile)."""
_NOT_PLAIN: Final = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"idempotency-key", b"connection"})


def _plain_send(head: bytes) -> tuple[int, bytes | None] | None:
    """``(content length, authorization)`` of a request head this front answers, else None."""
    line_end = head.find(b"\r\n")
    if line_end < 0 or head[:line_end] != REQUEST_LINE or _HEADER_LINES.fullmatch(head, line_end + 2) is None:
        return None  # another request, obs-fold, bad characters, ...: aiohttp decides
    lines = head[line_end + 2 :].split(b"\r\n")
    if len(lines) > MAX_HEADERS:
        return None
    length: int | None = None
    authorization: bytes | None = None
    seen: set[bytes] = set()
    for line in lines:
        name, _, value = line.partition(b":")
        name = name.lower()
        if name in _NOT_PLAIN or name in seen:  # a repeated header: aiohttp decides (some it refuses)
            return None
        seen.add(name)
        if name == b"content-length":
            value = value.strip(b" \t")
            # Seven digits hold MAX_BODY_BYTES; a longer value (zero-padded, or huge) goes to aiohttp.
            if not value.isdigit() or len(value) > 7:
                return None
            length = int(value)
        elif name == b"authorization":
            authorization = value.strip(b" \t")
    if length is None or length > MAX_BODY_BYTES:
        return None
    return length, authorization


class FastPathFront:
    """The protocol factory of the router's listening socket; owns the connections it still holds."""

    def __init__(self, router: Router, fallback: Callable[[], asyncio.BaseProtocol]) -> None:
        self.router = router
        self.fallback = fallback
        self.connections: set[FastPathProtocol] = set()
        self.closing = False
        self._date = (0, b"")
        self._sweeper: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # Validated sends of this loop turn, from any connection, and the task that sends them as one
        # pass once the turn ends (see submit).
        self._pending: list[tuple[FastPathProtocol, Message, bytes, float]] = []
        self._batch: asyncio.Task[None] | None = None
        self._gathers = router.sender.isolates_sends  # see submit

    def __call__(self) -> FastPathProtocol:
        if self.loop is None:
            # Kept: asyncio.get_running_loop() costs a getpid() syscall per call on Python 3.11.
            self.loop = asyncio.get_running_loop()
            self._sweeper = self.loop.call_later(KEEPALIVE_S / 3, self._sweep)
        return FastPathProtocol(self, self.loop)

    def date(self) -> bytes:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True).encode())
        return self._date[1]

    def submit(self, protocol: FastPathProtocol, message: Message, packed: bytes, start: float) -> asyncio.Task[None]:
        """Queues a validated send for this turn's pass; returns the task that will answer it.

        Where the store tells each append's outcome apart (:attr:`Sender.isolates_sends`: one
        standalone Redis, no durable writes), the requests that complete in the same loop turn, on any
        connection, are sent together: one task, one round trip carrying each message's own script
        call, one metrics update, and each request answered from its own outcome. Elsewhere (a Redis
        Cluster, where one slow shard would hold back and fail the others; durable writes, which
        acknowledge a whole pipeline at once) each request is a pass of its own.
        """
        if self._batch is None:
            assert self.loop is not None
            self._pending = []
            # The task starts once this turn's reads are done, and takes what was submitted by then.
            self._batch = self.loop.create_task(self._send_batch(self._pending))
        self._pending.append((protocol, message, packed, start))
        batch = self._batch
        if not self._gathers:
            self._batch = None
        return batch

    async def _send_batch(self, pending: list[tuple[FastPathProtocol, Message, bytes, float]]) -> None:
        if pending is self._pending:
            self._batch = None  # later requests go into the next pass
        sender = self.router.sender
        messages, packed = [m for _, m, _, _ in pending], [p for _, _, p, _ in pending]
        outcomes: list[list[SendResult] | Exception]
        try:
            if self._gathers:
                outcomes = await sender.send_separately(messages, packed)
            else:
                outcomes = list(await sender.send(messages, packed=packed))
        except Exception as e:  # the store failed them all (StoreUnavailable), or a bug
            outcomes = [e] * len(pending)
        for (protocol, message, _packed, start), outcome in zip(pending, outcomes, strict=True):
            self._answer(protocol, message, outcome, start)

    def _answer(
        self, protocol: FastPathProtocol, message: Message, outcome: list[SendResult] | Exception, start: float
    ) -> None:
        # One request's failure, or one connection's (a bug in going on with its next request), must
        # not leave the others of the pass unanswered: it is logged and that connection closed.
        try:
            if isinstance(outcome, Exception):
                protocol.write_error(outcome, start)
            else:
                protocol.write_answer(202, dumps_json(message_result(message, outcome)), {}, start)
            protocol.go_on()
        except Exception:
            log.exception("front_answer_failed")
            protocol.close()

    def _sweep(self) -> None:
        deadline = time.monotonic() - KEEPALIVE_S
        for connection in list(self.connections):
            connection.close_if_stale(deadline)
        assert self.loop is not None
        self._sweeper = self.loop.call_later(KEEPALIVE_S / 3, self._sweep)

    async def close(self, timeout_s: float) -> None:
        """Starts no new request, lets the ones in progress finish (at most ``timeout_s``) and closes
        each connection after its answer; then closes every connection still open."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        busy = []
        for connection in list(self.connections):
            if connection.answering is None:
                connection.close()
            else:
                busy.append(connection.answering)
        if busy:
            await asyncio.wait(busy, timeout=timeout_s)
        for connection in list(self.connections):
            connection.close()


class FastPathProtocol(asyncio.Protocol):
    """One client connection: answers plain sends in order, one at a time, until it hands over.

    Backpressure: reading stops while the socket cannot take our answers (``pause_writing``) and while
    more than ``PAUSE_READING_AT`` bytes wait behind the answer in progress; no request starts while
    writing is paused. So a client that pipelines without reading holds a bounded buffer.
    """

    def __init__(self, front: FastPathFront, loop: asyncio.AbstractEventLoop) -> None:
        self._front = front
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._head: tuple[int, int, bytes | None] | None = None  # (body start, length, auth) once parsed
        self._reading_paused = False
        self._writing_paused = False
        self._eof = False
        self.answering: asyncio.Task[None] | None = None
        self._last_active = time.monotonic()  # last answer, or the start of the request now arriving

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.Transport", transport)  # uvloop's is not a registered subclass
        self._front.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        # A send in progress completes (the message is accepted either way); its answer is dropped.
        self._front.connections.discard(self)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        if not self._buffer and self.answering is None:
            self._last_active = time.monotonic()  # a new request begins: its deadline starts now
        self._buffer += data
        if self.answering is None:
            self._next()
        self._regulate_reading()

    def eof_received(self) -> bool | None:
        # A client that half-closed after its requests still gets every answer; then the connection
        # closes. Returning None lets the transport close itself at once.
        self._eof = True
        if self.answering is None:
            self._next()
        return True if self.answering is not None else None

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._regulate_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.answering is None:
            self._next()
        self._regulate_reading()

    def close_if_stale(self, deadline: float) -> None:
        """Closes the connection when it idled, or its request has been arriving, since ``deadline``."""
        if self.answering is None and self._last_active < deadline:
            self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _regulate_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        waiting = self.answering is not None or self._writing_paused
        if not self._reading_paused and (self._writing_paused or (waiting and len(self._buffer) > PAUSE_READING_AT)):
            self._reading_paused = True
            transport.pause_reading()
        elif self._reading_paused and not self._writing_paused and len(self._buffer) < RESUME_READING_AT:
            self._reading_paused = False
            transport.resume_reading()

    def _next(self) -> None:
        """Takes the complete requests in the buffer in order: each plain send is validated at once (a
        bad one is answered at once) and a valid one is submitted to the front's pass for this turn,
        which answers it later; other requests hand the connection over."""
        answered_now = 0
        while self.answering is None and (request := self._take_request()) is not None:
            authorization, body = request
            router = self._front.router
            start = time.perf_counter()
            try:
                scope = authenticate(router, authorization.decode("latin-1") if authorization is not None else None)
                message = parse_message(router, parse_json_object(body), scope, None)
                packed = router.sender.pack(message.envelope)
            except Exception as e:
                self.write_error(e, start)
                if self._front.closing:
                    self.close()
                    return
                answered_now += 1
                if answered_now == SYNC_ANSWERS_PER_TURN:
                    # A client pipelining many bad requests gets the rest answered in later loop turns,
                    # so its flood does not hold the loop for everyone else.
                    self.answering = self._loop.create_task(self._go_on_later())
                    return
                continue
            self.answering = self._front.submit(self, message, packed, start)

    def _take_request(self) -> tuple[bytes | None, bytes] | None:
        """``(authorization, body)`` of the next complete plain send, or None: incomplete, not to be
        read now (writing paused, closing), or not a plain send (then handed over)."""
        transport = self._transport
        if transport is None or transport.is_closing() or self._writing_paused or self._front.closing:
            return None
        buffer = self._buffer
        if not buffer:
            return None
        if self._head is None:
            end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
            if end < 0:
                if (
                    len(buffer) > MAX_HEAD_BYTES
                    or not REQUEST_LINE.startswith(bytes(buffer[: len(REQUEST_LINE)]))
                    or _BARE_LF.search(buffer, 0, MAX_HEAD_BYTES) is not None
                ):
                    self._hand_over()  # not a plain send's head, or not one we would parse as aiohttp does
                return None
            head = bytes(buffer[:end])
            # Every LF ends a CRLF: two counts in C, cheaper per request than the regex search.
            plain = _plain_send(head) if head.count(b"\n") == head.count(b"\r\n") else None
            if plain is None:
                self._hand_over()
                return None
            self._head = (end + 4, *plain)  # parsed once, however slowly the body arrives
        start, length, authorization = self._head
        if len(buffer) < start + length:
            return None  # the rest of the body is on its way
        body = bytes(buffer[start : start + length])
        del buffer[: start + length]
        self._head = None
        return authorization, body

    async def _go_on_later(self) -> None:
        self.go_on()

    def go_on(self) -> None:
        """After an answer: the next request, or the close a shutdown or a half-closed client asked for."""
        self.answering = None
        if self._front.closing:
            self.close()  # shutting down: this was the last request of this connection
            return
        self._next()
        if self._eof and self.answering is None and self._transport is not None:
            self._transport.close()  # after the last answer to a half-closed client
            return
        self._regulate_reading()

    def write_error(self, error: Exception, start: float) -> None:
        """The app's JSON answer for a failed request (unexpected errors are logged by error_reply)."""
        reply = error_reply(self._front.router, error, ROUTE)
        self.write_answer(reply.status, dumps_json(reply.as_json()), reply.headers, start)

    def write_answer(self, status: int, payload: bytes, headers: Mapping[str, str], start: float) -> None:
        self._front.router.metrics.observe_http(ROUTE, status, time.perf_counter() - start)
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(self._response(status, payload, headers))
        self._last_active = time.monotonic()

    def _response(self, status: int, payload: bytes, headers: Mapping[str, str]) -> bytes:
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode("latin-1") if headers else b""
        return b"".join(
            (
                _RESPONSE_HEADS[status],
                b"Content-Length: %d\r\n" % len(payload),
                extra,
                b"Date: ",
                self._front.date(),
                b"\r\nServer: beeline\r\n\r\n",
                payload,
            )
        )

    def _hand_over(self) -> None:
        """Gives the connection, with every byte not yet answered, to aiohttp for good."""
        transport = self._transport
        assert transport is not None
        self._front.connections.discard(self)
        self._transport = None
        protocol: Any = self._front.fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._buffer:
            protocol.data_received(bytes(self._buffer))
            self._buffer.clear()
        if self._writing_paused:
            protocol.pause_writing()
        if self._eof and not protocol.eof_received():
            transport.close()
        elif self._reading_paused:
            with contextlib.suppress(RuntimeError):
                transport.resume_reading()
