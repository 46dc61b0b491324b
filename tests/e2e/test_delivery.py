"""End-to-end delivery: real Redis, real gateway and router processes, real WebSocket clients.

Each test pins one promise of the delivery model in SPEC.md (seq order, exactly once, unread on
connect, resume with ``since``, multi-device, one stream append per node, channel filters, racing
senders), in both routing modes where the promise is the same for both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from shared.envelope import STREAM_FIELD, Envelope, StreamEntry
from shared.keys import Keys
from tests.support import Client, Cluster, Service, api_headers, api_send, assert_exactly_once_in_order, eventually

pytestmark = pytest.mark.redis

MODES = ("routed", "broadcast")


# -- helpers (local to this module) -------------------------------------------------------------------


@pytest.fixture
def cluster(any_cluster: Cluster) -> Cluster:
    """Every delivery test runs against a standalone Redis and against a real 3-master Redis Cluster."""
    return any_cluster


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, cluster: Cluster) -> str:
    """The routing mode every service of this test's cluster runs in."""
    cluster.base_env["BEELINE_ROUTING"] = request.param
    return str(request.param)


@pytest.fixture
async def rdb(cluster: Cluster) -> AsyncIterator[aioredis.Redis]:
    """A redis-py client on the test Redis, to look at what the services stored."""
    seeds = cluster.base_env.get("BEELINE_REDIS_CLUSTER")
    if seeds:
        host, port = seeds.split(",")[0].split(":")
        client: Any = aioredis.RedisCluster(host=host, port=int(port))
    else:
        client = aioredis.Redis.from_url(cluster.redis_url)
    yield client
    await client.aclose()


async def presence(session: aiohttp.ClientSession, router: Service, user: str) -> dict[str, Any]:
    async with session.get(f"{router.base_url}/v1/presence/{user}", headers=api_headers()) as r:
        body = await r.json()
        assert r.status == 200, body
        return dict(body)


async def acked(rdb: aioredis.Redis, keys: Keys, user: str) -> int:
    raw = await rdb.hget(keys.user_meta(user), "acked")
    return int(raw or 0)


async def wait_acked(rdb: aioredis.Redis, keys: Keys, user: str, seq: int) -> None:
    """Acks have no reply: wait until the read cursor in Redis has reached ``seq``."""

    async def reached() -> bool:
        return await acked(rdb, keys, user) >= seq

    await eventually(reached, timeout=5, what=f"{user} acked >= {seq}")


async def wait_offline(session: aiohttp.ClientSession, router: Service, user: str) -> None:
    """A closed socket is unregistered asynchronously by the gateway: wait for presence to say so."""

    async def offline() -> bool:
        return not (await presence(session, router, user))["online"]

    await eventually(offline, timeout=5, what=f"{user} offline")


async def barrier(client: Client) -> None:
    """The gateway handles one connection's frames in order: once a later ``send`` is answered, every
    earlier frame of that connection (ack, subscribe, ...) has been handled."""
    reply = await client.send_and_wait({"type": "send", "to": "barrier-sink", "channel": "barrier", "payload": None})
    assert reply["type"] == "sent", reply


async def ws_send(client: Client, to: str | list[str], payload: Any, channel: str = "chat") -> dict[str, Any]:
    reply = await client.send_and_wait({"type": "send", "to": to, "channel": channel, "payload": payload})
    assert reply["type"] == "sent", reply
    return reply


async def stream_tail(rdb: aioredis.Redis, key: str) -> bytes:
    """Id of the last entry of a stream, or ``0-0`` when it is empty."""
    last: Any = await rdb.xrevrange(key, count=1)
    return bytes(last[0][0]) if last else b"0-0"


async def stream_after(rdb: aioredis.Redis, key: str, after: bytes) -> list[StreamEntry]:
    entries: Any = await rdb.xrange(key, min=b"(" + after, max="+")
    return [StreamEntry.unpack(fields[STREAM_FIELD]) for _id, fields in entries]


# -- 1. cross-node ---------------------------------------------------------------------------------------


