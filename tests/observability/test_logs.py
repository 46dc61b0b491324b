"""Logs of real processes: JSON lines in production with the node id on every gateway line, never a
token or a payload body (even at debug), and the level set by ``BEELINE_LOG_LEVEL``."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from tests.support import Client, Cluster, Service, api_headers, api_send, token

pytestmark = pytest.mark.redis

PAYLOAD_MARK = "payload-body-7f3a9c"


def _lines(svc: Service) -> list[dict[str, Any]]:
    """Every log line of ``svc`` (stopped with SIGTERM first, so its shutdown lines are in), parsed."""
    svc.terminate()
    out = []
    for raw in svc.logs().splitlines():
        if raw.strip():
            line = json.loads(raw)  # production format: every line is one JSON object
            assert isinstance(line, dict), raw
            out.append(line)
    return out


async def test_json_lines_with_node_id_and_no_token_or_payload_even_at_debug(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """At ``BEELINE_LOG_LEVEL=debug`` and under traffic that logs (sends, an admin disconnect, a bad
    frame, a refused token), every line of the gateway and the router is a JSON object with timestamp,
    level, logger and event; every gateway line carries ``node_id``; a line with a ``msg_id`` carries
    the ``node_id`` too; no line contains a client token or a payload body."""
    gateway = cluster.gateway("gw-log", BEELINE_LOG_LEVEL="debug")
    router = cluster.router(BEELINE_LOG_LEVEL="debug")
    secrets = {token("alice"), token("bob")}
    alice = await Client.connect(session, gateway, "alice")
    bob = await Client.connect(session, gateway, "bob", query={"token": token("bob")})
    secrets |= {token("alice"), token("bob")}  # tokens embed their issue time: keep every one minted
    reply = await alice.send_and_wait({"type": "send", "to": "bob", "channel": "c", "payload": PAYLOAD_MARK})
    assert reply["type"] == "sent"
    await api_send(session, router, ["alice", "bob"], payload={"text": PAYLOAD_MARK})
    await bob.wait_messages(2)
    await bob.ws.send_str(f"not json {PAYLOAD_MARK}")
    await bob.wait_for(lambda c: bool(c.of_type("error")), what="bad_frame error")
    async with session.get(gateway.ws_url, headers={"Authorization": "Bearer not-a-valid-token"}) as r:
        assert r.status == 401
    async with session.delete(f"{router.base_url}/v1/users/alice/connections", headers=api_headers()) as r:
        assert r.status == 202
    await alice.wait_closed()
    await bob.close()

    gateway_lines = _lines(gateway)
    router_lines = _lines(router)
    assert any(line["event"] == "gateway_started" for line in gateway_lines)
    assert any(line["event"] == "router_started" for line in router_lines)
    assert any(line.get("user_id") == "alice" for line in gateway_lines), "no per-connection line"
    for line in gateway_lines + router_lines:
        assert {"timestamp", "level", "logger", "event"} <= set(line), line
        text = json.dumps(line)
        assert PAYLOAD_MARK not in text, f"a payload body was logged: {line}"
        assert not any(secret in text for secret in secrets), f"a token was logged: {line}"
        assert "not-a-valid-token" not in text, f"a token was logged: {line}"
        if "msg_id" in line:
            assert line.get("node_id"), f"a line about a message without node_id: {line}"
    for line in gateway_lines:
        assert line.get("node_id") == "gw-log", line


async def test_log_level_comes_from_beeline_log_level(cluster: Cluster) -> None:
    """``BEELINE_LOG_LEVEL=warning`` hides info lines (no ``gateway_started``); ``info`` shows them."""
    quiet = cluster.gateway("gw-quiet", BEELINE_LOG_LEVEL="warning")
    chatty = cluster.gateway("gw-chatty", BEELINE_LOG_LEVEL="info")
    quiet_lines = _lines(quiet)
    chatty_lines = _lines(chatty)
    assert not any(line["level"] in ("debug", "info") for line in quiet_lines), quiet_lines
    assert any(line["event"] == "gateway_started" and line["level"] == "info" for line in chatty_lines)
    assert not any(line["level"] == "debug" for line in chatty_lines)
