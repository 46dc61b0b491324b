"""Inbound transport of a gateway: its own node stream (routed) or the broadcast channel.

Both readers run one owned task, hand every entry to the hub, and back off with jitter when Redis is
unavailable (no hot loop: 0.1 s doubling to 2 s). The stream reader uses a consumer group with NOACK
purely as a server-side cursor: after a reconnect it continues where it stopped, and ``XINFO GROUPS``
reports its lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from redis import exceptions as redis_exceptions

from gateway.hub import ConnectionHub
from shared.autopipeline import AutoPipeline
from shared.envelope import STREAM_FIELD, StreamEntry
from shared.errors import EnvelopeDecodeError, StoreUnavailable
from shared.keys import STREAM_GROUP, Keys
from shared.logs import get_logger
from shared.metrics import Metrics
from shared.redis import UNAVAILABLE_ERRORS, RedisClient, is_cluster, is_unavailable, store_errors

log = get_logger("beeline.gateway.reader")

STREAM_READS_IN_FLIGHT = 3
"""Blocking stream reads kept in flight on the stream connection: one always waits in Redis, and the
next ones are written every second delivery instead of after each (see ``AutoPipeline.repeat``)."""
BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 2.0
PUBSUB_CLOSE_TIMEOUT_S = 1.0


class Backoff:
    """Exponential backoff with full jitter; ``reset()`` after a success."""

    def __init__(self, start_s: float = BACKOFF_START_S, max_s: float = BACKOFF_MAX_S) -> None:
        self._start = start_s
        self._max = max_s
        self._next = start_s
        self.failures = 0

    async def wait(self) -> None:
        self.failures += 1
        delay = random.uniform(self._next / 2, self._next)
        self._next = min(self._max, self._next * 2)
        await asyncio.sleep(delay)

    def reset(self) -> None:
        self._next = self._start
        self.failures = 0


class InboundReader(Protocol):
    async def prepare(self) -> None: ...

    async def ensure_stream(self) -> None: ...

    async def run(self) -> None: ...

    async def lag(self) -> int: ...


class NodeStreamReader:
    """Reads this node's stream in batches (``XREADGROUP COUNT n BLOCK ms NOACK``)."""

    def __init__(
        self,
        *,
        redis: RedisClient,
        blocking_redis: RedisClient,
        stream_connection: AutoPipeline | None,
        keys: Keys,
        node_id: str,
        hub: ConnectionHub,
        metrics: Metrics,
        batch: int,
        block_ms: int,
        on_stream_lost: Callable[[], Awaitable[None]],
    ) -> None:
        self._redis = redis
        self._blocking = blocking_redis
        self._connection = stream_connection
        self._stream = keys.node_stream(node_id)
        self._node_id = node_id
        self._hub = hub
        self._batch = batch
        self._block_ms = block_ms
        self._on_stream_lost = on_stream_lost
        self._backoff = Backoff()
        self._entries_total = metrics.stream_entries.labels(node_id)

    async def prepare(self) -> None:
        """A fresh, empty stream and group for this incarnation of the node."""
        await self._redis.delete(self._stream)
        await self.ensure_group(from_id="$")

    async def ensure_stream(self) -> None:
        """Recreates the stream and group if Redis lost them, reading from the stream's start."""
        await self.ensure_group(from_id="0")

    async def ensure_group(self, from_id: str) -> None:
        try:
            await self._redis.xgroup_create(self._stream, STREAM_GROUP, id=from_id, mkstream=True)
        except redis_exceptions.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def lag(self) -> int:
        groups: list[dict[Any, Any]] = await self._redis.xinfo_groups(self._stream)
        for group in groups:
            name = group.get("name") or group.get(b"name")
            if name in (STREAM_GROUP, STREAM_GROUP.encode()):
                lag = group.get("lag", group.get(b"lag"))
                return int(lag) if lag is not None else 0
        return 0

    async def run(self) -> None:
        backoff = self._backoff
        while True:
            try:
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if _stream_lost(e):
                    # The stream vanished while we live (Redis restarted empty, or a peer reaped us after
                    # a stall): recreate it, reading from its start, and let the node re-register and
                    # resync.
                    log.warning("node_stream_lost", node_id=self._node_id)
                    try:
                        with store_errors():
                            await self._on_stream_lost()
                    except StoreUnavailable:
                        await backoff.wait()
                    continue
                # READONLY (a demoted primary) is a ResponseError too, and one of these.
                if not is_unavailable(e):
                    raise
                if backoff.failures == 0:
                    log.warning("node_stream_read_failed", node_id=self._node_id, error=type(e).__name__)
                await backoff.wait()

    async def _read(self) -> None:
        """Reads batches and hands them to the hub until a read fails (raised)."""
        if self._connection is None:  # Redis Cluster: redis-py routes the read to the stream's slot
            while True:
                response = await self._blocking.xreadgroup(
                    STREAM_GROUP, self._node_id, {self._stream: ">"}, count=self._batch, block=self._block_ms,
                    noack=True,
                )  # fmt: skip
                self._deliver(
                    [fields.get(STREAM_FIELD) for _stream, messages in response or () for _id, fields in messages]
                )
        # Reads written again from the connection's callback as replies arrive (AutoPipeline.repeat).
        await self._connection.repeat(
            ("XREADGROUP", "GROUP", STREAM_GROUP, self._node_id, "COUNT", self._batch, "BLOCK", self._block_ms,
             "NOACK", "STREAMS", self._stream, ">"),
            self._deliver_raw,
            depth=STREAM_READS_IN_FLIGHT,
        )  # fmt: skip

    def _deliver_raw(self, raw: Any) -> None:
        # Raw RESP2 reply: [[stream, [[id, [field, value, ...]], ...]]] or nil when the BLOCK timed out.
        self._deliver([_field(flat) for _stream, messages in raw or () for _id, flat in messages])

    def _deliver(self, payloads: list[bytes | None]) -> None:
        """One batch read: each entry's payload (``None`` when an entry lacks the field)."""
        backoff = self._backoff
        if backoff.failures:
            log.info("node_stream_read_recovered", node_id=self._node_id, failures=backoff.failures)
            backoff.reset()
        if payloads:
            self._entries_total.inc(len(payloads))
            for payload in payloads:
                self._handle(payload)

    def _handle(self, payload: bytes | None) -> None:
        try:
            if payload is None:
                raise EnvelopeDecodeError("stream entry without its data field")
            entry = StreamEntry.unpack(payload)
        except EnvelopeDecodeError:
            log.error("stream_entry_undecodable", node_id=self._node_id)
            return
        try:
            self._hub.deliver_entry(entry, "routed")
        except Exception:
            # A bug in delivering one entry must not stop the node's stream: the entries after it,
            # for other users, would wait (or, read and dropped, be lost to the live path).
            log.exception("stream_entry_failed", node_id=self._node_id)


