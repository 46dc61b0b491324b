"""The transport seam: how an accepted message reaches the nodes that hold its receivers.

``routed`` (:class:`NodeStreamDelivery`, the default) appends one entry per target node to that node's
stream: Redis traffic per message is independent of the number of nodes. ``broadcast``
(:class:`BroadcastDelivery`, the original design's scheme 1, kept for measured comparison) publishes
every message once on a pub/sub channel that every node reads; each node drops what it cannot deliver.
:class:`MemoryDelivery` runs the same contract in-process for unit tests.

Both Redis transports are at-least-once towards the node: a retried push can arrive twice, and the
gateway drops any ``seq`` a connection has already had, so duplicates never reach a client.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from shared.autopipeline import AutoPipeline
from shared.envelope import STREAM_FIELD, Recipient, StreamEntry
from shared.keys import Keys
from shared.redis import OpGuard, RedisClient, untimed


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One accepted message: its packed envelope, every recipient, and the live remote nodes to push to."""

    envelope: bytes
    recipients: tuple[Recipient, ...]
    targets: dict[str, list[Recipient]] = field(default_factory=dict)


class Delivery(Protocol):
    """Pushes accepted messages and control commands to gateway nodes."""

    mode: str

    async def push(self, outgoing: Sequence[Outgoing]) -> list[set[str]]:
        """Pushes every message; returns, per message, the nodes that could not be reached."""
        ...

    async def disconnect(self, user_id: str, node_ids: Sequence[str]) -> None:
        """Tells the given nodes to close every connection of ``user_id``."""
        ...


class NodeStreamDelivery:
    """``routed``: XADD one entry per (message, node) to the node's own stream, pipelined.

    ``NOMKSTREAM``: a node's stream exists only while the node maintains it, so a push racing a node's
    death never recreates a stream that nobody would read or expire.
    """

    mode = "routed"

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        *,
        stream_maxlen: int,
        guard: OpGuard = untimed,
        fast: AutoPipeline | None = None,
    ) -> None:
        self._redis = redis
        self._fast = fast
        self._keys = keys
        self._maxlen = stream_maxlen
        self._guard = guard

    async def push(self, outgoing: Sequence[Outgoing]) -> list[set[str]]:
        plan: list[tuple[int, str]] = []
        entries: list[tuple[str, bytes]] = []
        unreached: list[set[str]] = [set() for _ in outgoing]
        for index, out in enumerate(outgoing):
            for node_id, recipients in out.targets.items():
                entries.append((node_id, StreamEntry(envelope=out.envelope, recipients=tuple(recipients)).pack()))
                plan.append((index, node_id))
        if not plan:
            return unreached
        ids = await self._append_entries(entries)
        for (index, node_id), entry_id in zip(plan, ids, strict=True):
            if entry_id is None:
                unreached[index].add(node_id)
        return unreached

    async def disconnect(self, user_id: str, node_ids: Sequence[str]) -> None:
        entry = StreamEntry(envelope=None, disconnect_user=user_id).pack()
        await self._append_entries([(node_id, entry) for node_id in node_ids])

    async def _append_entries(self, entries: Sequence[tuple[str, bytes]]) -> list[Any]:
        """XADDs each ``(node, entry)`` to that node's stream in one round trip: an entry id each, or
        None where the stream no longer exists (its node is gone)."""
        stream = self._keys.node_stream
        with self._guard("stream_push"):
            if self._fast is not None:
                return await self._fast.execute_many(
                    [
                        ("XADD", stream(node_id), "NOMKSTREAM", "MAXLEN", "~", self._maxlen, "*", STREAM_FIELD, entry)
                        for node_id, entry in entries
                    ]
                )
            pipeline: Any = self._redis.pipeline(transaction=False)
            async with pipeline as pipe:
                for node_id, entry in entries:
                    pipe.xadd(
                        stream(node_id), {STREAM_FIELD: entry}, maxlen=self._maxlen, approximate=True, nomkstream=True
                    )
                return list(await pipe.execute())


class BroadcastDelivery:
    """``broadcast``: PUBLISH every message, with all its recipients, to the channel every node reads."""

    mode = "broadcast"

    def __init__(
        self, redis: RedisClient, keys: Keys, *, guard: OpGuard = untimed, fast: AutoPipeline | None = None
    ) -> None:
        self._redis = redis
        self._fast = fast
        self._channel = keys.broadcast_channel()
        self._guard = guard

    async def push(self, outgoing: Sequence[Outgoing]) -> list[set[str]]:
        await self._publish([StreamEntry(envelope=out.envelope, recipients=out.recipients).pack() for out in outgoing])
        return [set() for _ in outgoing]

    async def disconnect(self, user_id: str, node_ids: Sequence[str]) -> None:
        await self._publish([StreamEntry(envelope=None, disconnect_user=user_id).pack()])

    async def _publish(self, entries: Sequence[bytes]) -> None:
        with self._guard("broadcast_publish"):
            if self._fast is not None:
                await self._fast.execute_many([("PUBLISH", self._channel, entry) for entry in entries])
            else:
                # Redis Cluster: a cluster pipeline cannot route keyless PUBLISH; the bus fans it out anyway.
                await asyncio.gather(*(self._redis.publish(self._channel, entry) for entry in entries))


class MemoryDelivery:
    """In-process delivery for unit tests: hands entries straight to per-node callbacks."""

    mode = "memory"

    def __init__(self) -> None:
        self.nodes: dict[str, Callable[[StreamEntry], None]] = {}
        self.pushed: dict[str, list[StreamEntry]] = defaultdict(list)

    async def push(self, outgoing: Sequence[Outgoing]) -> list[set[str]]:
        unreached: list[set[str]] = []
        for out in outgoing:
            missing = set()
            for node_id, recipients in out.targets.items():
                entry = StreamEntry(envelope=out.envelope, recipients=tuple(recipients))
                self.pushed[node_id].append(entry)
                handler = self.nodes.get(node_id)
                if handler is None:
                    missing.add(node_id)
                else:
                    handler(entry)
            unreached.append(missing)
        return unreached

    async def disconnect(self, user_id: str, node_ids: Sequence[str]) -> None:
        for node_id in node_ids:
            entry = StreamEntry(envelope=None, disconnect_user=user_id)
            self.pushed[node_id].append(entry)
            if handler := self.nodes.get(node_id):
                handler(entry)


def create_delivery(
    mode: str,
    redis: RedisClient,
    keys: Keys,
    *,
    stream_maxlen: int,
    guard: OpGuard,
    fast: AutoPipeline | None = None,
) -> Delivery:
    if mode == "broadcast":
        return BroadcastDelivery(redis, keys, guard=guard, fast=fast)
    return NodeStreamDelivery(redis, keys, stream_maxlen=stream_maxlen, guard=guard, fast=fast)


if TYPE_CHECKING:
    _routed: type[Delivery] = NodeStreamDelivery
    _broadcast: type[Delivery] = BroadcastDelivery
    _memory: type[Delivery] = MemoryDelivery
