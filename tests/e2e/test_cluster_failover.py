"""Redis Cluster failover under load, and the opt-in durable-write setting (BEELINE_DURABLE_REPLICAS).

A manual ``CLUSTER FAILOVER`` on a replica promotes it while the old primary hands over: delivery goes on
and every message accepted (HTTP 202) reaches its receiver exactly once, in order. The durable-write
setting is what makes "accepted" mean "on a replica too": tested by stopping the replica, which must turn
sends into retryable 503s instead of 202s that a failover could lose."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import aiohttp
import pytest

from tests.support import (
    Cluster,
    RedisClusterServer,
    RedisServer,
    ResumingClient,
    api_headers,
    assert_exactly_once_in_order,
    eventually,
    run_load,
)

pytestmark = pytest.mark.redis


@pytest.fixture
def replicated_cluster() -> Iterator[RedisClusterServer]:
    """3 primaries with one replica each, for this test alone (a failover changes the topology)."""
    server = RedisClusterServer(masters=3, replicas=1).start()
    yield server
    server.cleanup()


def _role(server: RedisServer) -> str:
    with server.client() as c:
        return str(c.info("replication")["role"])


@pytest.mark.parametrize("durable", ["0", "1"])
async def test_manual_failover_under_load_delivers_everything_accepted(
    replicated_cluster: RedisClusterServer, prefix: str, session: aiohttp.ClientSession, durable: str
) -> None:
    """Load runs through a CLUSTER FAILOVER of one primary: sends are accepted or retried (503 +
    Idempotency-Key), gateways follow the new topology without restarting, and every client ends with
    every seq exactly once in order. Reported: how many sends had to be retried."""
    cluster = Cluster(
        redis_url="redis://127.0.0.1:1/0",
        prefix=prefix,
        base_env={"BEELINE_REDIS_CLUSTER": replicated_cluster.seeds, "BEELINE_DURABLE_REPLICAS": durable},
    )
    try:
        gateways = [cluster.gateway("g1"), cluster.gateway("g2")]
        router = cluster.router()
        users = [f"user{i}" for i in range(30)]
        clients = [ResumingClient(session, gateways, u, start=i) for i, u in enumerate(users)]
        for client in clients:
            client.start()
        await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in clients)), timeout=30)

        load = asyncio.create_task(run_load(session, router, users, rate=200, seconds=4))
        await asyncio.sleep(1.0)  # let the load run before the failover
        replica = next(s for s in replicated_cluster.servers if _role(s) == "slave")
        with replica.client() as c:
            c.execute_command("CLUSTER", "FAILOVER")

        async def promoted() -> bool:
            return _role(replica) == "master"

        await eventually(promoted, timeout=15, what="replica promoted")
        sent = await load

        async def all_delivered() -> bool:
            return all(len(c.seqs) >= sent[c.user] for c in clients)

        await eventually(all_delivered, timeout=30, what="every accepted message delivered")
        for client in clients:
            assert_exactly_once_in_order(client.seqs, range(1, sent[client.user] + 1))
        for svc in cluster.services:
            assert svc.proc is not None and svc.proc.poll() is None, f"{svc.kind} {svc.node_id} died"
        for client in clients:
            await client.stop()
    finally:
        cluster.stop()


async def test_durable_writes_refuse_what_no_replica_acknowledged(prefix: str, session: aiohttp.ClientSession) -> None:
    """With BEELINE_DURABLE_REPLICAS=1 a send is accepted only once a replica has it: with the replica
    stopped it gets a retryable 503 (nothing acknowledged), once the replica is back it gets 202. Without
    the setting the same send is accepted at once (and could be lost by a failover right then)."""
    primary = RedisServer().start()
    replica = RedisServer(extra_args=("--replicaof", "127.0.0.1", str(primary.port))).start()
    durable = Cluster(redis_url=primary.url, prefix=prefix, base_env={"BEELINE_DURABLE_REPLICAS": "1"})
    plain = Cluster(redis_url=primary.url, prefix=prefix)
    try:

        async def replica_linked() -> bool:
            with replica.client() as c:
                return c.info("replication").get("master_link_status") == "up"

        await eventually(replica_linked, timeout=10, what="replica connected")
        durable_router = durable.router()
        plain_router = plain.router()
        body = {"to": "bob", "channel": "c", "payload": "x"}

        async def post(router_url: str) -> tuple[int, dict[str, object]]:
            async with session.post(f"{router_url}/v1/messages", json=body, headers=api_headers()) as r:
                return r.status, await r.json()

        status, _ = await post(durable_router.base_url)
        assert status == 202
        assert replica.proc is not None
        os.kill(replica.proc.pid, signal.SIGSTOP)
        try:
            status, answer = await post(durable_router.base_url)
            assert status == 503, answer
            assert answer["error"]["code"] == "unavailable"  # type: ignore[index]
            status, _ = await post(plain_router.base_url)
            assert status == 202
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)

        async def accepted_again() -> bool:
            return (await post(durable_router.base_url))[0] == 202

        await eventually(accepted_again, timeout=10, what="durable sends accepted once the replica is back")
    finally:
        durable.stop()
        plain.stop()
        replica.cleanup()
        primary.cleanup()
