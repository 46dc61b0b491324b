"""Mailbox, presence directory and node registry against the suite's real redis-server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from shared.config import RouterConfig, load
from shared.envelope import Envelope
from shared.errors import StoreUnavailable
from shared.keys import Keys
from shared.mailbox import Append, Mailbox
from shared.nodes import NodeInfo, NodeRegistry
from shared.presence import RedisPresenceDirectory
from shared.redis import RedisClient, create_redis, store_errors
from tests.support import RedisServer

pytestmark = pytest.mark.redis


async def script_calls(rdb: RedisClient) -> int:
    stats: Any = await rdb.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{cmd}", {}).get("calls", 0)) for cmd in ("evalsha", "eval"))


def _env(n: int) -> bytes:
    return Envelope.create(sender="s", channel="c", payload=n).pack()


async def test_concurrent_appends_get_gap_free_seqs(redis_client: RedisClient, keys: Keys) -> None:
    """Seqs are 1..N without gaps or repeats however many appends race, and the mailbox ids match."""
    mailbox = Mailbox(redis_client, keys, max_len=10_000, ttl_s=60)
    results = await asyncio.gather(*(mailbox.append(_env(i), ["bob"]) for i in range(500)))
    seqs = sorted(r[0].seq for r in results)
    assert seqs == list(range(1, 501))
    assert len({r[0].epoch for r in results}) == 1
    stored = await mailbox.read("bob", 0, count=1000)
    assert [m.seq for m in stored] == list(range(1, 501))
    assert [m.seq for m in await mailbox.read("bob", 498, count=10)] == [499, 500]


async def test_mailbox_cap_ttl_and_ack_cursor(redis_client: RedisClient, keys: Keys) -> None:
    """The mailbox keeps exactly the newest `max_len` entries, has a TTL, and `acked` only moves forward
    and never past the last seq; an ack from another epoch is ignored."""
    mailbox = Mailbox(redis_client, keys, max_len=5, ttl_s=100)
    for i in range(8):
        await mailbox.append(_env(i), ["bob"])
    assert [m.seq for m in await mailbox.read("bob", 0, count=100)] == [4, 5, 6, 7, 8]
    assert 0 < await redis_client.ttl(keys.mailbox("bob")) <= 100
    state = await mailbox.open("bob")
    assert (state.last_seq, state.acked) == (8, 0)
    assert await mailbox.ack("bob", state.epoch, 5) == 5
    assert await mailbox.ack("bob", state.epoch, 3) == 5
    assert await mailbox.ack("bob", state.epoch, 99) == 8
    assert await mailbox.ack("bob", "other-epoch", 1) == -1


async def test_lost_sequence_starts_a_new_epoch(redis_client: RedisClient, keys: Keys) -> None:
    """If the counter is lost, numbering restarts at 1 under a new epoch and the old mailbox is dropped."""
    mailbox = Mailbox(redis_client, keys, max_len=100, ttl_s=60)
    [first] = await mailbox.append(_env(1), ["bob"])
    await mailbox.append(_env(2), ["bob"])
    await redis_client.delete(keys.user_meta("bob"))
    [again] = await mailbox.append(_env(3), ["bob"])
    assert again.seq == 1
    assert again.epoch != first.epoch
    assert [m.seq for m in await mailbox.read("bob", 0, count=10)] == [1]


async def test_append_returns_presence(redis_client: RedisClient, keys: Keys) -> None:
    """The append reports where the receiver is connected, in the same round trip."""
    mailbox = Mailbox(redis_client, keys, max_len=100, ttl_s=60)
    presence = RedisPresenceDirectory(redis_client, keys)
    await presence.register("bob", "n1")
    await presence.register("bob", "n1")
    await presence.register("bob", "n2")
    [a] = await mailbox.append(_env(1), ["bob"])
    assert a.presence == {"n1": 2, "n2": 1}
    await presence.unregister("bob", "n2")
    await presence.unregister("bob", "n1")
    assert await presence.lookup_many(["bob", "nobody"]) == [{"n1": 1}, {}]
    await presence.unregister("bob", "n1")
    assert not await redis_client.exists(keys.user_presence("bob"))


async def test_reap_removes_a_dead_nodes_entries(redis_client: RedisClient, keys: Keys) -> None:
    """Reaping a node removes it from every user it held and deletes its stream, info and member set."""
    presence = RedisPresenceDirectory(redis_client, keys)
    for user in ("a", "b", "c"):
        await presence.register(user, "dead")
    await presence.register("a", "alive")
    await redis_client.xadd(keys.node_stream("dead"), {b"d": b"x"})
    assert await presence.reap("dead") == 3
    assert await presence.lookup_many(["a", "b", "c"]) == [{"alive": 1}, {}, {}]
    assert not await redis_client.exists(keys.node_stream("dead"), keys.node_members("dead"))


async def test_node_is_dead_after_two_missed_beats(redis_client: RedisClient, keys: Keys) -> None:
    """A node beating every 0.2 s is live; once it stops, readers see it dead within 2 intervals,
    even without refreshing their view (deadlines are compared on Redis's clock)."""
    registry = NodeRegistry(redis_client, keys, dead_after_s=0.4, key_ttl_s=5)
    reader = NodeRegistry(redis_client, keys, dead_after_s=0.4, key_ttl_s=5)
    info = NodeInfo("n1", connections=0, stream_lag=0, draining=False)
    first = await registry.beat(info)
    assert first.was_absent
    view = await reader.refresh()
    assert view.is_live("n1")
    assert await reader.live_subset({"n1": 1, "ghost": 1}) == {"n1": 1}
    stopped_at = time.monotonic()
    while reader.view.is_live("n1"):
        await asyncio.sleep(0.01)
        # 2 intervals plus slack for a loaded CI machine: the property, not a benchmark.
        assert time.monotonic() - stopped_at < 0.4 + 0.3, "still live long after 2 intervals"
    assert await reader.live_subset({"n1": 1}) == {}
    again = await registry.beat(info)
    assert not again.was_absent
    assert again.was_expired, "a beat after the deadline reports the lapse"
    assert await registry.forget_if_dead("n1") is False


async def test_a_node_is_dead_from_the_millisecond_of_its_deadline(redis_client: RedisClient, keys: Keys) -> None:
    """Readers, beats and reaps agree on the boundary: with no grace at all, the deadline is the beat's
    own millisecond, so a second beat (even in that same millisecond) finds the node expired, a read
    sees it dead and a reap may forget it. A stricter test in the Lua once let a beat in the deadline's
    millisecond report "live" to a node every reader had just declared dead."""
    registry = NodeRegistry(redis_client, keys, dead_after_s=0, key_ttl_s=5)
    info = NodeInfo("n1", connections=0, stream_lag=0, draining=False)
    assert (await registry.beat(info)).was_absent
    assert not (await registry.refresh()).is_live("n1")
    for _ in range(20):  # most of these land in the previous beat's millisecond
        again = await registry.beat(info)
        assert again.was_expired and not again.was_absent
    assert await registry.forget_if_dead("n1") is True


async def test_a_node_that_registers_after_a_read_is_seen_at_once(redis_client: RedisClient, keys: Keys) -> None:
    """A reader whose cached view predates a node's first beat must not call that node dead: its
    lookup reads again (once for a burst of lookups), so the new node's first users are routed to."""
    reader = NodeRegistry(redis_client, keys, dead_after_s=5, key_ttl_s=5)
    newcomer = NodeRegistry(redis_client, keys, dead_after_s=5, key_ttl_s=5)
    await reader.refresh()
    await newcomer.beat(NodeInfo("fresh", connections=0, stream_lag=0, draining=False))
    before = await script_calls(redis_client)
    lookups = await asyncio.gather(*(reader.live_subset({"fresh": 1}) for _ in range(50)))
    assert lookups == [{"fresh": 1}] * 50
    # Lookups that began while a read was in flight share the next one: two reads for the whole burst.
    assert await script_calls(redis_client) - before <= 2
    # A node that is unknown because it never existed is dead, whatever is read.
    assert await reader.live_subset({"ghost": 1}) == {}


async def test_heartbeat_cost_is_constant_in_connections(
    redis_server: RedisServer, redis_client: RedisClient, keys: Keys
) -> None:
    """A beat issues the same number of Redis commands for a node holding 10,000 connections as for one
    holding 10 (measured from INFO commandstats on the real server)."""
    registry = NodeRegistry(redis_client, keys, dead_after_s=1, key_ttl_s=5)
    presence = RedisPresenceDirectory(redis_client, keys)
    await presence.restore("small", {f"u{i}": 1 for i in range(10)})
    await presence.restore("big", {f"u{i}": 1 for i in range(10_000)})
    sync = redis_server.client()

    def total_calls() -> int:
        stats = sync.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if not k.endswith("info"))

    costs = {}
    for node, conns in (("small", 10), ("big", 10_000)):
        await registry.beat(NodeInfo(node, conns, 0, False))  # warm the script cache
        before = total_calls()
        await registry.beat(NodeInfo(node, conns, 0, False))
        costs[node] = total_calls() - before
    sync.close()
    assert costs["small"] == costs["big"]
    assert costs["big"] <= 10  # EVALSHA and the calls inside it, HSET and three PEXPIREs


