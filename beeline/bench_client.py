"""Client worker processes of ``beeline bench``: receivers (WebSocket clients) and senders (HTTP clients).

``beeline bench`` runs each worker as ``python -m beeline.bench_client`` so that the load generator has
its own CPUs' worth of event loops, apart from the servers it measures and from the orchestrator. A
worker reads JSON commands on stdin, one per line, and writes JSON events on stdout, one per line:

receiver  config {role: "receiver", users: [[index, ws_url, token], ...], subprotocol, connect_concurrency,
          ack_every, progress_s}
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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import msgpack
from aiohttp import WSMsgType

from shared.protocol import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK

CHANNEL: Final = "bench"
REQUEST_TIMEOUT_S: Final = 15.0
CONNECT_TIMEOUT_S: Final = 30.0
CONNECT_ATTEMPTS: Final = 3


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


def message_body(to: str | list[str], msg_id: int, sent_at: float, size: int) -> dict[str, Any]:
    """One message object whose compact JSON is ``size`` bytes when that is reachable: the payload
    carries the id, the send time and padding."""
    body: dict[str, Any] = {"to": to, "channel": CHANNEL, "payload": {"i": msg_id, "t": round(sent_at, 6), "p": ""}}
    bare = len(json.dumps(body, separators=(",", ":")))
    body["payload"]["p"] = "x" * max(0, size - bare)
    return body


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


# -- receivers -----------------------------------------------------------------------------------------


@dataclass
class ReceiverState:
    receipts: list[tuple[int, int, int, float]] = field(default_factory=list)
    warmup: int = 0
    unexpected: int = 0
    closed: int = 0
    last_receipt: float = 0.0


class Receivers:
    """Many WebSocket clients in one event loop: one task per connection reading frames."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.users: list[tuple[int, str, str]] = [(int(u[0]), str(u[1]), str(u[2])) for u in config["users"]]
        self.subprotocol: str = config.get("subprotocol") or SUBPROTOCOL_JSON
        self.concurrency = int(config.get("connect_concurrency", 100))
        self.ack_every = int(config.get("ack_every", 0))
        self.progress_s = float(config.get("progress_s", 0.25))
        self.state = ReceiverState()
        self._tasks: list[asyncio.Task[None]] = []
        self._sockets: list[aiohttp.ClientWebSocketResponse] = []

    async def run(self, commands: asyncio.StreamReader) -> None:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            connect_ms, failed = await self._connect_all(session)
            emit({"event": "connected", "count": len(self._sockets), "failed": failed, "connect_ms": connect_ms})
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

    async def _connect_all(self, session: aiohttp.ClientSession) -> tuple[list[float], int]:
        gate = asyncio.Semaphore(self.concurrency)
        times: list[float] = []
        failures = 0

        async def one(index: int, url: str, token: str) -> None:
            nonlocal failures
            async with gate:
                for attempt in range(CONNECT_ATTEMPTS):
                    started = time.monotonic()
                    try:
                        ws = await session.ws_connect(
                            url,
                            headers={"Authorization": f"Bearer {token}"},
                            protocols=(self.subprotocol,),
                            heartbeat=None,
                            autoping=True,
                            max_msg_size=0,
                        )
                        welcome = await asyncio.wait_for(ws.receive(), timeout=CONNECT_TIMEOUT_S)
                    except (aiohttp.ClientError, TimeoutError, OSError):
                        if attempt == CONNECT_ATTEMPTS - 1:
                            failures += 1
                            return
                        await asyncio.sleep(0.2 * (attempt + 1))
                        continue
                    frame = self._decode(welcome.data) if welcome.type in (WSMsgType.TEXT, WSMsgType.BINARY) else None
                    if frame is None or frame.get("type") != "welcome":
                        failures += 1
                        await ws.close()
                        return
                    times.append(round((time.monotonic() - started) * 1000, 3))
                    self._sockets.append(ws)
                    self._tasks.append(asyncio.create_task(self._read(index, ws)))
                    return

        await asyncio.gather(*(one(i, url, token) for i, url, token in self.users))
        return times, failures

    def _decode(self, data: str | bytes) -> dict[str, Any] | None:
        try:
            frame = msgpack.unpackb(data, raw=False) if isinstance(data, bytes) else json.loads(data)
        except (ValueError, msgpack.UnpackException):
            return None
        return frame if isinstance(frame, dict) else None

    async def _read(self, user: int, ws: aiohttp.ClientWebSocketResponse) -> None:
        state = self.state
        receipts = state.receipts
        since_ack = 0
        binary = self.subprotocol == SUBPROTOCOL_MSGPACK
        try:
            async for msg in ws:
                now = time.time()
                data = msg.data
                try:
                    frame = msgpack.unpackb(data, raw=False) if binary else json.loads(data)
                    payload = frame["payload"]
                    msg_id = int(payload["i"])
                    sent_at = float(payload["t"])
                    seq = int(frame["seq"])
                except (ValueError, KeyError, TypeError, msgpack.UnpackException):
                    state.unexpected += 1
                    continue
                if msg_id < 0:
                    state.warmup += 1
                else:
                    receipts.append((msg_id, user, seq, round((now - sent_at) * 1000, 3)))
                    state.last_receipt = now
                if self.ack_every:
                    since_ack += 1
                    if since_ack >= self.ack_every:
                        since_ack = 0
                        ack = {"type": "ack", "seq": seq}
                        await (ws.send_bytes(msgpack.packb(ack)) if binary else ws.send_str(json.dumps(ack)))
        except (aiohttp.ClientError, ConnectionError):
            pass
        finally:
            state.closed += 1

    async def _close_all(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(ws.close() for ws in self._sockets), return_exceptions=True)


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


