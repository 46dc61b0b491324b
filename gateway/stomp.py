"""STOMP 1.0-1.2 for the gateway: the frame codec (an incremental parser and an encoder) and the session
that puts STOMP clients on the gateway's one delivery core.

## Frame codec

A frame on the wire is ``COMMAND EOL *(name ":" value EOL) EOL body NUL``, with EOL ``\\n`` or ``\\r\\n``;
bare EOLs between frames are heart-beats and are skipped. The body is exactly ``content-length`` bytes
when that header is present (it may then contain NUL), otherwise it runs to the first NUL.

Invariants:

- ``StompParser.feed`` is split-invariant: any chunking of a byte stream yields the same frames. Each byte
  is scanned a bounded number of times (``bytes.find`` and compiled regexes from a remembered position),
  so a frame trickling in byte by byte costs linear, not quadratic, time.
- No frame larger than ``max_frame_bytes`` (command line + headers + body, counting their EOLs but not
  the NUL or heart-beats) is ever buffered whole: an
  oversized ``content-length`` is refused as soon as the headers are parsed, and an incomplete frame is
  refused as soon as the bytes buffered for it pass the limit.
- Malformed input raises ``StompError`` (never another exception); the parser is then unusable, because
  after a framing error the position of the next frame boundary is unknown.
- Header escaping follows the negotiated version (1.0: none; 1.1: ``\\n \\c \\\\``; 1.2: also ``\\r``),
  except in CONNECT and CONNECTED, which the 1.2 spec excludes so that 1.0 peers can read them.
- ``encode_frame`` never fails on server data: what a version cannot carry in a header (a line break in
  1.0 or in CONNECTED, CR in 1.1, NUL anywhere) is replaced instead, and text that is not encodable
  UTF-8 (a lone surrogate) becomes ``?``. Whatever survives that, ``feed(encode_frame(...))`` gives back
  exactly (plus the ``content-length`` the encoder adds to a non-empty body).

## Session

A STOMP session is an adapter, not a second delivery path: after CONNECT it is one gateway
``Connection`` (presence, mailbox, ``seq`` order and dedup, outbound bound, drain with 1012) whose frames
are encoded as STOMP, whatever carries them (a WebSocket on ``/ws`` or ``<sockjs>/websocket``, or a
SockJS session, see ``gateway/sockjs.py``).

Mapping (SPEC "STOMP and SockJS"):
- SUBSCRIBE ``/user/topic/<channel>`` or ``/user/queue/<channel>`` receives Beeline channel
  ``<channel>``. The connection receives only the channels it subscribed to; its delivery starts at the
  first SUBSCRIBE from the user's read cursor (the unread messages), and a later SUBSCRIBE delivers the
  unread messages of that channel (``Connection.subscribe``).
- SEND ``/user/<to>/topic/<channel>`` (or ``queue``) is a Beeline send from the session's user; RECEIPT
  once it is in the receiver's mailbox.
- ``ack:auto`` marks a message read once it is written to the client; ``client`` and
  ``client-individual`` once ACKed (cumulatively, up to that message's seq). The read cursor is a
  user's cumulative ``ack``: it never passes a message this connection has not written, one still
  waiting for a client ACK, or one it filtered out.
- A frame we cannot take (malformed, unknown, refused) gets ERROR with a ``message`` header, then the
  close; it never affects another connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from gateway.connection import Connection, Outlet
from shared.auth import Identity, bearer
from shared.envelope import Envelope
from shared.errors import AuthError, InvalidRequest, StoreUnavailable
from shared.logs import get_logger
from shared.mailbox import SequenceState
from shared.protocol import MAX_CHANNEL_LEN, CloseCode, ErrorCode, dumps_json, valid_user_id
from shared.routing import Message
from shared.runtime import stop_task

if TYPE_CHECKING:
    from gateway.app import Gateway

STOMP_VERSIONS: Final = ("1.0", "1.1", "1.2")
HEARTBEAT: Final = b"\n"

# The spec exempts these two from escaping (STOMP 1.2, "Value Encoding"), both ways.
_RAW_COMMANDS: Final = frozenset({"CONNECT", "CONNECTED"})

_COMMAND = re.compile(r"[A-Z]+")
_EOLS = re.compile(rb"(?:\r?\n)*")
# The blank line ending the header section: the EOL of the last line followed by an empty line.
_HEAD_END = re.compile(rb"\n\r?\n")
_ESCAPE = re.compile(r"\\(.?)", re.DOTALL)
_UNESCAPES_11: Final = {"n": "\n", "c": ":", "\\": "\\"}
_UNESCAPES_12: Final = {**_UNESCAPES_11, "r": "\r"}
# Longest content-length worth converting: more digits than any sane limit is "too large" without
# calling int() (which refuses over 4300 digits with a ValueError of its own).
_MAX_LENGTH_DIGITS: Final = 15


class StompError(Exception):
    """A malformed or refused frame; ``str(e)`` is short and fit for an ERROR frame's ``message`` header."""