def _stream_lost(error: Exception) -> bool:
    # NOGROUP: the stream or its group is gone. UNBLOCKED: Redis ended our blocked read because the
    # stream was deleted or the server changed role (a replica's sync replaces the whole dataset).
    if not isinstance(error, redis_exceptions.ResponseError):
        return False
    message = str(error)
    return "NOGROUP" in message or "UNBLOCKED" in message


def _field(flat: list[bytes]) -> bytes | None:
    for i in range(0, len(flat) - 1, 2):
        if flat[i] == STREAM_FIELD:
            return flat[i + 1]
    return None


class BroadcastReader:
    """``broadcast`` mode: every node reads every message from one pub/sub channel."""

    def __init__(
        self, *, blocking_redis: RedisClient, keys: Keys, node_id: str, hub: ConnectionHub, block_ms: int
    ) -> None:
        self._blocking = blocking_redis
        self._channel = keys.broadcast_channel()
        self._node_id = node_id
        self._hub = hub
        self._timeout_s = block_ms / 1000

    async def prepare(self) -> None:
        return None

    async def ensure_stream(self) -> None:
        return None

    async def lag(self) -> int:
        return 0

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                if is_cluster(self._blocking):
                    # A cluster pub/sub needs the slot map, which only a first command would load.
                    with store_errors():
                        await self._blocking.initialize()  # type: ignore[union-attr]
            except StoreUnavailable:
                await backoff.wait()
                continue
            pubsub = self._blocking.pubsub(ignore_subscribe_messages=True)  # type: ignore[union-attr]
            try:
                await pubsub.subscribe(self._channel)
                backoff.reset()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self._timeout_s)
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        entry = StreamEntry.unpack(message["data"])
                    except EnvelopeDecodeError:
                        log.error("broadcast_entry_undecodable", node_id=self._node_id)
                        continue
                    self._hub.deliver_entry(entry, "routed")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not is_unavailable(e):
                    raise
                if backoff.failures == 0:
                    log.warning("broadcast_read_failed", node_id=self._node_id, error=type(e).__name__)
                await backoff.wait()
            finally:
                # Bounded: a close racing a read in redis-py's pub/sub can wait on its lock (redis-py
                # #3941); the connection is dropped either way when the process or the client goes.
                with contextlib.suppress(TimeoutError, *UNAVAILABLE_ERRORS):
                    await asyncio.wait_for(pubsub.aclose(), timeout=PUBSUB_CLOSE_TIMEOUT_S)