async def test_cross_node_send_is_routed_to_the_receivers_node(
    mode: str, cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """A `send` frame from alice on g1 to bob on g2 reaches bob once, stamped `from: alice`; the `sent`
    reply says `routed` via ["g2"] with seq 1 in bob's epoch."""
    g1 = cluster.gateway("g1")
    g2 = cluster.gateway("g2")
    alice = await Client.connect(session, g1, "alice")
    bob = await Client.connect(session, g2, "bob")

    reply = await ws_send(alice, "bob", {"text": "hi bob"})
    [result] = reply["results"]
    assert result["to"] == "bob"
    assert result["status"] == "routed"
    assert result["nodes"] == ["g2"]
    assert result["seq"] == 1

    [msg] = await bob.wait_messages(1)
    assert msg["seq"] == 1
    assert msg["epoch"] == bob.epoch
    assert msg["from"] == "alice"
    assert msg["channel"] == "chat"
    assert msg["payload"] == {"text": "hi bob"}
    # A second message proves nothing extra (no duplicate of seq 1) came first.
    await ws_send(alice, "bob", "again")
    await bob.wait_messages(2)
    assert bob.seqs() == [1, 2]
    assert alice.messages() == []
    await alice.close()
    await bob.close()


# -- 2. local ------------------------------------------------------------------------------------------------


async def test_same_node_send_is_local_and_skips_the_stream(
    mode: str, cluster: Cluster, session: aiohttp.ClientSession, rdb: aioredis.Redis
) -> None:
    """alice and bob on the same gateway: the `sent` status is `local`, bob gets the message exactly
    once, and (routed mode) nothing is appended to the node's own stream for it."""
    g1 = cluster.gateway("g1")
    stream = Keys(cluster.prefix).node_stream("g1")
    alice = await Client.connect(session, g1, "alice")
    bob = await Client.connect(session, g1, "bob")
    tail = await stream_tail(rdb, stream)

    for i in range(3):
        reply = await ws_send(alice, "bob", {"n": i})
        [result] = reply["results"]
        assert result["status"] == "local"
        assert result["seq"] == i + 1

    messages = await bob.wait_messages(3)
    assert_exactly_once_in_order(bob.seqs(), range(1, 4))
    assert [m["payload"] for m in messages] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert all(m["from"] == "alice" for m in messages)
    if mode == "routed":
        assert await stream_after(rdb, stream, tail) == []
    await alice.close()
    await bob.close()


# -- 3. offline, then connect ----------------------------------------------------------------------------


async def test_offline_messages_are_stored_and_delivered_on_connect_until_acked(
    mode: str, cluster: Cluster, session: aiohttp.ClientSession, rdb: aioredis.Redis
) -> None:
    """Sends to an offline user answer `stored` with no nodes; on connect the user gets seq 1, 2, 3 in
    order (unread). After acking 3, a new connection without `since` gets nothing old: the next live
    message (seq 4) is the first and only message it sees."""
    g1 = cluster.gateway("g1")
    router = cluster.router()
    keys = Keys(cluster.prefix)

    for i in range(3):
        result = (await api_send(session, router, "bob", payload={"n": i}))["results"][0]
        assert result["status"] == "stored"
        assert result["nodes"] == []
        assert result["seq"] == i + 1

    bob = await Client.connect(session, g1, "bob")
    messages = await bob.wait_messages(3)
    assert_exactly_once_in_order(bob.seqs(), range(1, 4))
    assert [m["payload"] for m in messages] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert all(m["epoch"] == bob.epoch for m in messages)

    await bob.ack(3)
    await wait_acked(rdb, keys, "bob", 3)
    await bob.close()
    await wait_offline(session, router, "bob")

    again = await Client.connect(session, g1, "bob")
    assert again.epoch == bob.epoch
    result = (await api_send(session, router, "bob", payload={"n": 3}))["results"][0]
    assert result["seq"] == 4
    assert result["status"] == "routed"
    await again.wait_messages(1)
    assert again.seqs() == [4]
    await again.close()


# -- 4. resume with since ------------------------------------------------------------------------------


async def test_resume_with_since_and_foreign_epoch(
    mode: str, cluster: Cluster, session: aiohttp.ClientSession, rdb: aioredis.Redis
) -> None:
    """`since=3&epoch=<its epoch>` delivers 4..10 exactly once in order (5 of them stored while away);
    a `since` from a foreign epoch is ignored and the unread messages (after the acked 2) come
    instead."""
    g1 = cluster.gateway("g1")
    g2 = cluster.gateway("g2")
    router = cluster.router()
    keys = Keys(cluster.prefix)

    bob = await Client.connect(session, g1, "bob")
    for i in range(1, 6):
        await api_send(session, router, "bob", payload=i)
    await bob.wait_messages(5)
    assert_exactly_once_in_order(bob.seqs(), range(1, 6))
    await bob.ack(2)
    await wait_acked(rdb, keys, "bob", 2)
    epoch = bob.epoch
    await bob.close()
    await wait_offline(session, router, "bob")

    for i in range(6, 11):
        result = (await api_send(session, router, "bob", payload=i))["results"][0]
        assert result["status"] == "stored"
        assert result["seq"] == i

    resumed = await Client.connect(session, g2, "bob", since=3, epoch=epoch)
    assert resumed.epoch == epoch
    messages = await resumed.wait_messages(7)
    assert_exactly_once_in_order(resumed.seqs(), range(4, 11))
    assert [m["payload"] for m in messages] == list(range(4, 11))
    await resumed.close()
    await wait_offline(session, router, "bob")

    foreign = await Client.connect(session, g1, "bob", since=8, epoch="1")
    assert foreign.epoch == epoch
    await foreign.wait_messages(8)
    assert_exactly_once_in_order(foreign.seqs(), range(3, 11))
    await foreign.close()


# -- 5. multi-device -------------------------------------------------------------------------------------


async def test_multi_device_every_connection_gets_every_message_once(
    mode: str, cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """bob holds two connections on g1 and one on g2: presence reports 3 connections on ["g1", "g2"];
    sends (from the router and from alice on g1) answer `routed` via both nodes; each of bob's
    connections gets every message exactly once, in order."""
    g1 = cluster.gateway("g1")
    g2 = cluster.gateway("g2")
    router = cluster.router()
    devices = [
        await Client.connect(session, g1, "bob"),
        await Client.connect(session, g1, "bob"),
        await Client.connect(session, g2, "bob"),
    ]
    alice = await Client.connect(session, g1, "alice")

    p = await presence(session, router, "bob")
    assert p == {"user": "bob", "online": True, "connections": 3, "nodes": ["g1", "g2"]}

    for i in range(1, 7):
        if i % 2:
            result = (await api_send(session, router, "bob", payload=i))["results"][0]
        else:
            result = (await ws_send(alice, "bob", i))["results"][0]
        assert result["status"] == "routed", result
        assert result["nodes"] == ["g1", "g2"], result
        assert result["seq"] == i

    for device in devices:
        messages = await device.wait_messages(6)
        assert_exactly_once_in_order(device.seqs(), range(1, 7))
        assert [m["payload"] for m in messages] == list(range(1, 7))
        assert [m["from"] for m in messages] == ["system", "alice"] * 3
    for client in (*devices, alice):
        await client.close()


# -- 6. many receivers, grouped per node -----------------------------------------------------------------


async def test_many_receivers_one_stream_append_per_node(
    mode: str, cluster: Cluster, session: aiohttp.ClientSession, rdb: aioredis.Redis
) -> None:
    """One POST /v1/messages to 10 online users (5 on g1, 5 on g2) and 2 offline ones: every online user
    gets it once; results come per user in request order (`routed` via its node, `stored` with no node
    for the offline ones). In routed mode each node's stream gets exactly one new entry for the send,
    carrying exactly that node's recipients with their seq and epoch."""
    g1 = cluster.gateway("g1")
    g2 = cluster.gateway("g2")
    router = cluster.router()
    keys = Keys(cluster.prefix)
    placement = {f"u{i}": ("g1" if i < 5 else "g2") for i in range(10)}
    offline = ["off0", "off1"]
    clients = {u: await Client.connect(session, g1 if node == "g1" else g2, u) for u, node in placement.items()}
    tails = {n: await stream_tail(rdb, keys.node_stream(n)) for n in ("g1", "g2")}

    to = [*placement, *offline]
    body = await api_send(session, router, to, payload={"all": True}, channel="news")
    results = body["results"]
    assert [r["to"] for r in results] == to
    by_user = {r["to"]: r for r in results}
    for user, node in placement.items():
        assert by_user[user]["status"] == "routed", by_user[user]
        assert by_user[user]["nodes"] == [node]
        assert by_user[user]["seq"] == 1
        assert by_user[user]["epoch"] == clients[user].epoch
    for user in offline:
        assert by_user[user]["status"] == "stored"
        assert by_user[user]["nodes"] == []
        assert by_user[user]["seq"] == 1

    for client in clients.values():
        [msg] = await client.wait_messages(1)
        assert msg["seq"] == 1
        assert msg["payload"] == {"all": True}
        assert msg["channel"] == "news"
        assert msg["id"] == body["id"]

    if mode == "routed":
        for node in ("g1", "g2"):
            entries = await stream_after(rdb, keys.node_stream(node), tails[node])
            assert len(entries) == 1, f"{node}: {len(entries)} stream entries for one send"
            [entry] = entries
            assert entry.envelope is not None
            assert Envelope.unpack(entry.envelope).msg_id == body["id"]
            got = sorted((r.user_id, r.seq, r.epoch) for r in entry.recipients)
            want = sorted((u, 1, clients[u].epoch) for u, n in placement.items() if n == node)
            assert got == want

    # Nothing extra: the next message to everyone is seq 2 and arrives right after seq 1.
    await api_send(session, router, list(placement), payload="next")
    for client in clients.values():
        await client.wait_messages(2)
        assert client.seqs() == [1, 2]
        await client.close()


# -- 7. channel filters ------------------------------------------------------------------------------------


async def test_subscriptions_filter_and_leave_the_rest_unread(
    cluster: Cluster, session: aiohttp.ClientSession, rdb: aioredis.Redis
) -> None:
    """A connection subscribed to channel "a" receives only "a" messages; its cumulative ack does not
    mark the "b" message it never received as read: another connection of the user gets every message,
    and a fresh connection without `since` still gets the "b" message as unread. After `unsubscribe`
    the filtered connection receives every channel again."""
    g1 = cluster.gateway("g1")
    g2 = cluster.gateway("g2")
    router = cluster.router()

    only_a = await Client.connect(session, g1, "bob")
    await only_a.send({"type": "subscribe", "channel": "a"})
    await barrier(only_a)
    other = await Client.connect(session, g2, "bob")

    for channel in ("a", "b", "a"):
        await api_send(session, router, "bob", payload=channel, channel=channel)

    await other.wait_messages(3)
    assert_exactly_once_in_order(other.seqs(), range(1, 4))
    assert [m["channel"] for m in other.messages()] == ["a", "b", "a"]

    await only_a.wait_messages(2)
    assert only_a.seqs() == [1, 3]
    assert [m["channel"] for m in only_a.messages()] == ["a", "a"]

    # The filtered connection acknowledges everything it has seen; seq 2 was never delivered to it.
    await only_a.ack(3)
    await barrier(only_a)

    fresh = await Client.connect(session, g2, "bob")
    await api_send(session, router, "bob", payload="b2", channel="b")  # seq 4: a marker after the unread
    await fresh.wait_for(lambda c: 4 in c.seqs(), what="seq 4")
    assert 2 in fresh.seqs(), f"unread 'b' message (seq 2) not delivered to a fresh connection: {fresh.seqs()}"
    assert fresh.seqs() == sorted(set(fresh.seqs()))

    await only_a.send({"type": "unsubscribe", "channel": "a"})
    await barrier(only_a)
    await api_send(session, router, "bob", payload="b3", channel="b")  # seq 5
    await only_a.wait_for(lambda c: 5 in c.seqs(), what="seq 5 after unsubscribe")
    assert only_a.seqs() == [1, 3, 5]
    for client in (only_a, other, fresh):
        await client.close()


# -- 8. racing senders -------------------------------------------------------------------------------------


async def test_2000_concurrent_router_sends_arrive_exactly_once_in_order(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """2,000 POST /v1/messages to bob, 50 in flight, spread over two router processes so pushes race:
    the results hold seq 1..2000 once each, and bob's connection receives 1..2000 exactly once in
    order."""
    g1 = cluster.gateway("g1")
    routers = [cluster.router(), cluster.router()]
    bob = await Client.connect(session, g1, "bob")
    total = 2000
    limit = asyncio.Semaphore(50)
    seqs: list[int] = []

    async def one(i: int) -> None:
        async with limit:
            body = await api_send(session, routers[i % 2], "bob", payload=i)
            seqs.append(body["results"][0]["seq"])

    await asyncio.gather(*(one(i) for i in range(total)))
    assert sorted(seqs) == list(range(1, total + 1))
    # Frames leave in seq order: once seq N is in, whatever else is coming has come.
    await bob.wait_for(lambda c: bool(c.seqs()) and c.seqs()[-1] >= total, timeout=30, what=f"seq {total}")
    assert_exactly_once_in_order(bob.seqs(), range(1, total + 1))
    assert bob.close_code is None
    await bob.close()


async def test_websocket_senders_on_two_nodes_racing_arrive_exactly_once_in_order(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """Three WebSocket senders fire sends to bob without waiting for replies: two on g2 (routed pushes)
    and one on bob's own node g1 (local handoff), so live items race and arrive out of seq order at
    g1. Every send is answered, and bob receives 1..N exactly once in order."""
    fast = {"BEELINE_RATE_LIMIT_PER_SECOND": "100000", "BEELINE_RATE_LIMIT_BURST": "100000"}
    g1 = cluster.gateway("g1", **fast)
    g2 = cluster.gateway("g2", **fast)
    bob = await Client.connect(session, g1, "bob")
    senders = [
        await Client.connect(session, g2, "carol"),
        await Client.connect(session, g2, "carol"),
        await Client.connect(session, g1, "dave"),
    ]
    per_sender = 300
    total = per_sender * len(senders)

    async def fire(client: Client) -> None:
        for i in range(per_sender):
            await client.send({"type": "send", "to": "bob", "channel": "chat", "payload": i, "ref": i})

    await asyncio.gather(*(fire(c) for c in senders))
    for client in senders:
        await client.wait_for(lambda c: len(c.of_type("sent")) >= per_sender, timeout=30, what="all replies")
        assert client.of_type("error") == []
    reply_seqs = sorted(r["results"][0]["seq"] for c in senders for r in c.of_type("sent"))
    assert reply_seqs == list(range(1, total + 1))
    statuses = {c.user: {r["results"][0]["status"] for r in c.of_type("sent")} for c in senders}
    assert statuses == {"carol": {"routed"}, "dave": {"local"}}

    # Frames leave in seq order: once seq N is in, whatever else is coming has come.
    await bob.wait_for(lambda c: bool(c.seqs()) and c.seqs()[-1] >= total, timeout=30, what=f"seq {total}")
    assert_exactly_once_in_order(bob.seqs(), range(1, total + 1))
    assert bob.close_code is None
    for client in (bob, *senders):
        await client.close()


# -- 9. broadcast delivers nothing extra ------------------------------------------------------------------


async def test_broadcast_mode_nodes_deliver_only_to_their_own_receivers(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """In broadcast mode every node sees every message, yet each user gets only the messages addressed
    to them: alice (g1), bob (g2) and carol (g1, never addressed until the end) see nothing extra."""
    cluster.base_env["BEELINE_ROUTING"] = "broadcast"
    g1 = cluster.gateway("g1")
    g2 = cluster.gateway("g2")
    router = cluster.router()
    alice = await Client.connect(session, g1, "alice")
    bob = await Client.connect(session, g2, "bob")
    carol = await Client.connect(session, g1, "carol")

    for i in range(5):
        await api_send(session, router, "alice", payload=f"alice-{i}")
        await api_send(session, router, "bob", payload=f"bob-{i}")
    await api_send(session, router, ["alice", "bob"], payload="both")
    await api_send(session, router, "carol", payload="carol-0")

    await alice.wait_messages(6)
    await bob.wait_messages(6)
    await carol.wait_messages(1)
    assert [m["payload"] for m in alice.messages()] == [*(f"alice-{i}" for i in range(5)), "both"]
    assert [m["payload"] for m in bob.messages()] == [*(f"bob-{i}" for i in range(5)), "both"]
    assert [m["payload"] for m in carol.messages()] == ["carol-0"]
    assert_exactly_once_in_order(alice.seqs(), range(1, 7))
    assert_exactly_once_in_order(bob.seqs(), range(1, 7))
    for client in (alice, bob, carol):
        await client.close()
