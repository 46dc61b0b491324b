"""The node registry: which gateway nodes are alive, on Redis's clock.

Each gateway beats every ``heartbeat_interval_s``: one Lua call moves its deadline (Redis ``TIME`` +
2 intervals) forward in a sorted set, plus a constant handful of pipelined commands (info hash,
key TTLs, consumer lag). The cost is per node, never per connection.

TTL arithmetic: a beat at time ``b`` sets ``deadline = b + 2 * interval``. A node that dies right after
beating at ``b`` is dead from ``b + 2 * interval`` on, i.e. within two intervals of its death, and every
reader compares deadlines to *Redis* time (estimated locally as ``redis_now_at_refresh + monotonic
elapsed``), so a dead node is excluded at its deadline even between two refreshes. Readers refresh their
cached view every ``min(1 s, interval / 2)``: a live node's cached deadline is always at least one
interval ahead of the refresh, so it is never mistaken for dead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.keys import Keys
from shared.redis import OpGuard, RedisClient, lua_source, untimed


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class RegistryView:
    """A snapshot of the registry: deadlines (Redis ms) and Redis's clock at the time it was read.

    ``asked_at`` is when the read was sent (local monotonic clock): a view asked after a moment saw
    every registration Redis had applied by then.
    """

    deadlines: Mapping[str, float] = field(default_factory=dict)
    redis_now_ms: float = 0.0
    taken_at: float = field(default_factory=time.monotonic)
    asked_at: float = float("-inf")

    def redis_now_ms_estimate(self) -> float:
        return self.redis_now_ms + (time.monotonic() - self.taken_at) * 1000

    def is_live(self, node_id: str) -> bool:
        deadline = self.deadlines.get(node_id)
        return deadline is not None and deadline > self.redis_now_ms_estimate()

    def needs_fresh_read(self, node_id: str) -> bool:
        """True when only a newer read can tell whether the node is live: it is unknown (it may have
        registered since), or it was live when read and only the local extrapolation says its deadline
        passed (a late read on a busy process must not declare a node dead that beat on time). A node
        already past its deadline when read is dead; if it comes back it finds its registration lapsed
        and resyncs its connections from their mailboxes, so nothing waits on a stale verdict."""
        deadline = self.deadlines.get(node_id)
        if deadline is None:
            return True
        return self.redis_now_ms < deadline <= self.redis_now_ms_estimate()

    def live_nodes(self) -> list[str]:
        now = self.redis_now_ms_estimate()
        return sorted(n for n, d in self.deadlines.items() if d > now)


@dataclass(frozen=True, slots=True)
class Beat:
    """What one heartbeat learned: whether senders saw this node as dead until now, and dead peers.

    ``was_absent``: not registered (first beat, Redis lost it, or a peer reaped it).
    ``was_expired``: registered but past its deadline (the node stalled for 2 intervals or more).
    """

    was_absent: bool
    was_expired: bool
    dead_nodes: tuple[str, ...]

    @property
    def lapsed(self) -> bool:
        return self.was_absent or self.was_expired


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    connections: int
    stream_lag: int
    draining: bool


class NodeRegistry:
    """Live gateway nodes: heartbeats (gateway side) and a locally cached view (both sides)."""

    def __init__(
        self, redis: RedisClient, keys: Keys, *, dead_after_s: float, key_ttl_s: float, guard: OpGuard = untimed
    ) -> None:
        self._redis = redis
        self._guard = guard
        self._keys = keys
        self._dead_after_ms = int(dead_after_s * 1000)
        self._key_ttl_ms = int(key_ttl_s * 1000)
        self._beat = redis.register_script(lua_source("node_beat"))
        self._list = redis.register_script(lua_source("node_list"))
        self._forget = redis.register_script(lua_source("node_forget"))
        self._view = RegistryView(taken_at=float("-inf"))  # never read: the first lookup refreshes
        self._refresh_lock = asyncio.Lock()

    @property
    def view(self) -> RegistryView:
        return self._view

    async def refresh(self) -> RegistryView:
        asked_at = time.monotonic()
        with self._guard("node_list"):
            raw = await self._list(keys=[self._keys.node_registry()])
        flat = raw[1]
        deadlines = {_text(flat[i]): float(flat[i + 1]) for i in range(0, len(flat), 2)}
        view = RegistryView(
            deadlines=deadlines, redis_now_ms=float(raw[0]), taken_at=time.monotonic(), asked_at=asked_at
        )
        # Concurrent reads (heartbeat, lookups) may finish out of order: never go back to an older one.
        if view.asked_at >= self._view.asked_at:
            self._view = view
        return self._view

    async def _view_asked_after(self, moment: float) -> RegistryView:
        # Single flight: callers queue on the lock, and whoever finds a read asked after its own moment
        # already done uses it, so a burst of lookups for an unknown node costs one or two reads, not one
        # each.
        async with self._refresh_lock:
            if self._view.asked_at >= moment:
                return self._view
            return await self.refresh()

    async def live_subset(self, presence: Mapping[str, int]) -> dict[str, int]:
        """The entries of a user's presence hash whose node is alive now.

        A node is only declared dead on fresh data (see :meth:`RegistryView.needs_fresh_read`): a node
        that just started registers itself before accepting connections, so a read asked after this
        lookup began sees it. Otherwise its first users' messages would wait in the mailbox until their
        next message.
        """
        view = self._view
        if any(view.needs_fresh_read(n) for n in presence):
            view = await self._view_asked_after(time.monotonic())
        return {n: c for n, c in presence.items() if view.is_live(n)}

    async def beat(self, info: NodeInfo) -> Beat:
        """Refreshes the node's deadline, info and key TTLs: a constant number of commands."""
        with self._guard("node_beat"):
            k = self._keys
            node_id = info.node_id
            raw = await self._beat(keys=[k.node_registry()], args=[node_id, self._dead_after_ms])
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(
                    k.node_info(node_id),
                    mapping={
                        "connections": info.connections,
                        "stream_lag": info.stream_lag,
                        "draining": int(info.draining),
                    },
                )
                pipe.pexpire(k.node_info(node_id), self._key_ttl_ms)
                pipe.pexpire(k.node_stream(node_id), self._key_ttl_ms)
                pipe.pexpire(k.node_members(node_id), self._key_ttl_ms)
                await pipe.execute()
            dead = tuple(_text(n) for n in raw[2] if _text(n) != node_id)
            lapse = int(raw[0])
        return Beat(was_absent=lapse == 1, was_expired=lapse == 2, dead_nodes=dead)

    async def leave(self, node_id: str) -> None:
        """Removes the node from the registry at once (graceful stop)."""
        with self._guard("node_leave"):
            await self._redis.zrem(self._keys.node_registry(), node_id)

    async def forget_if_dead(self, node_id: str) -> bool:
        with self._guard("node_forget"):
            return bool(await self._forget(keys=[self._keys.node_registry()], args=[node_id]))

    async def claim_reap(self, node_id: str, ttl_s: float) -> bool:
        """A short lock so that one gateway, not all, reaps a given dead node."""
        with self._guard("node_reap_lock"):
            return bool(await self._redis.set(self._keys.node_reap_lock(node_id), b"1", nx=True, px=int(ttl_s * 1000)))

    async def infos(self, node_ids: Sequence[str]) -> list[NodeInfo]:
        with self._guard("node_infos"):
            if not node_ids:
                return []
            async with self._redis.pipeline(transaction=False) as pipe:
                for node_id in node_ids:
                    pipe.hgetall(self._keys.node_info(node_id))
                raws: list[dict[Any, Any]] = await pipe.execute()
            infos = []
            for node_id, raw in zip(node_ids, raws, strict=True):
                fields = {_text(k): _text(v) for k, v in raw.items()}
                infos.append(
                    NodeInfo(
                        node_id=node_id,
                        connections=int(fields.get("connections", 0)),
                        stream_lag=int(fields.get("stream_lag", 0)),
                        draining=fields.get("draining") == "1",
                    )
                )
            return infos
