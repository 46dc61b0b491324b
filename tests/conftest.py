"""Fixtures: one real redis-server per test session (per xdist worker), isolated per test by a unique
key prefix; real gateway/router processes per test; an aiohttp client session."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import aiohttp
import pytest

from shared.config import RouterConfig, load
from shared.keys import Keys
from shared.redis import RedisClient, create_redis
from tests.support import Cluster, RedisClusterServer, RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The suite's shared redis-server (never the machine's 6379). Tests that stop Redis use
    ``own_redis`` instead."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server for this test alone, which the test may stop and restart."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def prefix() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


@pytest.fixture
def cluster(redis_server: RedisServer, prefix: str) -> Iterator[Cluster]:
    """Factory for gateway/router processes on the shared Redis; stops every one after the test."""
    c = Cluster(redis_url=redis_server.url, prefix=prefix)
    yield c
    c.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:  # many websockets at once
        yield s


@pytest.fixture
async def redis_client(redis_server: RedisServer, prefix: str) -> AsyncIterator[RedisClient]:
    """An async client on the suite's Redis built like the services build theirs; deletes this test's keys."""
    cfg = load(RouterConfig, {}, redis_url=redis_server.url, api_keys=("k",), key_prefix=prefix)
    client = create_redis(cfg)
    yield client
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.fixture(scope="session")
def redis_cluster_server() -> Iterator[RedisClusterServer]:
    """A real 3-master Redis Cluster for the suite (started on first use)."""
    server = RedisClusterServer(masters=3).start()
    yield server
    server.cleanup()


@pytest.fixture(params=["standalone", "cluster"])
def any_cluster(request: pytest.FixtureRequest, prefix: str) -> Iterator[Cluster]:
    """Like ``cluster``, once against a standalone Redis and once against a real Redis Cluster
    (selected by BEELINE_REDIS_CLUSTER, as operators select it)."""
    if request.param == "standalone":
        c = Cluster(redis_url=request.getfixturevalue("redis_server").url, prefix=prefix)
    else:
        seeds = request.getfixturevalue("redis_cluster_server").seeds
        c = Cluster(redis_url="redis://127.0.0.1:1/0", prefix=prefix, base_env={"BEELINE_REDIS_CLUSTER": seeds})
    yield c
    c.stop()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full-load",
        action="store_true",
        default=False,
        help="run the failure tests at full scale (300 users, 1,000 msg/s for 10 s; 5,000-client storm)",
    )


@dataclass(frozen=True)
class LoadProfile:
    users: int
    rate: float
    seconds: float
    storm_clients: int


@pytest.fixture
def load_profile(request: pytest.FixtureRequest) -> LoadProfile:
    """The CI-sized form by default; ``--full-load`` gives the full form the issue specifies."""
    if request.config.getoption("--full-load"):
        return LoadProfile(users=300, rate=1000, seconds=10, storm_clients=5000)
    return LoadProfile(users=60, rate=300, seconds=3, storm_clients=500)
