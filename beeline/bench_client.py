"""Client worker processes of ``beeline bench``: receivers (WebSocket clients) and senders (HTTP clients).

``beeline bench`` runs each worker as ``python -m beeline.bench_client`` so that the load generator has
its own CPUs' worth of event loops, apart from the servers it measures and from the orchestrator. A
worker reads JSON commands on stdin, one per line, and writes JSON events on stdout, one per line:

receiver  config {role: "receiver", users: [[index, ws_url, token], ...], subprotocol, dialect (beeline, or
          socketio for the peer), protocol (beeline; stomp: STOMP 1.2 on the gateway's /ws;
          sockjs-xhr-streaming: STOMP 1.2 in a SockJS session over xhr-streaming on the same gateway),
          connect_concurrency, ack_every, progress_s}
          -> {event: "connected", count, failed, connect_ms: [...]}, then {event: "progress", received,
          warmup} every ``progress_s``; on {cmd: "report"} -> {event: "report", receipts: [[id, user, seq,
          latency_ms], ...], last_receipt, closed}
sender    config {role: "sender", url, api_key, concurrency, progress_s}
          -> {event: "ready"}; on {cmd: "send", phase, form, rate, size, requests: [[[id, [user, ...]], ...], ...]}
          -> {event: "progress", phase, sent, accepted} every ``progress_s`` and {event: "done", phase,
          sent, accepted, accepted_ids, errors, first_send, last_send, last_response, sender_lag_p99_ms}

End of stdin (or {cmd: "quit"}) closes every socket and exits. A receiver records, per message frame, the
payload id and send time the sender embedded, the frame's ``seq`` and the receive time (``time.time()``:
everything runs on one machine, so the clocks agree). Warm-up messages carry negative ids.

With protocol ``stomp`` a receiver offers ``v12.stomp``, sends CONNECT (the token as ``passcode``) and
SUBSCRIBE ``/user/topic/bench``, and reads each MESSAGE frame's ``beeline-seq`` header as the seq and its
body as the payload, so the accounting is the same as for Beeline's own ``message`` frames.

With protocol ``sockjs-xhr-streaming`` each receiver is a SockJS session at ``BEELINE_SOCKJS_PATH``
(default ``/chat-websocket``) of the gateway its URL names: a streamed POST of ``xhr_streaming`` carries
the server's frames (``o``, ``a[...]`` arrays of STOMP frames, ``h``) and is re-POSTed with the same
session id when the gateway ends it; CONNECT and SUBSCRIBE go as POSTs of ``xhr_send``. The same STOMP
frames as with ``stomp`` are exchanged, and the same accounting applies.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import os
import secrets
import struct
import sys
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

import aiohttp
import msgpack

from shared.protocol import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK

CHANNEL: Final = "bench"
WS_GUID: Final = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
"""RFC 6455's constant for Sec-WebSocket-Accept."""
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
REQUEST_TIMEOUT_S: Final = 15.0
CONNECT_TIMEOUT_S: Final = 30.0
CONNECT_ATTEMPTS: Final = 3
STOMP_SUBPROTOCOL: Final = "v12.stomp"
SOCKJS_PROTOCOL: Final = "sockjs-xhr-streaming"
SOCKJS_READ_BUFFER: Final = 1 << 20  # a streamed line holds a whole array of frames: above aiohttp's default


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 28)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def read_command(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await reader.readline()
    if not line:
        return {"cmd": "quit"}
    command: dict[str, Any] = json.loads(line)
    return command


# -- payloads ------------------------------------------------------------------------------------------


def message_json(to: str | list[str], msg_id: int, sent_at: float, size: int) -> str:
    """One message object's compact JSON, ``size`` bytes when that is reachable: the payload carries
    the id, the send time and padding. Formatted, not ``json.dumps``-ed twice to measure the padding:
    the sender's CPU competes with the servers it measures."""
    head = f'{{"to":{json.dumps(to, separators=(",", ":"))},"channel":"{CHANNEL}","payload":{{"i":{msg_id},'
    head += f'"t":{round(sent_at, 6)!r},"p":"'
    return head + "x" * max(0, size - len(head) - 3) + '"}}'


# -- receivers -----------------------------------------------------------------------------------------


def stomp_message(frame: bytes) -> dict[str, Any] | None:
    """A STOMP MESSAGE frame (without its NUL) as a Beeline ``message`` frame's seq and payload; None for
    any other frame. Only ``beeline-seq`` is read from the headers: a number needs no unescaping."""
    head, sep, body = frame.partition(b"\n\n")
    if not sep:
        head, sep, body = frame.partition(b"\r\n\r\n")
    lines = head.split(b"\n")
    if lines[0].rstrip(b"\r") != b"MESSAGE":
        return None
    seq = None
    for line in lines[1:]:
        name, _, value = line.rstrip(b"\r").partition(b":")
        if name == b"beeline-seq":
            seq = value
            break  # STOMP: the first occurrence of a repeated header wins
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    return {"type": "message", "seq": seq, "payload": payload} if seq is not None else None


@dataclass
class ReceiverState:
    receipts: list[tuple[int, int, int, float]] = field(default_factory=list)
    warmup: int = 0
    unexpected: int = 0
    closed: int = 0
    last_receipt: float = 0.0


class WsError(Exception):
    """The gateway refused the upgrade or broke the WebSocket protocol."""


class WsConnection(asyncio.Protocol):
    """One receiver's WebSocket client: just enough of RFC 6455 for the bench (a client handshake;
    unmasked text, binary and continuation frames in; masked acks, pongs and closes out).

    Frames are handled in ``data_received``: no reader task, queue or wake-up per message, so the
    receivers cost the machine as little as they can (their CPU competes with the servers measured).
    """

    def __init__(self, on_message: Callable[[WsConnection, bytes], None]) -> None:
        self._on_message = on_message
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._key = base64.b64encode(os.urandom(16)).decode()
        self._upgraded = False
        self._fragments: list[bytes] = []
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.welcome: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.Transport", transport)

    def handshake(self, host: str, port: int, path: str, subprotocol: str, token: str) -> None:
        """The upgrade request; no subprotocol or Authorization header where that argument is empty."""
        assert self._transport is not None, "connect first"
        extra = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else ""
        extra += f"Authorization: Bearer {token}\r\n" if token else ""
        self._transport.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {self._key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
            ).encode()
        )

    def send(self, data: bytes, opcode: int) -> None:
        """One masked frame (a client must mask), if the connection is still open."""
        if self._transport is None or self._transport.is_closing():
            return
        mask = os.urandom(4)
        length = len(data)
        if length < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        self._transport.write(head + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(data)))

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self.send(struct.pack("!H", 1000), OP_CLOSE)
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            if not self._upgraded and not self._read_upgrade():
                return
            self._read_frames()
        except WsError as e:
            self._fail(e)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail(WsError(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, error: WsError) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(error)
        if not self.welcome.done():
            self.welcome.set_exception(error)
        if self._transport is not None:
            self._transport.abort()

    def _read_upgrade(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        del self._buffer[: end + 4]
        if head[0].split(" ", 2)[1:2] != ["101"]:
            raise WsError(f"upgrade refused: {head[0]!r}")
        accept = base64.b64encode(hashlib.sha1((self._key + WS_GUID).encode()).digest()).decode()
        headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in head[1:])}
        if headers.get("sec-websocket-accept") != accept:
            raise WsError("wrong Sec-WebSocket-Accept")
        self._upgraded = True
        if not self.upgraded.done():
            self.upgraded.set_result(None)
        return True

    def _read_frames(self) -> None:
        buffer = self._buffer
        while len(buffer) >= 2:
            first, second = buffer[0], buffer[1]
            if second & 0x80:
                raise WsError("a server frame must not be masked")
            length, start = second & 0x7F, 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length, start = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length, start = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < start + length:
                return
            payload = bytes(buffer[start : start + length])
            del buffer[: start + length]
            self._frame(first & 0x0F, bool(first & 0x80), payload)

    def _frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode in (OP_TEXT, OP_BINARY, OP_CONTINUATION):
            self._fragments.append(payload)
            if not fin:
                return
            message = b"".join(self._fragments) if len(self._fragments) > 1 else payload
            self._fragments.clear()
            if not self.welcome.done():
                self.welcome.set_result(message)
            else:
                self._on_message(self, message)
        elif opcode == OP_PING:
            self.send(payload, OP_PONG)
        elif opcode == OP_CLOSE:
            self.close()


