"""The presence directory: user -> nodes holding the user's connections, with connection counts.

Layout: a hash per user (``node_id -> count``, the user's slot) and a member set per node (the user
ids it holds, the node's slot) so that a dead node's entries can be removed without a scan. Entries
have no TTL of their own: liveness comes from the node registry (:mod:`shared.nodes`), which is what
keeps heartbeat cost independent of the connection count. A lookup returns the raw hash; callers
filter it through ``NodeRegistry.live_subset`` so a dead node is never routed to even before it is
reaped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shared.keys import Keys
from shared.redis import OpGuard, RedisClient, lua_source, untimed

REAP_BATCH = 500


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class UserPresence:
    """What the router reports for a user: online if any live node holds a connection."""

    user_id: str
    connections: int
    nodes: tuple[str, ...]

    @property
    def online(self) -> bool:
        return self.connections > 0

    def as_json(self) -> dict[str, Any]:
        return {"user": self.user_id, "online": self.online, "connections": self.connections, "nodes": list(self.nodes)}


class PresenceDirectory(Protocol):
    """Registers connections per node and answers where a user is."""

    async def register(self, user_id: str, node_id: str) -> None: ...

    async def unregister(self, user_id: str, node_id: str) -> None: ...

    async def lookup_many(self, user_ids: Sequence[str]) -> list[dict[str, int]]: ...


class RedisPresenceDirectory:
    """:class:`PresenceDirectory` on Redis hashes plus a per-node member set for reaping."""

    def __init__(self, redis: RedisClient, keys: Keys, *, guard: OpGuard = untimed) -> None:
        self._redis = redis
        self._guard = guard
        self._keys = keys
        self._remove = redis.register_script(lua_source("presence_remove"))

    async def register(self, user_id: str, node_id: str) -> None:
        with self._guard("presence_register"):
            k = self._keys
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(k.user_presence(user_id), node_id, 1)
                pipe.sadd(k.node_members(node_id), user_id)
                await pipe.execute()

    async def unregister(self, user_id: str, node_id: str) -> None:
        """Removes one connection. The member set keeps the user id: an extra id costs the reaper one
        no-op HDEL, while a missing one would leave a stale entry, and SREM would race a reconnect."""
        with self._guard("presence_unregister"):
            await self._remove(keys=[self._keys.user_presence(user_id)], args=[node_id])

    async def lookup_many(self, user_ids: Sequence[str]) -> list[dict[str, int]]:
        with self._guard("presence_lookup"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for user_id in user_ids:
                    pipe.hgetall(self._keys.user_presence(user_id))
                raws: list[dict[Any, Any]] = await pipe.execute()
            return [{_text(n): int(c) for n, c in raw.items()} for raw in raws]

    async def restore(self, node_id: str, counts: Mapping[str, int]) -> None:
        """Re-registers every connection a node holds (after Redis lost them or the node was reaped)."""
        with self._guard("presence_restore"):
            k = self._keys
            items = list(counts.items())
            for start in range(0, len(items), REAP_BATCH):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for user_id, count in items[start : start + REAP_BATCH]:
                        pipe.hset(k.user_presence(user_id), node_id, count)
                        pipe.sadd(k.node_members(node_id), user_id)
                    await pipe.execute()

    async def reap(self, node_id: str, *, keep_stream: bool = False) -> int:
        """Removes every presence entry of a dead, restarting or draining node and its node keys; returns
        how many users were touched. A draining node keeps its stream until its reader has stopped."""
        with self._guard("presence_reap"):
            k = self._keys
            members = k.node_members(node_id)
            touched = 0
            cursor = 0
            while True:
                cursor, batch = await self._redis.sscan(members, cursor=cursor, count=REAP_BATCH)
                if batch:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for user_id in batch:
                            pipe.hdel(k.user_presence(_text(user_id)), node_id)
                        await pipe.execute()
                    touched += len(batch)
                if cursor == 0:
                    break
            doomed = [members, k.node_info(node_id)] + ([] if keep_stream else [k.node_stream(node_id)])
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in doomed:
                    pipe.delete(key)
                await pipe.execute()
            return touched
