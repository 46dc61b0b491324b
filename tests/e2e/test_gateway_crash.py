"""A gateway killed with SIGKILL mid-stream loses nothing, and is seen as dead quickly.

The receiver's gateway dies while a router keeps sending; the client reconnects to another gateway
with ``since`` and ``epoch`` and ends up with every message exactly once, in order. Within two
heartbeat intervals (0.5 s each in tests) the dead node leaves presence and ``/v1/nodes``, and once it
is seen dead no send appends to its stream any more.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from shared.keys import Keys
from tests.support import Client, Cluster, Service, api_headers, api_send, assert_exactly_once_in_order

pytestmark = pytest.mark.redis

HEARTBEAT_S = 0.5  # Cluster.env sets BEELINE_HEARTBEAT_SECONDS=0.5
DEAD_WITHIN_S = 2 * HEARTBEAT_S + 1.0  # the contract's two intervals, plus a margin for a loaded machine
SEND_PACE_S = 0.005
MAX_SENDS = 2000  # hard bound on the background sender, whatever happens
SENDS_AFTER_DEAD = 60


async def get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url, headers=api_headers()) as r:
        body = await r.json()
        assert r.status == 200, body
        return dict(body)


async def stream_tail(rdb: aioredis.Redis, key: str) -> bytes | None:
    """Id of the last entry of a stream; None when the key does not exist (reaped) or is empty."""
    last: Any = await rdb.xrevrange(key, count=1)
    return bytes(last[0][0]) if last else None


async def entries_after(rdb: aioredis.Redis, key: str, tail: bytes | None) -> int:
    """How many entries the stream holds after ``tail`` (all of them when ``tail`` is None)."""
    if tail is None:
        return int(await rdb.xlen(key))
    entries: Any = await rdb.xrange(key, min=b"(" + tail, max="+")
    return len(entries)


class PacedSender:
    """Sends numbered messages to one user through the router, one at a time at a steady pace, until
    told to stop (bounded by MAX_SENDS). Counts sends started and completed."""

    def __init__(self, session: aiohttp.ClientSession, router: Service, user: str) -> None:
        self.session = session
        self.router = router
        self.user = user
        self.started = 0
        self.completed = 0
        self.stop_after: int | None = None
        self.results: list[dict[str, Any]] = []

    async def run(self) -> None:
        while self.started < MAX_SENDS and (self.stop_after is None or self.started < self.stop_after):
            self.started += 1
            body = await api_send(self.session, self.router, self.user, payload=self.started)
            self.results.append(body["results"][0])
            self.completed += 1
            await asyncio.sleep(SEND_PACE_S)


async def test_kill_9_of_receivers_gateway_loses_nothing_and_is_seen_dead(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """bob is on g1 while the router streams numbered messages to him; g1 is killed with SIGKILL midway.
    bob's client sees the socket close, reconnects to g2 with since=<last seq seen> and its epoch, and
    ends with every seq 1..N exactly once in order across both connections. Within two heartbeat
    intervals (plus margin) of the kill the router's presence no longer places bob on g1 and
    GET /v1/nodes no longer lists g1; from then on no send appends to g1's stream."""
    g1 = cluster.gateway("g1")
    g2 = cluster.gateway("g2")
    router = cluster.router()
    g1_stream = Keys(cluster.prefix).node_stream("g1")
    rdb = aioredis.Redis.from_url(cluster.redis_url)
    tasks: list[asyncio.Task[None]] = []
    try:
        first = await Client.connect(session, g1, "bob")
        sender = PacedSender(session, router, "bob")
        sending = asyncio.create_task(sender.run())
        tasks.append(sending)

        await first.wait_messages(100, timeout=20)
        g1.kill()
        killed_at = time.monotonic()

        async def seen_dead() -> None:
            deadline = killed_at + DEAD_WITHIN_S
            while True:
                bob = await get_json(session, f"{router.base_url}/v1/presence/bob")
                nodes = [n["node"] for n in (await get_json(session, f"{router.base_url}/v1/nodes"))["nodes"]]
                if "g1" not in bob["nodes"] and "g1" not in nodes:
                    assert "g2" in nodes, nodes
                    return
                assert time.monotonic() < deadline, f"g1 still alive {DEAD_WITHIN_S}s after kill: {bob}, {nodes}"
                await asyncio.sleep(0.02)

        dead_check = asyncio.create_task(seen_dead())
        tasks.append(dead_check)

        await first.wait_closed(timeout=5)
        seen = first.seqs()
        assert_exactly_once_in_order(seen, range(1, len(seen) + 1))
        second = await Client.connect(session, g2, "bob", since=seen[-1], epoch=first.epoch)
        assert second.epoch == first.epoch

        await dead_check
        # A send already in flight when g1 was seen dead may have looked it up earlier: let it finish,
        # then every later send starts after g1 is known dead and must not touch its stream.
        in_flight = sender.started
        deadline = time.monotonic() + 10
        while sender.completed < in_flight:
            assert not sending.done(), sending
            assert time.monotonic() < deadline, "the in-flight send did not complete"
            await asyncio.sleep(0.01)
        frozen = await stream_tail(rdb, g1_stream)
        sender.stop_after = sender.started + SENDS_AFTER_DEAD
        # Watch the stream while the remaining sends go out (the key may vanish meanwhile: a peer reaps
        # it, or its TTL ends), so an append is caught even if the key is deleted afterwards.
        deadline = time.monotonic() + 30
        while True:
            done = sending.done()
            appended = await entries_after(rdb, g1_stream, frozen)
            assert appended == 0, f"{appended} entries appended to dead g1's stream after it was seen dead"
            if done:
                break
            assert time.monotonic() < deadline, "the sender did not finish"
            await asyncio.sleep(0.01)
        await sending
        total = sender.completed
        assert total == sender.stop_after and total < MAX_SENDS
        assert all(r["nodes"] in ([], ["g2"]) for r in sender.results[in_flight:]), sender.results[in_flight:]
        assert [r["seq"] for r in sender.results] == list(range(1, total + 1))

        await second.wait_for(lambda c: bool(c.seqs()) and c.seqs()[-1] >= total, timeout=20, what=f"seq {total}")
        assert_exactly_once_in_order(first.seqs() + second.seqs(), range(1, total + 1))
        assert [m["payload"] for m in first.messages() + second.messages()] == list(range(1, total + 1))
        await second.close()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await rdb.aclose()