class Receivers:
    """Many WebSocket clients in one event loop, each handling its frames as they arrive."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.users: list[tuple[int, str, str]] = [(int(u[0]), str(u[1]), str(u[2])) for u in config["users"]]
        self.subprotocol: str = config.get("subprotocol") or SUBPROTOCOL_JSON
        # beeline: Beeline's protocol; socketio: Socket.IO's (Engine.IO v4 over a WebSocket), for the peer.
        self.socketio = config.get("dialect", "beeline") == "socketio"
        self.stomp = config.get("protocol", "beeline") == "stomp"
        self.sockjs = config.get("protocol", "beeline") == SOCKJS_PROTOCOL
        self.sockjs_path = os.environ.get("BEELINE_SOCKJS_PATH", "/chat-websocket").rstrip("/")
        self.concurrency = int(config.get("connect_concurrency", 100))
        self.ack_every = int(config.get("ack_every", 0))
        self.progress_s = float(config.get("progress_s", 0.25))
        self.state = ReceiverState()
        self._sockets: list[WsConnection] = []
        # sockjs-xhr-streaming: one HTTP client for every receiver of this worker, one task per session.
        self._http: aiohttp.ClientSession | None = None
        self._sessions: list[asyncio.Task[None]] = []

    async def run(self, commands: asyncio.StreamReader) -> None:
        connect_ms, failed = await self._connect_all()
        count = len(self._sockets) + len(self._sessions)
        emit({"event": "connected", "count": count, "failed": failed, "connect_ms": connect_ms})
        progress = asyncio.create_task(self._progress())
        try:
            while True:
                command = await read_command(commands)
                if command["cmd"] == "report":
                    s = self.state
                    emit(
                        {
                            "event": "report",
                            "receipts": s.receipts,
                            "warmup": s.warmup,
                            "unexpected": s.unexpected,
                            "closed": s.closed,
                            "last_receipt": s.last_receipt,
                        }
                    )
                elif command["cmd"] == "quit":
                    break
        finally:
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
            await self._close_all()

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(self.progress_s)
            s = self.state
            emit({"event": "progress", "received": len(s.receipts), "warmup": s.warmup, "closed": s.closed})

    async def _connect_all(self) -> tuple[list[float], int]:
        gate = asyncio.Semaphore(self.concurrency)
        times: list[float] = []
        failures = 0

        async def one(index: int, url: str, token: str) -> None:
            nonlocal failures
            async with gate:
                for attempt in range(CONNECT_ATTEMPTS):
                    started = time.monotonic()
                    try:
                        if self.sockjs:
                            ok = await self._connect_sockjs(index, url, token)
                            ws = None
                        else:
                            ws = await self._connect(index, url, token)
                            ok = ws is not None
                    except (WsError, TimeoutError, OSError, aiohttp.ClientError):
                        if attempt == CONNECT_ATTEMPTS - 1:
                            failures += 1
                            return
                        await asyncio.sleep(0.2 * (attempt + 1))
                        continue
                    if not ok:
                        failures += 1
                        return
                    times.append(round((time.monotonic() - started) * 1000, 3))
                    if ws is not None:
                        self._sockets.append(ws)
                    return

        await asyncio.gather(*(one(i, url, token) for i, url, token in self.users))
        return times, failures

    async def _connect(self, user: int, url: str, token: str) -> WsConnection | None:
        """A connection that got its welcome frame; None when the first frame was something else."""
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        loop = asyncio.get_running_loop()
        joined: asyncio.Future[None] = loop.create_future()
        # One handler per connection: it counts that one's acks.
        if self.stomp:
            return await self._connect_stomp(user, host, port, path, token)
        ws = WsConnection(self._socketio_handler(user, joined) if self.socketio else self._handler(user))
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await loop.create_connection(lambda: ws, host, port)
            ws.handshake(host, port, path, "" if self.socketio else self.subprotocol, token)
            welcome = await ws.welcome
            if self.socketio and welcome.startswith(b"0"):  # Engine.IO's open packet: join the main namespace
                ws.closed.add_done_callback(lambda _closed: joined.done() or joined.set_exception(WsError("closed")))
                ws.send(b"40", OP_TEXT)
                await joined
                return self._track(ws)
        frame = self._decode(welcome)
        if frame is None or frame.get("type") != "welcome":
            ws.close()
            return None
        return self._track(ws)

    async def _connect_stomp(self, user: int, host: str, port: int, path: str, token: str) -> WsConnection | None:
        """A STOMP 1.2 session subscribed to the bench's channel; None when CONNECT was not answered
        with CONNECTED. The token goes in CONNECT's passcode, as stomp.js pages send it."""
        subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ws = WsConnection(self._stomp_handler(user, subscribed))
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await asyncio.get_running_loop().create_connection(lambda: ws, host, port)
            ws.handshake(host, port, path, STOMP_SUBPROTOCOL, "")
            await ws.upgraded
            ws.send(f"CONNECT\naccept-version:1.2\nheart-beat:0,0\npasscode:{token}\n\n\x00".encode(), OP_TEXT)
            welcome = await ws.welcome
            if not welcome.lstrip(b"\r\n").startswith(b"CONNECTED\n"):
                ws.close()
                return None
            # Connected means subscribed (its RECEIPT came back): a message sent before that would have
            # no subscription to go to, and the warm-up would wait for it in vain.

            def refused(_closed: asyncio.Future[None]) -> None:
                if not subscribed.done():
                    subscribed.set_exception(WsError("closed before the subscription's receipt"))

            ws.closed.add_done_callback(refused)
            ws.send(f"SUBSCRIBE\nid:s0\ndestination:/user/topic/{CHANNEL}\nreceipt:s0\n\n\x00".encode(), OP_TEXT)
            await subscribed
        return self._track(ws)

    async def _connect_sockjs(self, user: int, url: str, token: str) -> bool:
        """A SockJS xhr-streaming session, STOMP-connected and subscribed to the bench's channel; False
        when CONNECT was not answered with CONNECTED. Its reading task stays in ``_sessions``."""
        parts = urllib.parse.urlsplit(url)
        base = f"http://{parts.hostname or '127.0.0.1'}:{parts.port or 80}{self.sockjs_path}"
        base += f"/{secrets.randbelow(1000):03d}/{secrets.token_hex(8)}"
        if self._http is None:
            # No pool limit: every receiver holds one streamed response open for the whole run.
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
                read_bufsize=SOCKJS_READ_BUFFER,
            )
        http = self._http
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        connected: asyncio.Future[bytes] = loop.create_future()
        subscribed: asyncio.Future[None] = loop.create_future()
        on_frames = self._stomp_frames(user, subscribed)

        def on_data(data: bytes) -> None:
            if not connected.done():
                connected.set_result(data)  # the first frame: CONNECTED, or an ERROR
            else:
                on_frames(data)

        reader = asyncio.create_task(self._sockjs_stream(http, base, opened, on_data, (connected, subscribed)))
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await opened
                await self._sockjs_send(
                    http, base, f"CONNECT\naccept-version:1.2\nheart-beat:0,0\npasscode:{token}\n\n\x00"
                )
                if not (await connected).lstrip(b"\r\n").startswith(b"CONNECTED\n"):
                    raise WsError("CONNECT not answered with CONNECTED")
                # As with stomp: connected means subscribed, so that the warm-up has somewhere to go.
                await self._sockjs_send(
                    http, base, f"SUBSCRIBE\nid:s0\ndestination:/user/topic/{CHANNEL}\nreceipt:s0\n\n\x00"
                )
                await subscribed
        except WsError:
            await _cancel(reader)
            return False
        except BaseException:
            await _cancel(reader)
            raise
        self._sessions.append(reader)
        return True

    async def _sockjs_stream(
        self,
        http: aiohttp.ClientSession,
        base: str,
        opened: asyncio.Future[None],
        on_data: Callable[[bytes], None],
        pending: tuple[asyncio.Future[Any], ...],
    ) -> None:
        """Reads the session's streamed responses, one after another, until the gateway closes it."""
        try:
            while True:
                async with http.post(f"{base}/xhr_streaming") as resp:
                    if resp.status != 200:
                        raise WsError(f"xhr_streaming answered {resp.status}")
                    while line := await resp.content.readline():
                        kind = line[:1]
                        if kind == b"a":
                            for frame in json.loads(line[1:]):
                                on_data(frame.encode())
                        elif kind == b"o" and not opened.done():
                            opened.set_result(None)
                        elif kind == b"c":
                            raise WsError(f"session closed: {line[:200]!r}")
        except (WsError, ValueError, OSError, aiohttp.ClientError) as exc:
            self.state.closed += opened.done() and all(f.done() for f in pending)  # a session that was counted
            for future in (opened, *pending):
                if not future.done():
                    future.set_exception(WsError(str(exc)))

    async def _sockjs_send(self, http: aiohttp.ClientSession, base: str, frame: str) -> None:
        async with http.post(f"{base}/xhr_send", data=json.dumps([frame])) as resp:
            if resp.status != 204:
                raise WsError(f"xhr_send answered {resp.status}")

    def _stomp_handler(self, user: int, subscribed: asyncio.Future[None]) -> Callable[[WsConnection, bytes], None]:
        """:meth:`_stomp_frames` of each text message."""
        on_frames = self._stomp_frames(user, subscribed)

        def on_message(_ws: WsConnection, data: bytes) -> None:
            on_frames(data)

        return on_message

    def _stomp_frames(self, user: int, subscribed: asyncio.Future[None]) -> Callable[[bytes], None]:
        """STOMP frames of one message (split on NUL; bare EOLs are heart-beats): a MESSAGE's
        ``beeline-seq`` header and JSON body are recorded like a Beeline ``message`` frame."""

        def on_message(data: bytes) -> None:
            now = time.time()
            for part in data.split(b"\x00"):
                chunk = part.lstrip(b"\r\n")
                if chunk.startswith(b"RECEIPT") and not subscribed.done():
                    subscribed.set_result(None)
                elif chunk.startswith(b"ERROR") and not subscribed.done():
                    subscribed.set_exception(WsError(f"STOMP ERROR: {chunk[:200]!r}"))
                elif chunk:
                    self._record(user, stomp_message(chunk), now)

        return on_message

    def _track(self, ws: WsConnection) -> WsConnection:
        ws.closed.add_done_callback(self._count_closed)
        return ws

    def _count_closed(self, _closed: asyncio.Future[None]) -> None:
        self.state.closed += 1

    def _decode(self, data: bytes) -> dict[str, Any] | None:
        try:
            frame = msgpack.unpackb(data, raw=False) if self.subprotocol == SUBPROTOCOL_MSGPACK else json.loads(data)
        except (ValueError, msgpack.UnpackException):
            return None
        return frame if isinstance(frame, dict) else None

    def _record(self, user: int, frame: dict[str, Any] | None, now: float) -> int | None:
        """Records a message frame's receipt; its seq, or None for a frame that is not one."""
        state = self.state
        try:
            if frame is None:
                raise ValueError("not a frame")
            payload = frame["payload"]
            msg_id = int(payload["i"])
            sent_at = float(payload["t"])
            seq = int(frame["seq"])
        except (ValueError, KeyError, TypeError):
            state.unexpected += 1
            return None
        if msg_id < 0:
            state.warmup += 1
        else:
            state.receipts.append((msg_id, user, seq, round((now - sent_at) * 1000, 3)))
            state.last_receipt = now
        return seq

    def _socketio_handler(self, user: int, joined: asyncio.Future[None]) -> Callable[[WsConnection, bytes], None]:
        """Socket.IO packets after Engine.IO's open: the namespace's CONNECT, pings and ``message`` events."""

        def on_message(ws: WsConnection, data: bytes) -> None:
            now = time.time()
            if data.startswith(b"42"):  # EVENT: ["message", frame]
                try:
                    event = json.loads(data[2:])
                except ValueError:
                    event = None
                frame = event[1] if isinstance(event, list) and len(event) == 2 else None
                self._record(user, frame if isinstance(frame, dict) else None, now)
            elif data == b"2":  # Engine.IO ping: the server closes a client that does not pong
                ws.send(b"3", OP_TEXT)
            elif data.startswith(b"40") and not joined.done():
                joined.set_result(None)
            elif data.startswith(b"44") and not joined.done():  # CONNECT_ERROR
                joined.set_exception(WsError(f"namespace refused: {data[:200]!r}"))

        return on_message

    def _handler(self, user: int) -> Callable[[WsConnection, bytes], None]:
        """What one connection does with each message frame: record its receipt, ack when asked."""
        binary = self.subprotocol == SUBPROTOCOL_MSGPACK
        ack_every = self.ack_every
        since_ack = 0

        def on_message(ws: WsConnection, data: bytes) -> None:
            nonlocal since_ack
            seq = self._record(user, self._decode(data), time.time())
            if seq is None:
                return
            if ack_every:
                since_ack += 1
                if since_ack >= ack_every:
                    since_ack = 0
                    ack = {"type": "ack", "seq": seq}
                    if binary:
                        ws.send(msgpack.packb(ack), OP_BINARY)
                    else:
                        ws.send(json.dumps(ack).encode(), OP_TEXT)

        return on_message

    async def _close_all(self) -> None:
        for task in self._sessions:
            task.cancel()
        for task in self._sessions:
            await _cancel(task)
        if self._http is not None:
            await self._http.close()
        for ws in self._sockets:
            ws.close()
        if self._sockets:
            await asyncio.wait([ws.closed for ws in self._sockets], timeout=CONNECT_TIMEOUT_S)


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancels ``task`` and waits for it to finish."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# -- senders -------------------------------------------------------------------------------------------


