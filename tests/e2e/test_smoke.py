"""The shortest end-to-end path: a message from the router reaches a user on another gateway."""

from __future__ import annotations

import aiohttp
import pytest

from tests.support import Client, Cluster, api_send

pytestmark = pytest.mark.redis


async def test_router_send_reaches_user_on_gateway(any_cluster: Cluster, session: aiohttp.ClientSession) -> None:
    cluster = any_cluster
    gw = cluster.gateway("g1")
    router = cluster.router()
    bob = await Client.connect(session, gw, "bob")
    result = await api_send(session, router, "bob", payload={"text": "hello"})
    assert result["results"][0]["status"] == "routed"
    assert result["results"][0]["nodes"] == ["g1"]
    [msg] = await bob.wait_messages(1)
    assert msg["payload"] == {"text": "hello"}
    assert msg["seq"] == 1
    assert msg["from"] == "system"
    await bob.close()