@dataclass(frozen=True, slots=True)
class StompFrame:
    """One decoded frame. Headers keep wire order and repeats; ``header()`` applies the first-wins rule."""

    command: str
    # Not in repr: headers carry credentials (passcode, Authorization) and the body is a payload, and
    # neither may reach a log line through an f-string or a traceback.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    body: bytes = field(default=b"", repr=False)

    def header(self, name: str) -> str | None:
        """The value of the first ``name`` header (STOMP 1.2: repeated headers, the first one wins)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


def _unescape(table: dict[str, str]) -> Callable[[str], str]:
    def replace(match: re.Match[str]) -> str:
        try:
            return table[match.group(1)]
        except KeyError:
            raise StompError("undefined escape sequence in a header") from None

    def unescape(text: str) -> str:
        if "\\" not in text:
            return text
        return _ESCAPE.sub(replace, text)

    return unescape


def _verbatim(text: str) -> str:
    return text


# A parsed frame head: command, headers, body offset from the frame start, content-length or -1.
_Head = tuple[str, tuple[tuple[str, str], ...], int, int]

_UNESCAPERS: Final[dict[str, Callable[[str], str]]] = {
    "1.0": _verbatim,
    "1.1": _unescape(_UNESCAPES_11),
    "1.2": _unescape(_UNESCAPES_12),
}


class StompParser:
    """Incremental frame parser for one connection; ``feed()`` bytes as they arrive, get whole frames.

    ``version`` (default 1.2) selects the header un-escaping; the session sets it once CONNECT has been
    negotiated (the CONNECT frame itself is never un-escaped, so that order works).
    """

    __slots__ = ("_buf", "_failed", "_max_frame_bytes", "_max_headers", "_pending", "_scan", "_unescape", "_version")

    def __init__(self, *, max_frame_bytes: int, max_headers: int = 64) -> None:
        if max_frame_bytes <= 0 or max_headers < 0:
            raise ValueError("max_frame_bytes must be positive and max_headers non-negative")
        self._max_frame_bytes = max_frame_bytes
        self._max_headers = max_headers
        self._buf = bytearray()
        # Parsed head of the frame being received: (command, headers, body offset, content-length or -1).
        # Offsets are relative to the frame start, which is always the start of _buf between feeds.
        self._pending: _Head | None = None
        # Where the next search for the head end (or the body's NUL) resumes, relative to the frame start.
        self._scan = 0
        self._failed = False
        self._version = "1.2"
        self._unescape = _UNESCAPERS["1.2"]

    @property
    def version(self) -> str:
        return self._version

    @version.setter
    def version(self, version: str) -> None:
        if version not in _UNESCAPERS:
            raise ValueError(f"unknown STOMP version {version!r}")
        self._version = version
        self._unescape = _UNESCAPERS[version]

    def feed(self, data: bytes) -> list[StompFrame]:
        """The frames completed by ``data`` (possibly none); raises ``StompError`` on malformed input."""
        if self._failed:
            raise StompError("connection already failed on a malformed frame")
        # Common case: a WebSocket message holding whole frames and nothing buffered. Parse ``data`` in
        # place and copy only a leftover partial frame.
        buf: bytes | bytearray
        if self._buf:
            self._buf += data
            buf = self._buf
        else:
            buf = data
        frames: list[StompFrame] = []
        pos = 0
        try:
            pos = self._parse(buf, frames)
        except StompError:
            self._failed = True
            self._buf = bytearray()
            raise
        if buf is self._buf:
            del self._buf[:pos]
        elif pos < len(buf):
            self._buf += memoryview(buf)[pos:]
        return frames

    def _parse(self, buf: bytes | bytearray, frames: list[StompFrame]) -> int:
        """Appends the complete frames of ``buf`` to ``frames``; returns the offset of the unconsumed rest."""
        end = len(buf)
        pos = 0
        while True:
            if self._pending is None:
                match = _EOLS.match(buf, pos)
                pos = match.end() if match else pos
                # Heart-beats only (or a CR whose LF has not arrived): nothing of a frame yet.
                if pos == end or (pos == end - 1 and buf[pos] == 0x0D):
                    return pos
                self._pending = self._take_head(buf, pos)
                if self._pending is None:
                    return pos
            command, headers, body_off, length = self._pending
            nul = self._body_end(buf, pos, body_off, length)
            if nul < 0:
                return pos
            frames.append(StompFrame(command, headers, bytes(buf[pos + body_off : nul])))
            self._pending = None
            self._scan = 0
            pos = nul + 1

    def _take_head(self, buf: bytes | bytearray, pos: int) -> _Head | None:
        """The parsed head of the frame starting at ``pos``, or None while its blank line has not arrived."""
        limit = self._max_frame_bytes
        head_end = _HEAD_END.search(buf, pos + self._scan)
        if head_end is None:
            if buf.find(b"\0", pos + self._scan) != -1:
                raise StompError("malformed frame: no blank line after the headers")
            if len(buf) - pos > limit:
                raise StompError("frame too large")
            # The blank-line pattern is up to 3 bytes long: resume 2 bytes back so a split one is found.
            self._scan = max(0, len(buf) - pos - 2)
            return None
        body_off = head_end.end() - pos
        if body_off > limit:
            raise StompError("frame too large")
        command, headers = self._parse_head(bytes(buf[pos : head_end.start()]))
        length = _content_length(headers)
        if length >= 0 and body_off + length > limit:
            raise StompError("frame too large")
        self._scan = body_off
        return command, headers, body_off, length

    def _body_end(self, buf: bytes | bytearray, pos: int, body_off: int, length: int) -> int:
        """Offset of the NUL ending the frame at ``pos``, or -1 while the body is incomplete."""
        if length >= 0:
            nul = pos + body_off + length
            if nul >= len(buf):
                return -1
            if buf[nul] != 0:
                raise StompError("frame body not followed by NUL (wrong content-length?)")
            return nul
        nul = buf.find(b"\0", pos + self._scan)
        if nul == -1:
            if len(buf) - pos > self._max_frame_bytes:
                raise StompError("frame too large")
            self._scan = len(buf) - pos
            return -1
        if nul - pos > self._max_frame_bytes:
            raise StompError("frame too large")
        return nul

    def _parse_head(self, head: bytes) -> tuple[str, tuple[tuple[str, str], ...]]:
        if b"\0" in head:
            raise StompError("malformed frame: NUL inside the headers")
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            raise StompError("headers are not valid UTF-8") from None
        lines = text.split("\n")
        command = lines[0].removesuffix("\r")
        if _COMMAND.fullmatch(command) is None:
            raise StompError("malformed frame: bad command line")
        if len(lines) - 1 > self._max_headers:
            raise StompError("too many headers")
        unescape = _verbatim if command in _RAW_COMMANDS else self._unescape
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            colon = line.find(":")
            if colon <= 0:
                raise StompError("malformed header line" if colon else "empty header name")
            headers.append((unescape(line[:colon]), unescape(line[colon + 1 :].removesuffix("\r"))))
        return command, tuple(headers)


def _content_length(headers: tuple[tuple[str, str], ...]) -> int:
    """The first content-length header as an int, -1 when absent."""
    for name, value in headers:
        if name == "content-length":
            if not (value.isascii() and value.isdigit()):
                raise StompError("content-length is not a non-negative integer")
            if len(value) > _MAX_LENGTH_DIGITS:
                raise StompError("frame too large")
            return int(value)
    return -1


def _escaper(cr_as: str) -> Callable[[str], str]:
    """Header-value escaping of 1.1 (``cr_as=" "``: 1.1 has no escape for CR, and a CR before the
    line's LF would read as a CRLF line end) and of 1.2 (``cr_as="\\r"``)."""

    def escape(text: str) -> str:
        if "\\" in text:
            text = text.replace("\\", "\\\\")
        if "\n" in text:
            text = text.replace("\n", "\\n")
        if ":" in text:
            text = text.replace(":", "\\c")
        if "\r" in text:
            text = text.replace("\r", cr_as)
        return text.replace("\0", "\ufffd") if "\0" in text else text

    return escape


_escape_11 = _escaper(" ")
_escape_12 = _escaper("\\r")


def _sanitize_raw(text: str) -> str:
    """For headers that cannot be escaped (1.0, CONNECT/CONNECTED): no line break, CR or NUL survives."""
    if "\n" in text or "\r" in text or "\0" in text:
        text = text.replace("\n", " ").replace("\r", " ").replace("\0", "\ufffd")
    return text


def _sanitize_raw_name(text: str) -> str:
    # The first colon ends the name, so one inside a name cannot be sent verbatim either.
    return _sanitize_raw(text).replace(":", " ")


_ESCAPERS: Final[dict[str, tuple[Callable[[str], str], Callable[[str], str]]]] = {
    "1.0": (_sanitize_raw_name, _sanitize_raw),
    "1.1": (_escape_11, _escape_11),
    "1.2": (_escape_12, _escape_12),
}


def encode_frame(
    command: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b"", *, version: str = "1.2"
) -> bytes:
    """The wire form of one frame, NUL-terminated.

    Header names and values are escaped for ``version`` (CONNECT/CONNECTED: sanitised, never escaped).
    A non-empty body gets a ``content-length`` unless the caller gave one (then the caller's is trusted).
    ``command`` is the caller's constant and is written as is.
    """
    escape_name: Callable[[str], str]
    escape_value: Callable[[str], str]
    if command in _RAW_COMMANDS:
        escape_name, escape_value = _sanitize_raw_name, _sanitize_raw
    else:
        try:
            escape_name, escape_value = _ESCAPERS[version]
        except KeyError:
            raise ValueError(f"unknown STOMP version {version!r}") from None
    parts = [command]
    has_length = False
    for name, value in headers:
        if name == "content-length":
            has_length = True
        parts.append(f"{escape_name(name)}:{escape_value(value)}")
    if body and not has_length:
        parts.append(f"content-length:{len(body)}")
    parts.append("\n")
    head = "\n".join(parts).encode("utf-8", "replace")
    return b"".join((head, body, b"\0"))


# -- session ---------------------------------------------------------------------------------------------

log = get_logger("beeline.gateway.stomp")

STOMP_SUBPROTOCOLS: Final = ("v12.stomp", "v11.stomp", "v10.stomp")
"""WebSocket subprotocols that select STOMP on ``/ws`` (and that the raw SockJS websocket accepts)."""
CONNECT_TIMEOUT_S: Final = 10.0
"""How long an upgraded connection may take to send CONNECT before it is closed."""
ACK_INTERVAL_S: Final = 1.0
"""The read cursor of ``ack:auto`` messages moves at most this often per connection (and at its close):
one Redis call per second instead of one per message, which measured 0.4 ms of gateway CPU per message
at 1,000 msg/s. The price: messages written in the last second before a gateway is killed (kill -9)
are still unread, so they come again on the user's next connection (delivery is at least once)."""
HEARTBEAT_GRACE: Final = 2.0
"""A client is silent once nothing arrived for this many times its negotiated heart-beat interval."""
MAX_SUBSCRIPTIONS: Final = 64
MAX_PENDING_ACKS: Final = 10_000
SERVER_NAME: Final = "Beeline"

_DESTINATION_KINDS: Final = ("topic", "queue")
_ACK_MODES: Final = ("auto", "client", "client-individual")


@dataclass(frozen=True, slots=True)
class Subscription:
    sub_id: str
    destination: str
    channel: str
    ack: str


def subscribed_channel(destination: str) -> str:
    """The Beeline channel of a SUBSCRIBE destination ``/user/topic/<channel>`` or ``/user/queue/<channel>``."""
    parts = destination.split("/", 3)
    if len(parts) != 4 or parts[0] or parts[1] != "user" or parts[2] not in _DESTINATION_KINDS:
        raise InvalidRequest(
            ErrorCode.INVALID_FIELD, "destination must be /user/topic/<channel> or /user/queue/<channel>"
        )
    return _valid_channel(parts[3])


def send_target(destination: str) -> tuple[str, str]:
    """Receiver and channel of a SEND destination ``/user/<to>/topic/<channel>`` (or ``queue``)."""
    parts = destination.split("/")
    if len(parts) < 5 or parts[0] or parts[1] != "user" or parts[3] not in _DESTINATION_KINDS:
        raise InvalidRequest(
            ErrorCode.INVALID_FIELD, "destination must be /user/<to>/topic/<channel> or /user/<to>/queue/<channel>"
        )
    return valid_user_id(parts[2]), _valid_channel("/".join(parts[4:]))


def _valid_channel(channel: str) -> str:
    if not channel or len(channel) > MAX_CHANNEL_LEN:
        raise InvalidRequest(ErrorCode.INVALID_FIELD, f"channel must be 1 to {MAX_CHANNEL_LEN} characters")
    return channel


def negotiate_version(accept_version: str | None) -> str | None:
    """The highest version both sides speak; a CONNECT without ``accept-version`` is STOMP 1.0."""
    if accept_version is None:
        return "1.0"
    offered = {v.strip() for v in accept_version.split(",")}
    common = [v for v in STOMP_VERSIONS if v in offered]
    return common[-1] if common else None


def negotiate_heartbeat(header: str | None, server_ms: int) -> tuple[int, int]:
    """``(send_ms, expect_ms)`` from the client's ``heart-beat: cx,cy`` and our offer ``server_ms`` both
    ways (STOMP 1.1 section "Heart-beating"); 0 means none. A malformed header is a StompError."""
    if not header:
        return 0, 0
    try:
        cx, cy = (int(part) for part in header.split(","))
    except ValueError:
        raise StompError("heart-beat must be two integers: cx,cy") from None
    if cx < 0 or cy < 0:
        raise StompError("heart-beat values must not be negative")
    send_ms = max(server_ms, cy) if server_ms and cy else 0
    expect_ms = max(server_ms, cx) if server_ms and cx else 0
    return send_ms, expect_ms


class StompCodec:
    """Encodes the connection's ``message`` frames as STOMP MESSAGE frames for the subscription of their
    channel, and notes which ones wait for a client ACK."""

    name = "stomp"
    binary = False

    def __init__(self, session: StompSession) -> None:
        self._session = session

    def encode(self, frame: dict[str, Any]) -> bytes:
        session = self._session
        if frame.get("type") != "message":
            raise ValueError(f"no STOMP form for a {frame.get('type')!r} frame")
        sub = session.by_channel.get(frame["channel"])
        if sub is None:
            raise ValueError("no subscription for this channel")
        msg_id = frame["id"]
        headers = [
            ("destination", sub.destination),
            ("subscription", sub.sub_id),
            ("message-id", msg_id),
            ("content-type", "application/json"),
            ("beeline-seq", str(frame["seq"])),
            ("beeline-epoch", frame["epoch"]),
            ("beeline-from", frame["from"]),
        ]
        if sub.ack != "auto" and session.version == "1.2":
            headers.append(("ack", msg_id))
        data = encode_frame("MESSAGE", headers, dumps_json(frame["payload"]), version=session.version)
        session.encoded(frame["seq"], msg_id, sub.ack != "auto")
        return data


class StompSession:
    """One STOMP session on ``outlet``, reading the client's bytes from ``inbound``."""

    def __init__(
        self,
        gateway: Gateway,
        outlet: Outlet,
        inbound: AsyncIterator[bytes],
        *,
        protocol: str,
        identity: Identity | None,
        cookie_token: str | None,
        established: Callable[[], None] = lambda: None,
    ) -> None:
        self._gateway = gateway
        self._outlet = outlet
        self._inbound = inbound
        self._protocol = protocol
        self._identity = identity
        self._cookie_token = cookie_token
        self._established = established
        cfg = gateway.cfg
        self._parser = StompParser(max_frame_bytes=cfg.max_frame_bytes)
        self._limiter = gateway.rate_limiter()
        self._ready: deque[StompFrame] = deque()
        self.version = "1.2"
        self.subscriptions: dict[str, Subscription] = {}
        self.by_channel: dict[str, Subscription] = {}
        self._conn: Connection | None = None
        self._begun = False
        self._last_inbound = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []
        # Read-cursor bookkeeping (see the module docstring).
        self._unwritten: set[int] = set()
        self._awaiting_ack: dict[str, int] = {}  # msg_id -> seq, client ack modes
        self._awaiting_seqs: set[int] = set()
        self._readable = 0  # highest seq written (auto) or ACKed (client)
        self._acked = 0
        self._ack_wanted = asyncio.Event()

    # -- the session ----------------------------------------------------------------------------------
    async def run(self) -> None:
        """CONNECT, then the connection's life; returns once the client or the gateway closed it."""
        try:
            await self._run()
        finally:
            if isinstance(self._inbound, AsyncGenerator):
                await self._inbound.aclose()

    async def _connect(self) -> tuple[Identity, str, int, int] | None:
        """Reads and checks CONNECT: ``(identity, version, send_ms, expect_ms)``, or None if the client
        left first; raises _Refused."""
        try:
            frame = await asyncio.wait_for(self._next_frame(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise _Refused("no CONNECT frame in time", CloseCode.PROTOCOL_ERROR) from None
        except StompError as e:
            raise _Refused(str(e), CloseCode.PROTOCOL_ERROR) from None
        if frame is None:
            return None
        if frame.command not in ("CONNECT", "STOMP"):
            raise _Refused(f"expected CONNECT, got {frame.command}", CloseCode.PROTOCOL_ERROR)
        version = negotiate_version(frame.header("accept-version"))
        if version is None:
            raise _Refused(f"supported versions are {','.join(STOMP_VERSIONS)}", CloseCode.PROTOCOL_ERROR)
        self.version = self._parser.version = version
        try:
            send_ms, expect_ms = (
                negotiate_heartbeat(frame.header("heart-beat"), self._gateway.cfg.stomp_heartbeat_ms)
                if version != "1.0"
                else (0, 0)  # heart-beating came with STOMP 1.1
            )
            return self._authenticate(frame), version, send_ms, expect_ms
        except StompError as e:
            raise _Refused(str(e), CloseCode.PROTOCOL_ERROR) from None
        except AuthError:
            self._gateway.metrics.reject("unauthorized")
            raise _Refused("unauthorized: a valid token is required", CloseCode.POLICY_VIOLATION) from None

    async def _run(self) -> None:
        try:
            connected = await self._connect()
        except _Refused as refused:
            await self._refuse(refused.message, refused.code)
            return
        if connected is None:
            return
        identity, version, send_ms, expect_ms = connected
        conn = self._conn = self._gateway.connection(
            identity.user_id,
            self._outlet,
            StompCodec(self),
            protocol=self._protocol,
            only_subscribed=True,
            on_written=self._written,
        )

        async def serve(conn: Connection, _state: SequenceState) -> None:
            # Our heart-beat answers with the negotiated intervals, so the client's own max() of the two
            # offers lands on the same values.
            connected = [
                ("version", version),
                ("heart-beat", f"{send_ms},{expect_ms}"),
                ("server", SERVER_NAME),
                ("session", conn.conn_id),
                ("user-name", conn.user_id),
            ]
            conn.send_data(encode_frame("CONNECTED", connected, version=version))
            self._established()
            self._start(self._ack_loop(conn), "stomp-acks")
            if send_ms:
                self._start(self._send_beats(conn, send_ms / 1000), "stomp-beats-out")
            if expect_ms:
                self._start(self._watch_beats(conn, expect_ms / 1000), "stomp-beats-in")
            try:
                await self._serve_frames(conn)
            finally:
                await self._flush_acks(conn)

        try:
            await self._gateway.run_connection(conn, identity, serve)
        finally:
            for task in self._tasks:
                await stop_task(task)

    def _authenticate(self, connect: StompFrame) -> Identity:
        # First found wins: the upgrade's header or query (checked before the upgrade), the CONNECT
        # frame's Authorization / passcode / token header, then the cookie.
        if self._identity is not None:
            return self._identity
        token = (
            bearer(connect.header("Authorization") or connect.header("authorization"))
            or connect.header("passcode")
            or connect.header("token")
            or self._cookie_token
        )
        if not token:
            raise AuthError("missing token")
        return self._gateway.verifier.verify(token)

    async def _refuse(self, message: str, code: int) -> None:
        """ERROR then close, before a Connection exists (nothing is registered yet)."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._outlet.send(encode_frame("ERROR", [("message", message)], version=self.version))
        with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
            await asyncio.wait_for(self._outlet.close(code, message[:120]), timeout=2.0)

    async def _next_frame(self) -> StompFrame | None:
        while not self._ready:
            try:
                data = await anext(self._inbound)
            except StopAsyncIteration:
                return None
            self._last_inbound = time.monotonic()
            self._ready.extend(self._parser.feed(data))
        return self._ready.popleft()

    async def _serve_frames(self, conn: Connection) -> None:
        while conn.close_code is None:
            try:
                frame = await self._next_frame()
            except StompError as e:
                await self._error(conn, str(e), CloseCode.PROTOCOL_ERROR)
                return
            if frame is None:
                return
            if not self._limiter.allow():
                self._gateway.metrics.reject(ErrorCode.RATE_LIMITED)
                await self._error(conn, "over the per-connection rate limit", CloseCode.POLICY_VIOLATION, frame)
                return
            try:
                if not await self._handle(conn, frame):
                    return
            except InvalidRequest as e:
                self._gateway.metrics.reject(e.code)
                await self._error(conn, e.message, CloseCode.PROTOCOL_ERROR, frame)
                return
            except StoreUnavailable:
                self._gateway.metrics.reject(ErrorCode.UNAVAILABLE)
                await self._error(conn, "message store unavailable; nothing was sent, retry", 1013, frame)
                return

    async def _error(self, conn: Connection, message: str, code: int, frame: StompFrame | None = None) -> None:
        headers = [("message", message)]
        receipt = frame.header("receipt") if frame is not None else None
        if receipt is not None:
            headers.append(("receipt-id", receipt))
        conn.send_data(encode_frame("ERROR", headers, version=self.version))
        await conn.flush_and_close(code, timeout_s=1.0)

    def _receipt(self, conn: Connection, frame: StompFrame) -> None:
        receipt = frame.header("receipt")
        if receipt is not None:
            conn.send_data(encode_frame("RECEIPT", [("receipt-id", receipt)], version=self.version))

    async def _handle(self, conn: Connection, frame: StompFrame) -> bool:
        """One client frame; False when the session ends (DISCONNECT)."""
        command = frame.command
        if command == "SEND":
            await self._send(conn, frame)
        elif command == "SUBSCRIBE":
            await self._subscribe(conn, frame)
        elif command == "UNSUBSCRIBE":
            self._unsubscribe(conn, frame)
        elif command in ("ACK", "NACK"):
            self._ack(conn, frame)
        elif command == "DISCONNECT":
            self._receipt(conn, frame)
            await conn.flush_and_close(CloseCode.NORMAL, timeout_s=1.0)
            return False
        elif command in ("BEGIN", "COMMIT", "ABORT"):
            raise InvalidRequest(ErrorCode.UNKNOWN_TYPE, "transactions are not supported")
        elif command in ("CONNECT", "STOMP"):
            raise InvalidRequest(ErrorCode.UNKNOWN_TYPE, "already connected")
        else:
            raise InvalidRequest(ErrorCode.UNKNOWN_TYPE, f"unknown command {command}")
        return True

    async def _send(self, conn: Connection, frame: StompFrame) -> None:
        to, channel = send_target(_required(frame, "destination"))
        content_type = frame.header("content-type") or ""
        if content_type.split(";")[0].strip().lower() == "application/json":
            try:
                payload: Any = json.loads(frame.body)
            except (ValueError, RecursionError):
                raise InvalidRequest(ErrorCode.BAD_FRAME, "the body is not valid JSON") from None
        else:
            try:
                payload = frame.body.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(ErrorCode.BAD_FRAME, "a body that is not JSON must be UTF-8 text") from None
        envelope = Envelope.create(sender=conn.user_id, channel=channel, payload=payload)
        await self._gateway.sender.send([Message(envelope, (to,))])
        self._receipt(conn, frame)

    async def _subscribe(self, conn: Connection, frame: StompFrame) -> None:
        destination = _required(frame, "destination")
        # STOMP 1.0 makes the id optional; its MESSAGE frames then name the destination.
        sub_id = frame.header("id") or (destination if self.version == "1.0" else _required(frame, "id"))
        channel = subscribed_channel(destination)
        ack = frame.header("ack") or "auto"
        if ack not in _ACK_MODES:
            raise InvalidRequest(ErrorCode.INVALID_FIELD, "ack must be auto, client or client-individual")
        if sub_id in self.subscriptions:
            raise InvalidRequest(ErrorCode.INVALID_FIELD, f"subscription id {sub_id} is in use")
        if len(self.subscriptions) >= MAX_SUBSCRIPTIONS:
            raise InvalidRequest(ErrorCode.INVALID_FIELD, f"at most {MAX_SUBSCRIPTIONS} subscriptions")
        sub = Subscription(sub_id, destination, channel, ack)
        self.subscriptions[sub_id] = sub
        # One message is written once per connection: a channel subscribed twice goes to the first.
        self.by_channel.setdefault(channel, sub)
        conn.subscribe(channel)
        if not self._begun:
            # Delivery starts at the first SUBSCRIBE, from the user's read cursor as it is now.
            self._begun = True
            state = await self._gateway.mailbox.open(conn.user_id)
            conn.begin(state, state.acked)
        self._receipt(conn, frame)

    def _unsubscribe(self, conn: Connection, frame: StompFrame) -> None:
        sub_id = frame.header("id") or (frame.header("destination") if self.version == "1.0" else None)
        if sub_id is None:
            raise InvalidRequest(ErrorCode.INVALID_FIELD, "UNSUBSCRIBE needs an id header")
        sub = self.subscriptions.pop(sub_id, None)
        if sub is None:
            raise InvalidRequest(ErrorCode.INVALID_FIELD, f"no subscription {sub_id}")
        if self.by_channel.get(sub.channel) is sub:
            del self.by_channel[sub.channel]
            other = next((s for s in self.subscriptions.values() if s.channel == sub.channel), None)
            if other is not None:
                self.by_channel[sub.channel] = other
            else:
                conn.unsubscribe(sub.channel)
        self._receipt(conn, frame)

    def _ack(self, conn: Connection, frame: StompFrame) -> None:
        msg_id = frame.header("id") if self.version == "1.2" else frame.header("message-id")
        if msg_id is None:
            raise InvalidRequest(ErrorCode.INVALID_FIELD, f"{frame.command} needs an id (1.2) or message-id header")
        seq = self._awaiting_ack.get(msg_id)
        if frame.command == "ACK" and seq is not None:
            # Cumulative, as the SPEC says for both client modes: everything up to that seq is read.
            for other_id, other_seq in list(self._awaiting_ack.items()):
                if other_seq <= seq:
                    del self._awaiting_ack[other_id]
                    self._awaiting_seqs.discard(other_seq)
            self._readable = max(self._readable, seq)
            self._ack_wanted.set()
        # NACK (or an ACK of a message not waiting for one): nothing becomes read.
        self._receipt(conn, frame)

    # -- read cursor -----------------------------------------------------------------------------------
    def encoded(self, seq: int, msg_id: str, needs_ack: bool) -> None:
        """The codec encoded message ``seq``; it is not read before it is written (and ACKed)."""
        self._unwritten.add(seq)
        if needs_ack and len(self._awaiting_ack) < MAX_PENDING_ACKS:
            self._awaiting_ack[msg_id] = seq
            self._awaiting_seqs.add(seq)
        elif needs_ack:
            self._awaiting_seqs.add(seq)  # kept unread, but not ACKable here: it comes again on reconnect

    def _written(self, seq: int) -> None:
        self._unwritten.discard(seq)
        if seq not in self._awaiting_seqs and seq > self._readable:
            self._readable = seq
            self._ack_wanted.set()

    def _ack_limit(self, conn: Connection) -> int:
        limit = self._readable
        waiting = self._unwritten | self._awaiting_seqs
        if waiting:
            limit = min(limit, min(waiting) - 1)
        return conn.ack_limit(limit)

    async def _flush_acks(self, conn: Connection) -> None:
        limit = self._ack_limit(conn)
        if limit > self._acked and conn.epoch is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._gateway.mailbox.ack(conn.user_id, conn.epoch, limit)
                self._acked = limit

    async def _ack_loop(self, conn: Connection) -> None:
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted.clear()
            await self._flush_acks(conn)
            await asyncio.sleep(ACK_INTERVAL_S)

    # -- heart-beats -----------------------------------------------------------------------------------
    def _start(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def _send_beats(self, conn: Connection, interval_s: float) -> None:
        while conn.close_code is None:
            await asyncio.sleep(interval_s)
            conn.send_data(HEARTBEAT)

    async def _watch_beats(self, conn: Connection, interval_s: float) -> None:
        limit = interval_s * HEARTBEAT_GRACE
        while conn.close_code is None:
            silent = time.monotonic() - self._last_inbound
            if silent > limit:
                log.info("stomp_heartbeat_missed", user_id=conn.user_id, conn_id=conn.conn_id)
                conn.close(CloseCode.HEARTBEAT_MISSED, "no heart-beat from the client")
                return
            await asyncio.sleep(limit - silent + 0.01)


class _Refused(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _required(frame: StompFrame, name: str) -> str:
    value = frame.header(name)
    if value is None:
        raise InvalidRequest(ErrorCode.INVALID_FIELD, f"{frame.command} needs a {name} header")
    return value