def request_body(form: str, request: list[list[Any]], sent_at: float, size: int) -> tuple[str, bytes]:
    """(path, JSON body) of one request of the given form."""
    if form == "batch":
        messages = [message_body(users[0], msg_id, sent_at, size) for msg_id, users in request]
        return "/v1/messages/batch", encode({"messages": messages})
    [[msg_id, users]] = request
    to: str | list[str] = users[0] if form == "single" else list(users)
    return "/v1/messages", encode(message_body(to, msg_id, sent_at, size))


class HttpError(Exception):
    """The router's answer could not be read (the connection is dropped and replaced)."""


class HttpConnection:
    """One keep-alive HTTP/1.1 connection to the router, used by one request at a time.

    The load generator's own CPU competes with the servers on a small machine, so the senders speak
    just enough HTTP/1.1 for the router's API (Content-Length or chunked bodies, keep-alive) at a fraction
    of a general-purpose client's cost per request.
    """

    def __init__(self, host: str, port: int, authorization: str) -> None:
        self._host = host
        self._port = port
        self._fixed = (
            f"Host: {host}:{port}\r\nAuthorization: {authorization}\r\nContent-Type: application/json\r\n"
        ).encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> int:
        if self._writer is None or self._reader is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        reader, writer = self._reader, self._writer
        writer.write(
            b"POST " + path.encode() + b" HTTP/1.1\r\n" + self._fixed
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )  # fmt: skip
        status_line = await reader.readline()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise HttpError(f"bad status line {status_line[:80]!r}")
        length = -1
        chunked = False
        keep_alive = True
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                keep_alive = False
        if chunked:
            while (size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16)) > 0:
                await reader.readexactly(size + 2)
            await reader.readline()
        elif length >= 0:
            await reader.readexactly(length)
        else:
            keep_alive = False
            await reader.read()
        if not keep_alive:
            await self.close()
        return int(parts[1])

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()


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
        self.idle: list[HttpConnection] = []

    async def run(self, commands: asyncio.StreamReader) -> None:
        self.idle = [HttpConnection(self.host, self.port, self.authorization) for _ in range(self.concurrency)]
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
            await asyncio.gather(*(c.close() for c in self.idle), return_exceptions=True)

    async def _post(
        self, connection: HttpConnection, phase: SendPhase, request: list[list[Any]], due: float | None
    ) -> None:
        result = self.result
        count = sum(len(users) for _id, users in request)
        now = time.time()
        # Open loop: the payload carries the time the request was due, so a request that waited for a
        # free slot shows that wait as latency (no coordinated omission).
        if due is not None:
            result.lags_ms.append((now - due) * 1000)
        path, body = request_body(phase.form, request, due if due is not None else now, phase.size)
        result.sent += count
        result.last_send = now
        try:
            status = await asyncio.wait_for(connection.post(path, body), timeout=REQUEST_TIMEOUT_S)
        except (HttpError, TimeoutError, OSError, ValueError, asyncio.IncompleteReadError) as e:
            await connection.close()
            result.error(type(e).__name__)
            return
        if status == 202:
            result.accepted += count
            result.accepted_ids.extend(int(msg_id) for msg_id, _users in request)
            result.last_response = time.time()
        else:
            result.error(str(status))

    async def _send_phase(self, phase: SendPhase) -> dict[str, Any]:
        self.result = result = PhaseResult()
        free = asyncio.Queue[HttpConnection]()
        for connection in self.idle:
            free.put_nowait(connection)
        in_flight: set[asyncio.Task[None]] = set()

        async def post(connection: HttpConnection, request: list[list[Any]], due: float | None) -> None:
            try:
                await self._post(connection, phase, request, due)
            finally:
                free.put_nowait(connection)

        progress = asyncio.create_task(self._progress(phase.name))
        start_mono = time.monotonic()
        result.first_send = start_wall = time.time()
        offset = 0.0  # seconds after the start at which the next request is due (open loop)
        try:
            for request in phase.requests:
                due: float | None = None
                if phase.rate > 0:
                    delay = start_mono + offset - time.monotonic()
                    if delay > 0.0005:
                        await asyncio.sleep(delay)
                    due = start_wall + offset
                    offset += sum(len(users) for _id, users in request) / phase.rate
                connection = await free.get()
                task = asyncio.create_task(post(connection, request, due))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            if in_flight:
                await asyncio.gather(*in_flight)
        finally:
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
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

    async def _progress(self, phase: str) -> None:
        while True:
            await asyncio.sleep(self.progress_s)
            emit({"event": "progress", "phase": phase, "sent": self.result.sent, "accepted": self.result.accepted})


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
