"""Fixtures: one real redis-server per test session (per xdist worker), isolated per test by a unique
key prefix; real gateway/router processes per test; an aiohttp client session."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from shared.config import RouterConfig, load
from shared.keys import Keys
from shared.redis import RedisClient, create_redis
from tests.support import Cluster, RedisServer


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
    async with aiohttp.ClientSession() as s:
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
