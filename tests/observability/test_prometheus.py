"""Proof against the real thing: a real Prometheus scrapes a running router and two gateways under
traffic (local, routed and mailbox deliveries, trims, rejections, a slow-client close), then every
dashboard panel's PromQL, with Grafana's variables substituted, returns data through Prometheus's HTTP
API, the node variable's query lists the running nodes, and every recording and alerting rule loads and
evaluates without error."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import aiohttp
import pytest

from tests.observability.support import (
    GATEWAY_JOB,
    ROUTER_JOB,
    RULES,
    PrometheusServer,
    grafana_variables,
    has_number,
    load_dashboard,
    metrics_text,
    query_panels,
    require_tool,
    scrape,
    substitute,
)
from tests.support import Client, Cluster, Service, api_headers, api_send, eventually, raw_websocket

pytestmark = pytest.mark.redis

RATE_INTERVAL = "1m"
"""``$__rate_interval`` for the test: longer than the whole test, so every rate() sees all its traffic
(Grafana uses max(4 x scrape interval, $__interval + scrape interval); any value >= 2 scrapes works)."""
MAILBOX_MAX = "5"
RATE_LIMIT_BURST = 50
RATE_LIMIT_PER_S = 10
BIG = "x" * 16_000


async def _gauge_sum(session: aiohttp.ClientSession, svc: Service, name: str) -> float:
    return sum(s.value for s in scrape(await metrics_text(session, svc)) if s.name == name)


async def _slow_client_close(session: aiohttp.ClientSession, gateway: Service, router: Service) -> None:
    """Floods a client that never reads until the gateway closes it as a slow consumer (bounded)."""
    stuck = await asyncio.to_thread(raw_websocket, gateway.port, "stuck", 4096)
    try:

        async def registered() -> bool:
            return await _gauge_sum(session, gateway, "beeline_gateway_connections") >= 1

        await eventually(registered, timeout=5, what="stuck client registered")
        for _ in range(200):  # bounded: 200 x 10 x 16 kB = 32 MB, far over socket buffers and the bound
            async with session.post(
                f"{router.base_url}/v1/messages/batch",
                json={"messages": [{"to": "stuck", "channel": "c", "payload": BIG}] * 10},
                headers=api_headers(),
            ) as r:
                assert r.status == 202, await r.text()
            if await _gauge_sum(session, gateway, "beeline_gateway_slow_client_closes_total") >= 1:
                return
        raise AssertionError("the stuck client was never closed as a slow consumer")
    finally:
        stuck.close()


async def _send_ws(sender: Client, to: str) -> None:
    reply = await sender.send_and_wait({"type": "send", "to": to, "channel": "c", "payload": "hello"})
    assert reply["type"] == "sent", reply


async def _drive_traffic(session: aiohttp.ClientSession, gw_a: Service, gw_b: Service, router: Service) -> None:
    """Every path and outcome the dashboard shows, a few rounds apart so several scrapes see it."""
    alice = await Client.connect(session, gw_a, "alice")
    carol = await Client.connect(session, gw_a, "carol")
    bob = await Client.connect(session, gw_b, "bob")
    for round_ in range(6):
        await _send_ws(alice, "carol")  # local: both on gw-a
        await _send_ws(alice, "bob")  # routed through gw-b's stream
        await api_send(session, router, ["bob", "carol"], payload=3)  # routed from the router
        await api_send(session, router, "dave", payload=round_)  # stored: dave is offline
        await asyncio.sleep(0.3)  # pace the rounds over several 1 s scrapes
    await carol.wait_messages(12)
    await bob.wait_messages(12)
    # Mailbox path (and trims: dave got 6 with a cap of 5).
    dave = await Client.connect(session, gw_b, "dave")
    await dave.wait_messages(int(MAILBOX_MAX))
    # Rejections: a frame that is not JSON, a burst over the per-connection rate limit, a bad API call.
    await bob.ws.send_str("this is not json")
    await bob.wait_for(lambda c: any(f.get("code") == "bad_frame" for f in c.of_type("error")), what="bad_frame")
    for _ in range(3 * RATE_LIMIT_BURST):  # far more than the burst plus what refills meanwhile
        await carol.send({"type": "ack", "seq": 0})
    await carol.wait_for(
        lambda c: any(f.get("code") == "rate_limited" for f in c.of_type("error")), what="rate_limited"
    )
    async with session.post(f"{router.base_url}/v1/messages", json={"to": 5}, headers=api_headers()) as r:
        assert r.status == 400
    await _slow_client_close(session, gw_a, router)
    for client in (alice, carol, bob, dave):
        await client.close()


async def _panel_results(
    prom: PrometheusServer, session: aiohttp.ClientSession, variables: dict[str, str]
) -> dict[str, list[dict[str, Any]]]:
    results = {}
    for panel in query_panels(load_dashboard()):
        for target in panel["targets"]:
            expr = substitute(target["expr"], variables)
            results[f"{panel['title']} [{target['refId']}]: {expr}"] = await prom.query(session, expr)
    return results


async def test_every_dashboard_panel_returns_data_from_a_real_prometheus(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """A real Prometheus (loopback, own TSDB, 1 s scrapes, the rules file loaded) scrapes a router and
    two gateways while the test drives local/routed/mailbox traffic, trims, rejections and a slow-client
    close. Then: the node variable's query lists both nodes; every target of every panel, with ``$node``
    as Grafana's multi-value regex and ``$__rate_interval`` substituted, returns at least one numeric
    sample; the key panels show the specific series the traffic produced; every rule is healthy."""
    binary = require_tool("prometheus")
    extra = {
        "BEELINE_MAILBOX_MAX": MAILBOX_MAX,
        "BEELINE_OUTBOUND_MAX_BYTES": "262144",
        "BEELINE_RATE_LIMIT_BURST": str(RATE_LIMIT_BURST),
        "BEELINE_RATE_LIMIT_PER_SECOND": str(RATE_LIMIT_PER_S),
    }
    gw_a = cluster.gateway("gw-a", **extra)
    gw_b = cluster.gateway("gw-b", **extra)
    router = cluster.router(BEELINE_MAILBOX_MAX=MAILBOX_MAX)
    prom = PrometheusServer(binary, {GATEWAY_JOB: [gw_a, gw_b], ROUTER_JOB: [router]}, rule_files=[RULES]).start()
    try:

        async def scraped() -> bool:
            return await prom.targets_up(session)

        await eventually(scraped, timeout=15, interval=0.2, what="prometheus scraped every target")
        await _drive_traffic(session, gw_a, gw_b, router)
        traffic_done = time.time()

        # Grafana's node variable: label_values(beeline_build_info{service="gateway"}, node).
        nodes = await prom.api(session, "label/node/values", **{"match[]": 'beeline_build_info{service="gateway"}'})
        assert sorted(nodes) == ["gw-a", "gw-b"], nodes
        variables = grafana_variables("(gw-a|gw-b)", RATE_INTERVAL)

        results: dict[str, list[dict[str, Any]]] = {}

        async def every_panel_has_data() -> bool:
            nonlocal results
            # Only a scrape of every target after the traffic ended is sure to hold all of it.
            scraped = await prom.query(session, f"timestamp(up) > {traffic_done:.3f}")
            results = await _panel_results(prom, session, variables)
            return len(scraped) == 3 and all(has_number(r) for r in results.values())

        try:
            await eventually(every_panel_has_data, timeout=30, interval=0.5, what="data in every panel")
        except AssertionError:
            empty = [k for k, r in results.items() if not has_number(r)]
            raise AssertionError(f"panels without data: {json.dumps(empty, indent=1)}\n{prom.logs()}") from None

        def series(title_prefix: str, label: str) -> dict[str, float]:
            """Label value -> the sum of its samples in the panel(s) whose key starts with the prefix."""
            out: dict[str, float] = {}
            for key, result in results.items():
                if key.startswith(title_prefix):
                    for sample in result:
                        if label in sample["metric"]:
                            value = sample["metric"][label]
                            out[value] = out.get(value, 0.0) + float(sample["value"][1])
            return out

        latency = series("Delivery latency by path", "path")
        assert set(latency) == {"local", "routed", "mailbox"}, latency
        assert not any(math.isnan(v) for v in latency.values()), latency  # every path had deliveries
        outcomes = series("Messages per second by outcome [A]", "outcome")
        assert all(outcomes[o] > 0 for o in ("local", "routed", "stored")), outcomes
        codes = series("Rejections per second by code", "code")
        assert all(codes.get(c, 0) > 0 for c in ("bad_frame", "rate_limited", "invalid_field")), codes
        assert series("Slow-client closes per second", "node").get("gw-a", 0) > 0
        assert set(series("Connections per node", "node")) == {"gw-a", "gw-b"}
        assert set(series("Node stream lag and length", "node")) == {"gw-a", "gw-b"}
        mailbox = {k: r for k, r in results.items() if k.startswith("Mailbox activity [B]")}
        assert all(float(s["value"][1]) > 0 for r in mailbox.values() for s in r), mailbox  # trims

        # Every recording and alerting rule loaded and evaluated against the live series without error.
        groups = (await prom.api(session, "rules"))["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) == RULES.read_text(encoding="utf-8").count("- record:") + RULES.read_text(
            encoding="utf-8"
        ).count("- alert:")
        for rule in rules:
            assert rule["health"] == "ok", rule
            if rule["type"] == "alerting":
                assert {"summary", "runbook"} <= set(rule["annotations"]), rule["name"]
        p99 = await prom.query(session, "path:beeline_delivery_latency_seconds:p99_5m")
        assert {s["metric"]["path"] for s in p99} == {"local", "routed", "mailbox"}, p99
    finally:
        prom.stop()
