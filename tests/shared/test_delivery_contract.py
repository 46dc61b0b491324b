"""One contract, every transport (broadcaster-style): the Sender over the memory, routed (node streams)
and broadcast (pub/sub) deliveries, with the real mailbox and node registry on the suite's Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from shared.delivery import BroadcastDelivery, Delivery, MemoryDelivery, NodeStreamDelivery
from shared.envelope import STREAM_FIELD, Envelope, StreamEntry
from shared.keys import Keys
from shared.mailbox import Mailbox
from shared.nodes import NodeInfo, NodeRegistry
from shared.presence import RedisPresenceDirectory
from shared.redis import RedisClient
from shared.routing import Message, Sender

pytestmark = pytest.mark.redis

NODES = ("n1", "n2")


class Inbox:
    """What each node received, whatever the transport."""

    def __init__(self) -> None:
        self.by_node: dict[str, list[StreamEntry]] = {n: [] for n in NODES}

    def recipients(self, node: str) -> set[str]:
        return {r.user_id for e in self.by_node[node] for r in e.recipients}


@pytest.fixture(params=["memory", "routed", "broadcast"])
async def transport(
    request: pytest.FixtureRequest, redis_client: RedisClient, keys: Keys
) -> AsyncIterator[tuple[Delivery, Inbox, Callable[[], Any]]]:
    inbox = Inbox()
    kind = request.param
    if kind == "memory":
        memory = MemoryDelivery()
        for node in NODES:
            memory.nodes[node] = inbox.by_node[node].append
        yield memory, inbox, lambda: asyncio.sleep(0)
        return
    if kind == "routed":
        for node in NODES:
            await redis_client.xgroup_create(keys.node_stream(node), "g", id="$", mkstream=True)

        async def collect_streams() -> None:
            for node in NODES:
                for _, fields in await redis_client.xrange(keys.node_stream(node)):
                    inbox.by_node[node].append(StreamEntry.unpack(fields[STREAM_FIELD]))

        yield NodeStreamDelivery(redis_client, keys, stream_maxlen=1000), inbox, collect_streams
        return
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(keys.broadcast_channel())
    await pubsub.get_message(timeout=1)  # the subscribe confirmation

    async def collect_pubsub() -> None:
        while (message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)) is not None:
            entry = StreamEntry.unpack(message["data"])
            for node in NODES:  # every node reads the one channel
                inbox.by_node[node].append(entry)

    yield BroadcastDelivery(redis_client, keys), inbox, collect_pubsub
    await pubsub.aclose()


async def test_every_live_receiver_is_reached_once_per_node(
    transport: tuple[Delivery, Inbox, Callable[[], Any]], redis_client: RedisClient, keys: Keys
) -> None:
    """Receivers on live nodes are pushed (routed/memory: exactly one entry per node, naming only that
    node's receivers); offline receivers and dead nodes get `stored`; every receiver gets a seq."""
    delivery, inbox, collect = transport
    presence = RedisPresenceDirectory(redis_client, keys)
    registry = NodeRegistry(redis_client, keys, dead_after_s=30, key_ttl_s=60)
    for node in NODES:
        await registry.beat(NodeInfo(node, 0, 0, False))
    await presence.register("u1", "n1")
    await presence.register("u2", "n1")
    await presence.register("u3", "n2")
    await presence.register("u5", "ghost-node")  # never beat: dead
    sender = Sender(Mailbox(redis_client, keys, max_len=100, ttl_s=60), registry, delivery, max_payload_bytes=65536)
    message = Message(Envelope.create(sender="s", channel="c", payload="x"), ("u1", "u2", "u3", "u4", "u5"))
    [results] = await sender.send([message])
    await collect()
    by_user = {r.to: r for r in results}
    assert {u: r.status for u, r in by_user.items()} == {
        "u1": "routed",
        "u2": "routed",
        "u3": "routed",
        "u4": "stored",
        "u5": "stored",
    }
    assert by_user["u1"].nodes == ("n1",)
    assert all(r.seq == 1 for r in results)
    assert inbox.recipients("n1") >= {"u1", "u2"}
    assert inbox.recipients("n2") >= {"u3"}
    if delivery.mode != "broadcast":
        assert [len(inbox.by_node[n]) for n in NODES] == [1, 1]
        assert inbox.recipients("n1") == {"u1", "u2"}
        assert inbox.recipients("n2") == {"u3"}


async def test_sender_serves_its_own_node_without_a_push(
    transport: tuple[Delivery, Inbox, Callable[[], Any]], redis_client: RedisClient, keys: Keys
) -> None:
    """A receiver on the sender's own node is handed over in-process: status `local`, no push to it."""
    delivery, inbox, collect = transport
    presence = RedisPresenceDirectory(redis_client, keys)
    registry = NodeRegistry(redis_client, keys, dead_after_s=30, key_ttl_s=60)
    await registry.beat(NodeInfo("n1", 0, 0, False))
    await presence.register("u1", "n1")
    handed: list[tuple[str, int]] = []
    sender = Sender(
        Mailbox(redis_client, keys, max_len=100, ttl_s=60),
        registry,
        delivery,
        max_payload_bytes=65536,
        local_node="n1",
        local_handoff=lambda env, packed, rs: handed.extend((r.user_id, r.seq) for r in rs),
    )
    [results] = await sender.send([Message(Envelope.create(sender="s", channel="c", payload=1), ("u1",))])
    await collect()
    assert results[0].status == "local"
    assert handed == [("u1", 1)]
    if delivery.mode != "broadcast":
        assert inbox.by_node["n1"] == []
