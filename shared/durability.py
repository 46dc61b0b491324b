"""Opt-in durable writes: an append counts as accepted only once ``replicas`` replicas have it.

Redis replicates asynchronously, so a primary that fails right after acknowledging an append can lose it
in a failover. With ``BEELINE_DURABLE_REPLICAS=n`` every mailbox append is followed by ``WAIT n timeout``
on the *same connection* (WAIT counts that connection's writes), and fewer acknowledgements than asked
make the send fail with :class:`NotReplicated` (HTTP 503, retryable). The price is one replication round
trip per send.

Standalone: the scripts and the WAIT share one pipeline. Redis Cluster: redis-py cannot pin a
connection of its cluster client, so the calls are grouped by the primary that owns each slot and sent
through a standalone client to that primary (same pipeline + WAIT); a MOVED reply (a failover or
resharding moved the slot) refreshes the slot map and fails the send as retryable.

What a retry after :class:`NotReplicated` means: the append may still have landed (on a primary that
survives, or replicated after the timeout), so the retry can deliver the message a second time under a
new seq: at-least-once. A send that got 202 is never lost to a failover of one primary.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis import exceptions as redis_exceptions
from redis.asyncio import Redis

from shared.config import CommonConfig
from shared.errors import StoreUnavailable
from shared.redis import RedisClient, create_standalone, is_cluster

ScriptCall = Callable[[Any], Awaitable[Any]]
"""One script invocation, given the client (or pipeline) to run on."""


class NotReplicated(StoreUnavailable):
    """Fewer replicas than required acknowledged the write within the timeout."""


class DurableWriter:
    """Runs script calls so that each is acknowledged by ``replicas`` replicas before it returns."""

    def __init__(self, redis: RedisClient, cfg: CommonConfig, *, replicas: int, timeout_ms: int) -> None:
        self._redis = redis
        self._cfg = cfg
        self._replicas = replicas
        self._timeout_ms = timeout_ms
        self._primaries: dict[tuple[str, int], Redis] = {}

    async def run(self, calls: Sequence[tuple[str, ScriptCall]]) -> list[Any]:
        """``calls`` are (routing key, call); results come back in the same order."""
        if not is_cluster(self._redis):
            return await self._run_on(self._redis, [call for _, call in calls])
        await self._redis.initialize()  # loads the slot map on first use; a no-op afterwards
        groups: dict[tuple[str, int], list[int]] = {}
        for index, (key, _) in enumerate(calls):
            node = self._redis.get_node_from_key(key)  # type: ignore[union-attr]
            if node is None:
                raise StoreUnavailable(f"no primary owns the slot of {key!r}")
            groups.setdefault((node.host, int(node.port)), []).append(index)
        results: list[Any] = [None] * len(calls)
        for address, indexes in groups.items():
            client = self._primary(address)
            try:
                raws = await self._run_on(client, [calls[i][1] for i in indexes])
            except (redis_exceptions.MovedError, redis_exceptions.AskError, redis_exceptions.ReadOnlyError) as e:
                await self._redis.nodes_manager.initialize()  # type: ignore[union-attr]  # re-reads the slot map
                raise StoreUnavailable(f"slot moved during a durable write: {type(e).__name__}") from e
            for i, raw in zip(indexes, raws, strict=True):
                results[i] = raw
        return results

    async def _run_on(self, client: Any, calls: Sequence[ScriptCall]) -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            for call in calls:
                await call(pipe)
            pipe.execute_command("WAIT", self._replicas, self._timeout_ms)
            raws = await pipe.execute()
        acked = int(raws[-1])
        if acked < self._replicas:
            raise NotReplicated(f"write acknowledged by {acked} of {self._replicas} replicas")
        return list(raws[:-1])

    def _primary(self, address: tuple[str, int]) -> Redis:
        client = self._primaries.get(address)
        if client is None:
            client = self._primaries[address] = create_standalone(self._cfg, host=address[0], port=address[1])
        return client

    async def aclose(self) -> None:
        for client in self._primaries.values():
            await client.aclose()
        self._primaries.clear()
