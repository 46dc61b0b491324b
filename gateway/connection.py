"""One client connection: ordered, duplicate-free delivery and a bounded outbound queue.

Ordering invariant: frames leave in ``seq`` order and ``last_seq`` only grows, so a ``seq`` is never
written twice to one connection. A live item that is not the next ``seq`` (a gap: pushes from two
senders raced, or the node missed some) switches the connection to *syncing*: live items are parked
(bounded; anything dropped is re-read) and a sync task reads the mailbox from ``last_seq`` until it
has reached every ``seq`` known to exist, then drains what was parked.

Outbound: a frame goes straight onto the socket when nothing is queued before it and the socket's
send buffer is below ``DIRECT_WRITE_LIMIT``; otherwise one writer task drains a deque bounded in frames
and bytes. Live delivery never waits: a connection over its bound is closed with 4008 (slow consumer)
and what it missed waits in the mailbox. Catch-up from the mailbox does wait for room, so a large
backlog streams at the client's pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from aiohttp import web

from shared.envelope import Envelope, Recipient
from shared.errors import EnvelopeDecodeError, StoreUnavailable
from shared.logs import get_logger
from shared.mailbox import SequenceState, StoredMessage
from shared.metrics import Metrics
from shared.protocol import CloseCode, FrameCodec, message_frame

log = get_logger("beeline.gateway.connection")

MAX_PARKED: Final = 1024
"""Live items parked while syncing; beyond it they are dropped and re-read from the mailbox."""
CLOSE_GRACE_S: Final = 2.0
"""How long a closing connection may take to answer our close frame before the TCP connection is dropped."""
CATCHUP_PAGE: Final = 256
"""Mailbox entries read per round trip while syncing."""

DIRECT_WRITE_LIMIT: Final = 64 * 1024
"""Bytes buffered in a connection's socket beyond which frames wait in its queue (aiohttp's limit)."""
_TEXT: Final = 0x1
_BINARY: Final = 0x2


def ws_frame(data: bytes, opcode: int) -> bytes:
    """One unmasked, unfragmented server frame (RFC 6455 section 5.2): what aiohttp writes for it."""
    length = len(data)
    if length < 126:
        return bytes((0x80 | opcode, length)) + data
    if length < 1 << 16:
        return struct.pack("!BBH", 0x80 | opcode, 126, length) + data
    return struct.pack("!BBQ", 0x80 | opcode, 127, length) + data


class Outlet(Protocol):
    """Where a connection's frames go: a WebSocket, or a SockJS session (gateway/sockjs.py) that frames
    them for its transport. ``data`` is one encoded frame of the connection's protocol."""

    @property
    def closed(self) -> bool: ...

    def write_now(self, data: bytes) -> bool:
        """Writes (or takes) ``data`` at once if that cannot block; False: queue it and :meth:`send` later."""
        ...

    async def send(self, data: bytes) -> None:
        """Writes ``data``, waiting for room; raises ConnectionError if the peer is gone."""
        ...

    async def close(self, code: int, reason: str) -> None: ...

    def abort(self) -> None:
        """Drops the peer at once, without a close handshake."""
        ...

    @property
    def abort_after_close(self) -> bool:
        """Whether a peer that has not finished the close handshake ``CLOSE_GRACE_S`` after our close is
        dropped (a WebSocket); a SockJS session times out by its own rules instead."""
        ...


class WebSocketOutlet:
    """An aiohttp WebSocket as an :class:`Outlet`: a frame goes straight onto the TCP transport when its
    send buffer is below ``DIRECT_WRITE_LIMIT`` (no writer-task wake-up), else through aiohttp."""

    __slots__ = ("_opcode", "_transport", "binary", "ws")
    abort_after_close: Final = True

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.BaseTransport | None, *, binary: bool) -> None:
        self.ws = ws
        self.binary = binary
        self._opcode = _BINARY if binary else _TEXT
        # aiohttp hands every WebSocket its connection's transport; uvloop's is an asyncio.Transport
        # without subclassing it.
        self._transport: Any = transport

    @property
    def closed(self) -> bool:
        return self.ws.closed

    def write_now(self, data: bytes) -> bool:
        transport = self._transport
        if (
            transport is None
            or self.ws.closed
            or transport.is_closing()
            or transport.get_write_buffer_size() >= DIRECT_WRITE_LIMIT
        ):
            return False
        transport.write(ws_frame(data, self._opcode))
        return True

    async def send(self, data: bytes) -> None:
        if self.binary:
            await self.ws.send_bytes(data)
        else:
            await self.ws.send_str(data.decode())

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code=code, message=reason.encode())

    def abort(self) -> None:
        # Also when aiohttp already called transport.close(): a graceful close waits for the send
        # buffer to flush, which a peer that stopped reading never allows.
        if self._transport is not None:
            self._transport.abort()


