"""One contract, every transport (broadcaster-style): the Sender over the memory, routed (node streams,
pushed after the append or by the append itself) and broadcast (pub/sub) deliveries, with the real
mailbox and node registry on the suite's Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from shared.autopipeline import AutoPipeline
from shared.delivery import BroadcastDelivery, Delivery, MemoryDelivery, NodeStreamDelivery
from shared.envelope import STREAM_FIELD, Envelope, Recipient, StreamEntry
from shared.keys import Keys
from shared.mailbox import Mailbox
from shared.nodes import NodeInfo, NodeRegistry
from shared.presence import RedisPresenceDirectory
from shared.redis import RedisClient
from shared.routing import Message, Sender
from tests.support import RedisServer

pytestmark = pytest.mark.redis

NODES = ("n1", "n2")


class Inbox:
    """What each node received, whatever the transport."""

    def __init__(self) -> None:
        self.by_node: dict[str, list[StreamEntry]] = {n: [] for n in NODES}

    def recipients(self, node: str) -> set[str]:
        return {r.user_id for e in self.by_node[node] for r in e.recipients}


@dataclass
class Transport:
    """A delivery, what each node received through it (``collect`` gathers it), and the mailbox."""

    delivery: Delivery
    inbox: Inbox
    collect: Callable[[], Any]
    mailbox: Mailbox
    push_in_append: bool = False


@pytest.fixture
async def fast(redis_server: RedisServer) -> AsyncIterator[AutoPipeline]:
    """The coalescing hot-path connection to the suite's Redis (what makes a mailbox able to push)."""
    pipeline = AutoPipeline(redis_server.url, timeout_s=5.0, connect_timeout_s=1.0)
    yield pipeline
    await pipeline.aclose()


def pushing_mailbox(redis_client: RedisClient, keys: Keys, fast: AutoPipeline) -> Mailbox:
    mailbox = Mailbox(redis_client, keys, max_len=100, ttl_s=60, fast=fast, stream_maxlen=1000)
    assert mailbox.can_push
    return mailbox


@pytest.fixture(params=["memory", "routed", "routed-in-append", "broadcast"])
async def transport(
    request: pytest.FixtureRequest, redis_client: RedisClient, keys: Keys, fast: AutoPipeline
) -> AsyncIterator[Transport]:
    # ``fast`` connects on its first command: only the routed-in-append case uses it.
    inbox = Inbox()
    kind = request.param
    mailbox = Mailbox(redis_client, keys, max_len=100, ttl_s=60)
    if kind == "memory":
        memory = MemoryDelivery()
        for node in NODES:
            memory.nodes[node] = inbox.by_node[node].append
        yield Transport(memory, inbox, lambda: asyncio.sleep(0), mailbox)
        return
    if kind.startswith("routed"):
        for node in NODES:
            await redis_client.xgroup_create(keys.node_stream(node), "g", id="$", mkstream=True)

        async def collect_streams() -> None:
            for node in NODES:
                for _, fields in await redis_client.xrange(keys.node_stream(node)):
                    inbox.by_node[node].append(StreamEntry.unpack(fields[STREAM_FIELD]))

        in_append = kind == "routed-in-append"
        if in_append:
            mailbox = pushing_mailbox(redis_client, keys, fast)
        delivery = NodeStreamDelivery(redis_client, keys, stream_maxlen=1000, fast=fast if in_append else None)
        yield Transport(delivery, inbox, collect_streams, mailbox, push_in_append=in_append)
        return
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(keys.broadcast_channel())
    await pubsub.get_message(timeout=1)  # the subscribe confirmation

    async def collect_pubsub() -> None:
        while (message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)) is not None:
            entry = StreamEntry.unpack(message["data"])
            for node in NODES:  # every node reads the one channel
                inbox.by_node[node].append(entry)

    yield Transport(BroadcastDelivery(redis_client, keys), inbox, collect_pubsub, mailbox)
    await pubsub.aclose()