async def test_idempotent_append_is_stored_once_per_receiver(redis_client: RedisClient, keys: Keys) -> None:
    """Appending a message with a dedup id again (a retry after a partial failure) returns the first seq
    and stores nothing new; other messages keep numbering without a gap."""
    mailbox = Mailbox(redis_client, keys, max_len=100, ttl_s=60, dedup_ttl_s=60)
    env = _env(1)
    [first] = await mailbox.append_each([Append(env, "bob", "m1")])
    [again, other] = await mailbox.append_each([Append(env, "bob", "m1"), Append(_env(2), "bob", "m2")])
    assert (first.seq, again.seq, other.seq) == (1, 1, 2)
    assert [m.seq for m in await mailbox.read("bob", 0, count=10)] == [1, 2]
    [plain] = await mailbox.append_each([Append(env, "bob")])
    assert plain.seq == 3, "without a dedup id every append is a new message"


def test_a_write_on_a_connection_closed_under_it_is_unavailable_not_a_crash(redis_server: RedisServer) -> None:
    """redis-py writes a command on a pooled connection whose transport has already closed (the server
    reset it, or the cluster client closed it for a topology refresh while the command held it) and,
    under uvloop, fails with the loop's RuntimeError instead of ConnectionError: that reached the
    router as a 500 in a cluster failover. The guard makes it StoreUnavailable (a 503 the sender
    retries), the next command reconnects, and a RuntimeError of anything else stays a bug."""
    uvloop = pytest.importorskip("uvloop")
    cfg = load(RouterConfig, {}, redis_url=redis_server.url, api_keys=("k",))

    async def scenario() -> None:
        client = create_redis(cfg, max_connections=1)
        try:
            assert await client.ping()
            pool: Any = client.connection_pool
            connection = await pool.get_connection()
            connection._writer.transport.close()  # as a concurrent disconnect or a reset leaves it
            await pool.release(connection)
            # Whatever redis-py and the loop say about it (a RuntimeError under uvloop before redis-py
            # 8.2, a ConnectionError from 8.2 on), Beeline's answer is the same: unavailable, retry.
            with pytest.raises(StoreUnavailable), store_errors():
                await client.ping()
            assert await client.ping()  # reconnected
            with pytest.raises(RuntimeError, match="not redis"), store_errors():
                raise RuntimeError("not redis")
        finally:
            await client.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