MailboxReader = Callable[[str, int, int], Awaitable[list[StoredMessage]]]
WrittenHook = Callable[[int], None]
MailboxOpener = Callable[[str], Awaitable[SequenceState]]


def _newer_epoch(candidate: str, current: str) -> bool:
    # Epochs are Redis TIME in microseconds as digits, so a later epoch compares greater.
    try:
        return int(candidate) > int(current)
    except ValueError:
        return candidate > current


class Connection:
    """State and outbound queue of one WebSocket; owned by the gateway handler that accepted it."""

    def __init__(
        self,
        *,
        conn_id: str,
        user_id: str,
        outlet: Outlet,
        codec: FrameCodec,
        metrics: Metrics,
        read_mailbox: MailboxReader,
        max_frames: int,
        max_bytes: int,
        protocol: str = "beeline",
        only_subscribed: bool = False,
        on_written: WrittenHook | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.user_id = user_id
        self.outlet = outlet
        self.codec = codec
        self.protocol = protocol
        self.subscriptions: set[str] = set()
        # STOMP: a connection receives only the channels it subscribed to, none before its first
        # SUBSCRIBE, and subscribing to a channel delivers that channel's unread messages (replay).
        self.only_subscribed = only_subscribed
        self.epoch: str | None = None
        self.last_seq = 0
        self.first_filtered: int | None = None
        self.close_code: int | None = None
        self._on_written = on_written
        self._metrics = metrics
        self._delivered = metrics.delivery_recorder(protocol)
        self._node = metrics.node
        self._read_mailbox = read_mailbox
        self._max_frames = max_frames
        self._max_bytes = max_bytes
        self._replays: set[str] = set()
        self._unsubscribed_at: dict[str, int] = {}
        self._queue: deque[tuple[bytes, float, str, int]] = deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._parked: dict[int, tuple[Envelope, Recipient, str]] = {}
        self._target = 0
        self._syncing = True  # until begin(): live items are parked while the start point is unknown
        self._sync_task: asyncio.Task[None] | None = None
        self._writer = asyncio.create_task(self._write_loop(), name=f"ws-writer-{conn_id}")
        self._closing: asyncio.Task[None] | None = None
        self._drained: asyncio.Event | None = None
        self._abort_timer: asyncio.TimerHandle | None = None

    # -- sequence ---------------------------------------------------------------------------------
    def begin(self, state: SequenceState, start_after: int) -> None:
        """Sets the start point (``since`` or the read cursor) and catches up to ``state.last_seq``."""
        self.epoch = state.epoch
        self.last_seq = start_after
        self._target = max(self._target, state.last_seq)
        for seq in [s for s, (_, r, _) in self._parked.items() if r.epoch != state.epoch]:
            del self._parked[seq]
        self._start_sync()

    def resync(self, state: SequenceState) -> None:
        """After Redis lost data or this node was reaped: catch up with what the mailbox holds now."""
        if self.epoch is None:
            return
        if state.epoch != self.epoch:
            self._adopt_epoch(state.epoch)
        self._target = max(self._target, state.last_seq)
        if not self._syncing:
            self._start_sync()

    def offer(self, envelope: Envelope, recipient: Recipient, path: str) -> None:
        """A live item for this connection's user (from the node stream, pub/sub or the local path)."""
        if self.close_code is not None:
            return
        if self.epoch is not None and recipient.epoch != self.epoch:
            if not _newer_epoch(recipient.epoch, self.epoch):
                return  # a straggler from a sequence that no longer exists
            self._adopt_epoch(recipient.epoch)
        seq = recipient.seq
        if seq <= self.last_seq:
            return
        if not self._syncing and seq == self.last_seq + 1:
            self._emit(envelope, recipient, path)
            return
        self._target = max(self._target, seq)
        if len(self._parked) < MAX_PARKED:
            self._parked[seq] = (envelope, recipient, path)
        if not self._syncing:
            self._start_sync()

    def ack_limit(self, seq: int) -> int:
        """The highest seq an ``ack`` from this connection may mark read: what it was sent, and never
        past a message its subscriptions filtered out."""
        limit = min(seq, self.last_seq)
        if self.first_filtered is not None:
            limit = min(limit, self.first_filtered - 1)
        return limit

    def _adopt_epoch(self, epoch: str) -> None:
        # The user's sequence restarted (Redis lost it): the new one starts at 1.
        log.warning("epoch_changed", user_id=self.user_id, conn_id=self.conn_id, epoch=epoch)
        self.epoch = epoch
        self.last_seq = 0
        self.first_filtered = None
        self._target = 0
        self._unsubscribed_at.clear()
        self._parked = {s: item for s, item in self._parked.items() if item[1].epoch == epoch}

    def _start_sync(self) -> None:
        self._syncing = True
        self._sync_task = asyncio.create_task(self._sync(), name=f"ws-sync-{self.conn_id}")

    async def _sync(self) -> None:
        failed = False
        try:
            await self._sync_until_caught_up()
        except StoreUnavailable:
            # The parked items stay; the next live item, or the node's resync once Redis is back,
            # retries. Restarting here would spin against a Redis that is down.
            failed = True
            log.warning("mailbox_read_failed", user_id=self.user_id, conn_id=self.conn_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sync_failed", user_id=self.user_id, conn_id=self.conn_id)
            self.close(CloseCode.INTERNAL_ERROR)
        finally:
            self._syncing = False
            self._sync_task = None
        # Items parked after the sync's last look (or left by a failed read) restart it.
        if self._parked and not failed and self.close_code is None and self.epoch is not None:
            self._start_sync()

    async def _sync_until_caught_up(self) -> None:
        while self.close_code is None and self.epoch is not None:
            if self._replays:
                await self._replay_subscribed()
                continue
            if not await self._drain_parked_paced():
                return
            if self.last_seq >= self._target:
                return
            epoch = self.epoch
            page = await self._read_mailbox(self.user_id, self.last_seq, CATCHUP_PAGE)
            if epoch != self.epoch:
                continue  # the epoch changed under us; start over from the new one
            self._metrics.mailbox_reads.labels(self._node, "sync").inc()
            if not page:
                # What is missing is gone (mailbox cap or TTL): skip to the oldest parked item.
                if self._parked:
                    self.last_seq = min(self._parked) - 1
                    continue
                self._target = self.last_seq
                return
            for stored in page:
                # Paced per frame, not per page: a page can be larger than the outbound bound, and
                # catch-up must stream at the reader's pace rather than trip the slow-consumer close.
                if not await self._wait_for_room(epoch):
                    break
                if stored.seq <= self.last_seq:
                    continue
                try:
                    envelope = Envelope.unpack(stored.envelope)
                except EnvelopeDecodeError:
                    log.error("mailbox_entry_undecodable", user_id=self.user_id, seq=stored.seq)
                    self.last_seq = stored.seq
                    continue
                # A seq jump here means the mailbox cap or TTL dropped older entries: nothing to wait for.
                self.last_seq = stored.seq - 1
                self._emit(envelope, Recipient(self.user_id, stored.seq, epoch), "mailbox")
            self._target = max(self._target, self.last_seq)

    async def _wait_for_room(self, epoch: str | None) -> bool:
        """Waits until the outbound queue has room; False if the connection closed or the epoch moved."""
        await self._room.wait()
        return self.close_code is None and self.epoch == epoch

    async def _drain_parked_paced(self) -> bool:
        """Emits parked items that are next in order, pacing like catch-up; False if we must stop."""
        epoch = self.epoch
        while self._parked:
            seq = min(self._parked)
            if seq <= self.last_seq:
                del self._parked[seq]
                continue
            if seq != self.last_seq + 1:
                break
            if not await self._wait_for_room(epoch):
                return False
            if self.last_seq + 1 in self._parked:
                envelope, recipient, path = self._parked.pop(self.last_seq + 1)
                self._emit(envelope, recipient, path)
        return True

    def _emit(self, envelope: Envelope, recipient: Recipient, path: str) -> None:
        self.last_seq = recipient.seq
        if (self.subscriptions or self.only_subscribed) and envelope.channel not in self.subscriptions:
            # Not delivered here, so it stays unread for the user's other connections: this
            # connection's cumulative acks must stop below it (see ack_limit).
            if self.first_filtered is None:
                self.first_filtered = recipient.seq
            return
        self._write_message(envelope, recipient, path)

    def _write_message(self, envelope: Envelope, recipient: Recipient, path: str) -> None:
        try:
            self.send_frame(message_frame(envelope, recipient), envelope.ts, path, recipient.seq)
        except (TypeError, ValueError, OverflowError):
            # A payload this connection's subprotocol has no form for (input validation should have
            # refused it): skipped and logged, rather than failing the node's stream read or closing
            # a connection that would then fail the same way on every catch-up.
            log.exception("message_unencodable", user_id=self.user_id, conn_id=self.conn_id, msg_id=envelope.msg_id)

    # -- subscriptions ------------------------------------------------------------------------------
    def subscribe(self, channel: str) -> None:
        """From now on ``channel`` is delivered here; with ``only_subscribed``, its messages that this
        connection filtered out so far (still unread for it) are delivered too, by the sync task."""
        if channel in self.subscriptions:
            return
        self.subscriptions.add(channel)
        if self.only_subscribed and self.epoch is not None and self.first_filtered is not None:
            self._replays.add(channel)
            if not self._syncing:
                self._start_sync()

    def unsubscribe(self, channel: str) -> None:
        if channel not in self.subscriptions:
            return
        self.subscriptions.discard(channel)
        if channel in self._replays:
            self._replays.discard(channel)  # its filtered messages were never replayed: they still count
        else:
            self._unsubscribed_at[channel] = self.last_seq  # everything of it up to here was delivered

    async def _replay_subscribed(self) -> None:
        """Delivers the filtered-out messages of newly subscribed channels: the mailbox between the first
        filtered seq and ``last_seq``. Runs in the sync task, so no live item is written meanwhile; each
        channel keeps its seq order, and a seq is still written at most once (a channel's messages up to
        its last unsubscribe were delivered then). ``first_filtered`` becomes the first message in that
        range that is still not delivered here."""
        channels, self._replays = self._replays, set()
        epoch = self.epoch
        if self.first_filtered is None or epoch is None:
            return
        cursor, last = self.first_filtered - 1, self.last_seq
        still_filtered: int | None = None
        while cursor < last:
            page = await self._read_mailbox(self.user_id, cursor, CATCHUP_PAGE)
            if epoch != self.epoch:
                return  # the sequence restarted: nothing filtered is left of the old one
            if not page:
                break
            for stored in page:
                if stored.seq > last:
                    break
                cursor = stored.seq
                try:
                    envelope = Envelope.unpack(stored.envelope)
                except EnvelopeDecodeError:
                    continue
                channel = envelope.channel
                if channel in channels and channel in self.subscriptions:
                    if stored.seq > self._unsubscribed_at.get(channel, 0):
                        if not await self._wait_for_room(epoch):
                            return
                        self._write_message(envelope, Recipient(self.user_id, stored.seq, epoch), "mailbox")
                elif still_filtered is None and (channel not in self.subscriptions or channel in self._replays):
                    still_filtered = stored.seq
            else:
                continue
            break
        self.first_filtered = still_filtered

    # -- outbound -----------------------------------------------------------------------------------
    def send_frame(self, frame: dict[str, Any], ts: float = 0.0, path: str = "", seq: int = 0) -> None:
        """Encodes and queues a frame; closes the connection as a slow consumer when over the bound."""
        if self.close_code is not None:
            return
        self.send_data(self.codec.encode(frame), ts, path, seq)

    def send_data(self, data: bytes, ts: float = 0.0, path: str = "", seq: int = 0) -> None:
        """Queues one encoded frame; ``path`` and ``seq`` are set for a message (delivery metrics and the
        ``on_written`` hook once it is written)."""
        if self.close_code is not None:
            return
        if not self._queue and self.outlet.write_now(data):
            if path:
                self._written(ts, path, seq)
            return
        size = len(data)
        if len(self._queue) >= self._max_frames or self._queued_bytes + size > self._max_bytes:
            self._metrics.slow_closes.labels(self._node).inc()
            log.warning("slow_consumer_closed", user_id=self.user_id, conn_id=self.conn_id, queued=len(self._queue))
            self.close(CloseCode.SLOW_CONSUMER)
            return
        self._queue.append((data, ts, path, seq))
        self._queued_bytes += size
        if len(self._queue) >= self._max_frames // 2 or self._queued_bytes >= self._max_bytes // 2:
            self._room.clear()
        self._wakeup.set()

    def _written(self, ts: float, path: str, seq: int) -> None:
        self._delivered(path, max(0.0, time.time() - ts))
        if self._on_written is not None:
            self._on_written(seq)

    async def _write_loop(self) -> None:
        outlet = self.outlet
        try:
            while self.close_code is None:
                if not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                data, ts, path, seq = self._queue.popleft()
                self._queued_bytes -= len(data)
                await outlet.send(data)
                if path:
                    self._written(ts, path, seq)
                if not self._room.is_set() and len(self._queue) < self._max_frames // 4:
                    self._room.set()
                if not self._queue and self._drained is not None:
                    self._drained.set()
        except asyncio.CancelledError:
            raise
        except (ConnectionError, RuntimeError):
            # The peer went away mid-write; the handler's read loop sees the close and cleans up.
            self.close(CloseCode.NORMAL)

    # -- lifecycle ----------------------------------------------------------------------------------
    def close(self, code: int, reason: str = "") -> None:
        """Closes the socket with ``code`` (once); returns at once, the close runs in the background."""
        if self.close_code is not None:
            return
        self.close_code = code
        self._room.set()
        self._closing = asyncio.create_task(self._close(code, reason), name=f"ws-close-{self.conn_id}")

    async def _close(self, code: int, reason: str) -> None:
        # What is queued is dropped (it waits in the mailbox); a frame already handed to the outlet goes
        # out before the close frame. The writer is not cancelled: aiohttp shares one drain waiter
        # between writers, and cancelling a writer blocked in it would cancel the close frame's drain.
        self._queue.clear()
        self._queued_bytes = 0
        self._wakeup.set()
        try:
            await asyncio.wait_for(self.outlet.close(code, reason), timeout=CLOSE_GRACE_S)
        except (TimeoutError, ConnectionError, RuntimeError):
            # The peer did not take the close frame in time (it stopped reading): drop the connection.
            self.outlet.abort()
            return
        if self.outlet.abort_after_close:
            # The close frame is out; a peer that stopped reading never answers it, and aiohttp would
            # wait for that answer until its ping times out. Give it a grace period, then drop it.
            self._abort_timer = asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self.outlet.abort)

    async def flush_and_close(self, code: int, timeout_s: float) -> None:
        """Lets queued frames go out (bounded by ``timeout_s``), then closes with ``code``."""
        if self._queue and self.close_code is None:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout_s)
        self.close(code)
        await self.wait_closed()

    async def wait_closed(self) -> None:
        if self._closing is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._closing

    async def release(self) -> None:
        """Stops every task of this connection (the handler calls it once the socket is closed)."""
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        if self.close_code is None:
            self.close_code = CloseCode.NORMAL
        tasks = [t for t in (self._writer, self._sync_task, self._closing) if t is not None and not t.done()]
        for task in tasks:
            if task is not self._closing:
                task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class RateLimiter:
    """Token bucket: ``rate`` frames per second with bursts of ``burst``."""

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