async def test_every_live_receiver_is_reached_once_per_node(
    transport: Transport, redis_client: RedisClient, keys: Keys
) -> None:
    """Receivers on live nodes are pushed (routed/memory: exactly one entry per node, naming only that
    node's receivers); offline receivers and dead nodes get `stored`; every receiver gets a seq."""
    if transport.push_in_append:
        pytest.skip("a many-receiver message is pushed after its appends: the `routed` case covers it")
    delivery, inbox, collect = transport.delivery, transport.inbox, transport.collect
    presence = RedisPresenceDirectory(redis_client, keys)
    registry = NodeRegistry(redis_client, keys, dead_after_s=30, key_ttl_s=60)
    for node in NODES:
        await registry.beat(NodeInfo(node, 0, 0, False))
    await presence.register("u1", "n1")
    await presence.register("u2", "n1")
    await presence.register("u3", "n2")
    await presence.register("u5", "ghost-node")  # never beat: dead
    sender = Sender(
        transport.mailbox, registry, delivery, max_payload_bytes=65536, push_in_append=transport.push_in_append
    )
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
    transport: Transport, redis_client: RedisClient, keys: Keys
) -> None:
    """A receiver on the sender's own node is handed over in-process: status `local`, no push to it."""
    delivery, inbox, collect = transport.delivery, transport.inbox, transport.collect
    presence = RedisPresenceDirectory(redis_client, keys)
    registry = NodeRegistry(redis_client, keys, dead_after_s=30, key_ttl_s=60)
    await registry.beat(NodeInfo("n1", 0, 0, False))
    await presence.register("u1", "n1")
    handed: list[tuple[str, int]] = []
    sender = Sender(
        transport.mailbox,
        registry,
        delivery,
        max_payload_bytes=65536,
        push_in_append=transport.push_in_append,
        local_node="n1",
        local_handoff=lambda env, packed, rs: handed.extend((r.user_id, r.seq) for r in rs),
    )
    [results] = await sender.send([Message(Envelope.create(sender="s", channel="c", payload=1), ("u1",))])
    await collect()
    assert results[0].status == "local"
    assert handed == [("u1", 1)]
    if delivery.mode != "broadcast":
        assert inbox.by_node["n1"] == []


