"""The node-stream reader against a real redis-server: a failure delivering one entry is logged and
neither stops the read nor loses the entries after it."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from gateway.stream_reader import NodeStreamReader
from shared.autopipeline import AutoPipeline
from shared.envelope import STREAM_FIELD, StreamEntry
from shared.keys import Keys
from shared.metrics import Metrics
from tests.support import RedisServer, eventually

pytestmark = pytest.mark.redis

NODE = "n1"


class FailingHub:
    """Records the users of the disconnect entries it is given, and fails on the user ``boom``."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def deliver_entry(self, entry: StreamEntry, _path: str) -> None:
        assert entry.disconnect_user is not None
        if entry.disconnect_user == "boom":
            raise RuntimeError("a bug in delivering this entry")
        self.seen.append(entry.disconnect_user)


async def test_a_failure_on_one_entry_neither_stops_the_read_nor_loses_later_entries(own_redis: RedisServer) -> None:
    redis = Redis.from_url(own_redis.url)
    connection = AutoPipeline(own_redis.url, timeout_s=3.0, connect_timeout_s=1.0)
    keys = Keys("test")
    hub = FailingHub()

    async def stream_lost() -> None:
        raise AssertionError("the stream is never lost here")

    reader = NodeStreamReader(
        redis=redis,
        blocking_redis=redis,
        stream_connection=connection,
        keys=keys,
        node_id=NODE,
        hub=hub,  # type: ignore[arg-type]
        metrics=Metrics(CollectorRegistry(), service="gateway", node=NODE),
        batch=100,
        block_ms=1000,
        on_stream_lost=stream_lost,
    )
    await reader.prepare()
    reading = asyncio.ensure_future(reader.run())

    async def add(*users: str) -> None:
        async with redis.pipeline(transaction=False) as pipe:  # one write: the reader may get them as one batch
            for user in users:
                pipe.xadd(keys.node_stream(NODE), {STREAM_FIELD: StreamEntry(None, disconnect_user=user).pack()})
            await pipe.execute()

    try:
        await add("a", "boom", "b")
        await eventually(lambda: len(hub.seen) >= 2, timeout=5, what="the entries around the failing one")
        await add("c")
        await eventually(lambda: len(hub.seen) >= 3, timeout=5, what="an entry after the failure")
        assert hub.seen == ["a", "b", "c"]
        assert not reading.done()
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await connection.aclose()
        await redis.aclose()