@dataclass
class SendPhase:
    """One batch of requests to send: each request is a list of [message id, [receiver ids]]."""

    name: str
    requests: list[list[list[Any]]]
    form: str  # single | batch | multi
    rate: float  # messages (deliveries) per second; 0: as fast as the concurrency allows
    size: int  # bytes of each message object's JSON


@dataclass
class PhaseResult:
    sent: int = 0
    accepted: int = 0
    accepted_ids: list[int] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    lags_ms: list[float] = field(default_factory=list)
    first_send: float = 0.0
    last_send: float = 0.0
    last_response: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def request_body(form: str, request: list[list[Any]], sent_at: float, size: int) -> tuple[bytes, bytes]:
    """(path, JSON body) of one request of the given form."""
    if form == "batch":
        messages = ",".join(message_json(users[0], msg_id, sent_at, size) for msg_id, users in request)
        return b"/v1/messages/batch", f'{{"messages":[{messages}]}}'.encode()
    [[msg_id, users]] = request
    to: str | list[str] = users[0] if form == "single" else list(users)
    return b"/v1/messages", message_json(to, msg_id, sent_at, size).encode()


class HttpError(Exception):
    """The router's answer could not be read (the connection is dropped and replaced)."""


Answered = Callable[[int | None, str | None], None]
"""Called once per request: (status, None), or (None, the error's name) when no answer came."""


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to the router, used by one request at a time.

    The load generator's own CPU competes with the servers on a small machine, so the senders speak
    just enough HTTP/1.1 for the router's API (Content-Length or chunked bodies, keep-alive), as a
    protocol with a completion callback: no stream reader, task or timer per request.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int, authorization: str) -> None:
        self._loop = loop
        self._host = host
        self._port = port
        self._fixed = f"Host: {host}:{port}\r\nAuthorization: {authorization}\r\nContent-Type: application/json\r\n"
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._answered: Answered | None = None
        self.started = 0.0  # loop time the request in progress was written

    @property
    def busy(self) -> bool:
        return self._answered is not None

    async def open(self) -> None:
        if self._transport is None or self._transport.is_closing():
            self._buffer.clear()
            await self._loop.create_connection(lambda: self, self._host, self._port)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.Transport", transport)

    def post(self, path: bytes, body: bytes, answered: Answered) -> None:
        assert self._transport is not None, "open() first"
        assert self._answered is None, "one request at a time"
        self._answered = answered
        self.started = self._loop.time()
        self._transport.write(
            b"POST " + path + b" HTTP/1.1\r\n" + self._fixed.encode()
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )  # fmt: skip

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            status = self._parse()
        except (HttpError, ValueError) as e:
            self.fail(type(e).__name__)
            return
        if status is not None:
            self._finish(status, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._answered is not None:
            self._finish(None, type(exc).__name__ if exc is not None else "ConnectionResetError")

    def fail(self, error: str) -> None:
        """Drops the connection (the next request reconnects) and reports ``error`` for its request."""
        if self._transport is not None:
            self._transport.abort()
            self._transport = None
        if self._answered is not None:
            self._finish(None, error)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _finish(self, status: int | None, error: str | None) -> None:
        answered, self._answered = self._answered, None
        if answered is not None:
            answered(status, error)

    def _parse(self) -> int | None:
        """The status of the complete answer at the buffer's start (consumed), or None while partial."""
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = bytes(buffer[:end]).split(b"\r\n")
        parts = lines[0].split(None, 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise HttpError(f"bad status line {lines[0][:80]!r}")
        length = -1
        chunked = False
        keep_alive = True
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                keep_alive = False
        start = end + 4
        if chunked:
            done = _chunked_end(buffer, start)
            if done is None:
                return None
            del buffer[:done]
        elif length >= 0:
            if len(buffer) < start + length:
                return None
            del buffer[: start + length]
        else:
            raise HttpError("an answer without a length")
        if not keep_alive:
            self.close()
        return int(parts[1])


def _chunked_end(buffer: bytearray, position: int) -> int | None:
    """Where the chunked body starting at ``position`` ends, or None while it is incomplete."""
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        size = int(bytes(buffer[position:line_end]).split(b";")[0].strip() or b"0", 16)
        position = line_end + 2 + size + 2  # the chunk and its CRLF (the last chunk has no data)
        if size == 0:
            return position if len(buffer) >= position else None
        if len(buffer) < position:
            return None


class Sender:
    """An HTTP client with a bounded number of requests in flight, open-loop when a rate is given: one
    keep-alive connection per request in flight."""

    def __init__(self, config: dict[str, Any]) -> None:
        url = urllib.parse.urlsplit(config["url"])
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.authorization = f"Bearer {config['api_key']}"
        self.concurrency = int(config.get("concurrency", 64))
        self.progress_s = float(config.get("progress_s", 0.25))
        self.result = PhaseResult()
        self.connections: list[HttpConnection] = []

    async def run(self, commands: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        self.connections = [
            HttpConnection(loop, self.host, self.port, self.authorization) for _ in range(self.concurrency)
        ]
        try:
            emit({"event": "ready"})
            while True:
                command = await read_command(commands)
                if command["cmd"] == "quit":
                    return
                if command["cmd"] == "send":
                    phase = SendPhase(
                        name=command["phase"],
                        requests=command["requests"],
                        form=command["form"],
                        rate=float(command["rate"]),
                        size=int(command["size"]),
                    )
                    emit(await self._send_phase(phase))
        finally:
            for connection in self.connections:
                connection.close()

    async def _send_phase(self, phase: SendPhase) -> dict[str, Any]:
        self.result = result = PhaseResult()
        run = _PhaseRun(phase, result, self.connections)
        progress = asyncio.create_task(self._progress(phase.name))
        watchdog = asyncio.create_task(self._expire_stuck_requests())
        try:
            await run.send_all()
        finally:
            for task in (progress, watchdog):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        lags = sorted(result.lags_ms)
        return {
            "event": "done",
            "phase": phase.name,
            "sent": result.sent,
            "accepted": result.accepted,
            "accepted_ids": result.accepted_ids,
            "errors": result.errors,
            "first_send": result.first_send,
            "last_send": result.last_send,
            "last_response": result.last_response,
            "sender_lag_p99_ms": round(lags[max(0, math.ceil(0.99 * len(lags)) - 1)], 2) if lags else 0.0,
        }

    async def _expire_stuck_requests(self) -> None:
        """One timer for all connections: a request unanswered after REQUEST_TIMEOUT_S fails."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            deadline = loop.time() - REQUEST_TIMEOUT_S
            for connection in self.connections:
                if connection.busy and connection.started < deadline:
                    connection.fail("TimeoutError")

    async def _progress(self, phase: str) -> None:
        while True:
            await asyncio.sleep(self.progress_s)
            emit({"event": "progress", "phase": phase, "sent": self.result.sent, "accepted": self.result.accepted})


class _PhaseRun:
    """Sends one phase's requests over the free connections, each answer handing its connection back."""

    def __init__(self, phase: SendPhase, result: PhaseResult, connections: list[HttpConnection]) -> None:
        self._phase = phase
        self._result = result
        self._connections = connections
        self._free = deque(connections)
        self._freed: asyncio.Future[None] | None = None  # set when a connection comes back

    async def send_all(self) -> None:
        phase, result = self._phase, self._result
        start_mono = time.monotonic()
        result.first_send = start_wall = time.time()
        offset = 0.0  # seconds after the start at which the next request is due (open loop)
        for request in phase.requests:
            count = sum(len(users) for _id, users in request)
            due: float | None = None
            if phase.rate > 0:
                delay = start_mono + offset - time.monotonic()
                if delay > 0.0005:
                    await asyncio.sleep(delay)
                due = start_wall + offset
                offset += count / phase.rate
            while not self._free:
                await self._wait_freed()
            connection = self._free.popleft()
            try:
                await connection.open()
            except OSError as e:
                result.sent += count
                result.error(type(e).__name__)
                self._release(connection)
                continue
            self._post(connection, request, count, due)
        while len(self._free) < len(self._connections):
            await self._wait_freed()

    def _post(self, connection: HttpConnection, request: list[list[Any]], count: int, due: float | None) -> None:
        result = self._result
        now = time.time()
        # Open loop: the payload carries the time the request was due, so a request that waited for a
        # free slot shows that wait as latency (no coordinated omission).
        if due is not None:
            result.lags_ms.append((now - due) * 1000)
        path, body = request_body(self._phase.form, request, due if due is not None else now, self._phase.size)
        result.sent += count
        result.last_send = now

        def answered(status: int | None, error: str | None) -> None:
            if status == 202:
                result.accepted += count
                result.accepted_ids.extend(int(msg_id) for msg_id, _users in request)
                result.last_response = time.time()
            else:
                result.error(error or str(status))
            self._release(connection)

        connection.post(path, body, answered)

    def _release(self, connection: HttpConnection) -> None:
        self._free.append(connection)
        if self._freed is not None and not self._freed.done():
            self._freed.set_result(None)

    async def _wait_freed(self) -> None:
        self._freed = asyncio.get_running_loop().create_future()
        await self._freed


# -- entry point ---------------------------------------------------------------------------------------


async def amain() -> int:
    commands = await stdin_lines()
    config = await read_command(commands)
    role = config.get("role")
    if role == "receiver":
        await Receivers(config).run(commands)
    elif role == "sender":
        await Sender(config).run(commands)
    else:
        print(f"bench_client: unknown role {role!r}", file=sys.stderr)
        return 2
    return 0


def event_loop_name() -> str:
    try:
        import uvloop  # noqa: F401, PLC0415
    except ImportError:
        return "asyncio"
    return "uvloop"


def main(argv: Sequence[str] | None = None) -> int:
    del argv
    # The load generator is not what is measured: use uvloop when it happens to be installed, so the
    # clients cost less of the machine's CPU (reported separately, and never counted as server CPU).
    if event_loop_name() == "uvloop":
        import uvloop  # noqa: PLC0415

        return uvloop.run(amain())
    return asyncio.run(amain())


if __name__ == "__main__":
    sys.exit(main())