class RecordingDelivery(NodeStreamDelivery):
    """The routed transport, recording which nodes still needed a push after the append."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.targets: list[str] = []

    async def push(self, outgoing: Any) -> list[set[str]]:
        self.targets.extend(n for out in outgoing for n in out.targets)
        return await super().push(outgoing)


@pytest.mark.parametrize("payload_chars", [10, 300, 70_000])  # msgpack bin8, bin16 and bin32 envelopes
async def test_a_one_receiver_send_is_pushed_by_its_append(
    payload_chars: int, redis_client: RedisClient, keys: Keys, fast: AutoPipeline
) -> None:
    """On one standalone Redis the append of a lone one-receiver message pushes to the receiver's live
    nodes itself, judged on Redis's clock (a node registered after the sender's last registry read is
    live, one past its deadline is not): the stream entry is byte for byte what StreamEntry.pack makes;
    a live node whose stream is gone reports `stored`; the sender's own node is handed over in-process,
    not pushed; a batch is pushed after its appends."""
    nodes = ("n1", "n2", "late", "gone", "dead")
    for node in nodes:
        await redis_client.xgroup_create(keys.node_stream(node), "g", id="$", mkstream=True)
    registry = NodeRegistry(redis_client, keys, dead_after_s=30, key_ttl_s=60)
    for node in ("n1", "n2", "gone"):
        await registry.beat(NodeInfo(node, 0, 0, False))
    await registry.refresh()
    await registry.beat(NodeInfo("late", 0, 0, False))  # registered after the sender's view was read
    await redis_client.zadd(keys.node_registry(), {"dead": 1})  # its deadline passed long ago
    await redis_client.delete(keys.node_stream("gone"))
    presence = RedisPresenceDirectory(redis_client, keys)
    for user, node in (("u1", "n1"), ("u2", "n2"), ("u2", "n1"), ("u3", "late"), ("u4", "gone"), ("u6", "dead")):
        await presence.register(user, node)
    handed: list[tuple[str, int]] = []
    mailbox = pushing_mailbox(redis_client, keys, fast)
    delivery = RecordingDelivery(redis_client, keys, stream_maxlen=1000, fast=fast)
    sender = Sender(mailbox, registry, delivery, max_payload_bytes=1 << 20, push_in_append=True)
    messages = [
        Message(Envelope.create(sender="s", channel="c", payload="x" * payload_chars), (user,))
        for user in ("u1", "u2", "u3", "u4", "u5", "u6", "u1")
    ]
    results = []
    for message in messages:
        [per_message] = await sender.send([message])
        results.extend(per_message)
    # A batch keeps its pushes in one burst after the appends.
    await sender.send([Message(Envelope.create(sender="s", channel="c", payload=0), ("u1",))] * 2)
    on_n1 = Sender(
        mailbox,
        registry,
        delivery,
        max_payload_bytes=1 << 20,
        push_in_append=True,
        local_node="n1",
        local_handoff=lambda _env, _packed, rs: handed.extend((r.user_id, r.seq) for r in rs),
    )
    [[from_n1]] = await on_n1.send([Message(Envelope.create(sender="s", channel="c", payload=1), ("u2",))])
    assert [(r.to, r.seq, r.status, r.nodes) for r in results] == [
        ("u1", 1, "routed", ("n1",)),
        ("u2", 1, "routed", ("n1", "n2")),
        ("u3", 1, "routed", ("late",)),
        ("u4", 1, "stored", ()),
        ("u5", 1, "stored", ()),
        ("u6", 1, "stored", ()),
        ("u1", 2, "routed", ("n1",)),
    ]
    assert (from_n1.status, from_n1.nodes, handed) == ("routed", ("n1", "n2"), [("u2", 2)])
    assert delivery.targets == ["n1", "n1"]  # only the batch was pushed after its appends
    streams = {n: await redis_client.xrange(keys.node_stream(n)) for n in ("n1", "n2", "late", "dead")}
    expected = {
        "n1": [(messages[0], results[0]), (messages[1], results[1]), (messages[6], results[6])],  # then the batch
        "n2": [(messages[1], results[1])],
        "late": [(messages[2], results[2])],
        "dead": [],
    }
    for node, entries in streams.items():
        assert [bytes(fields[STREAM_FIELD]) for _, fields in entries][: len(expected[node]) or None] == [
            StreamEntry(m.envelope.pack(), (Recipient(r.to, r.seq, r.epoch),)).pack() for m, r in expected[node]
        ]
    assert len(streams["n1"]) == 5 and len(streams["n2"]) == 2  # n1: 3 + the batch's 2; n2: u2's two sends


async def test_separate_sends_in_one_pass_each_get_their_own_outcome(
    redis_client: RedisClient, keys: Keys, fast: AutoPipeline
) -> None:
    """Independent sends gathered into one pass (the router's front) are each appended and pushed as
    alone: an error reply for one message's append (a key of the wrong type here; Redis out of memory
    is the same kind) fails that message only, and the others are stored once, pushed, and answered.
    A multi-receiver message with one failing receiver fails as it would alone."""
    await redis_client.xgroup_create(keys.node_stream("n1"), "g", id="$", mkstream=True)
    registry = NodeRegistry(redis_client, keys, dead_after_s=30, key_ttl_s=60)
    await registry.beat(NodeInfo("n1", 0, 0, False))
    await RedisPresenceDirectory(redis_client, keys).register("alice", "n1")
    await redis_client.set(keys.user_meta("mallory"), "not a hash")  # every append for mallory: WRONGTYPE
    delivery = RecordingDelivery(redis_client, keys, stream_maxlen=1000, fast=fast)
    sender = Sender(
        pushing_mailbox(redis_client, keys, fast), registry, delivery, max_payload_bytes=1 << 20, push_in_append=True
    )
    assert sender.isolates_sends
    messages = [
        Message(Envelope.create(sender="s", channel="c", payload=i), to)
        for i, to in enumerate([("alice",), ("mallory",), ("bob",), ("bob", "mallory"), ("alice",)])
    ]
    outcomes = await sender.send_separately(messages, [sender.pack(m.envelope) for m in messages])
    ok = [o for o in outcomes if not isinstance(o, Exception)]
    assert [type(o).__name__ for o in outcomes if isinstance(o, Exception)] == ["ResponseError"] * 2
    assert isinstance(outcomes[1], Exception) and isinstance(outcomes[3], Exception)
    assert [[(r.to, r.seq, r.status) for r in o] for o in ok] == [
        [("alice", 1, "routed")],
        [("bob", 1, "stored")],
        [("alice", 2, "routed")],
    ]
    stored = await redis_client.xrange(keys.mailbox("alice"))
    assert len(stored) == 2
    entries = await redis_client.xrange(keys.node_stream("n1"))
    assert len(entries) == 2, "each of alice's messages pushed once"
    assert delivery.targets == [], "by its own append: nothing was pushed after the appends"
