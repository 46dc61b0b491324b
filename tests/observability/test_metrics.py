"""Metrics of real router and gateway processes: the end-to-end latency is measured from the timestamp
that travels in the envelope, names follow Prometheus conventions, labels never carry a user, connection
or message id, and the mailbox reports its fill and its trims."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.observability.support import metrics_text, scrape
from tests.support import Client, Cluster, Service, api_headers, api_send, eventually

pytestmark = pytest.mark.redis

OFFLINE_S = 1.5
"""How long the receiver stays offline in the latency test: the artificial delay on the mailbox path."""


def _latency(samples: list[Any], path: str) -> dict[str, float]:
    """The delivery-latency histogram of one path: {"<le>": cumulative count, "count": n, "sum": s}."""
    out: dict[str, float] = {}
    for s in samples:
        if not s.name.startswith("beeline_delivery_latency_seconds") or s.labels.get("path") != path:
            continue
        if s.name.endswith("_bucket"):
            out[s.labels["le"]] = s.value
        elif s.name.endswith("_count"):
            out["count"] = s.value
        elif s.name.endswith("_sum"):
            out["sum"] = s.value
    return out


async def _histogram_when(session: aiohttp.ClientSession, gateway: Service, path: str, count: int) -> dict[str, float]:
    # The gateway observes right after the write, so the client may see the frame a moment earlier.
    found: dict[str, float] = {}

    async def observed() -> bool:
        nonlocal found
        found = _latency(scrape(await metrics_text(session, gateway)), path)
        return found.get("count", 0) >= count

    await eventually(observed, timeout=5, what=f"{count} {path} observation(s)")
    return found


async def test_a_delay_on_the_mailbox_path_shows_in_the_latency_histogram(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """A message to an offline user waits ``OFFLINE_S`` in the mailbox; when the user connects, the
    gateway's ``beeline_delivery_latency_seconds{path="mailbox"}`` observation lands above the 1 s bucket
    (the accept timestamp travelled in the envelope, so the wait counts), while a live message right after
    lands on the routed path well under it."""
    gateway = cluster.gateway("gw-delay")
    router = cluster.router()
    sent = await api_send(session, router, "late", payload="while you were away")
    assert sent["results"][0]["status"] == "stored"
    accepted = time.monotonic()
    await asyncio.sleep(OFFLINE_S)  # the artificial delay under test, not a wait for something to happen
    client = await Client.connect(session, gateway, "late")
    await client.wait_messages(1)
    waited = time.monotonic() - accepted
    mailbox = await _histogram_when(session, gateway, "mailbox", 1)
    assert mailbox["count"] == 1
    assert mailbox["1.0"] == 0, f"the mailbox observation fell at or under 1 s: {mailbox}"
    assert mailbox["2.5"] == 1 if waited < 2.5 else mailbox["+Inf"] == 1, mailbox
    assert OFFLINE_S <= mailbox["sum"] <= waited + 0.5, (mailbox["sum"], waited)

    await api_send(session, router, "late", payload="live")
    await client.wait_messages(2)
    routed = await _histogram_when(session, gateway, "routed", 1)
    assert routed["0.5"] == 1, f"a live message should take far less than 0.5 s: {routed}"
    assert _latency(scrape(await metrics_text(session, gateway)), "mailbox")["count"] == 1
    await client.close()


async def test_names_follow_conventions_and_labels_carry_no_ids(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """After local, routed and mailbox traffic, every family is ``beeline_*``; counters end in ``_total``,
    histograms in a base unit (``_seconds``/``_ratio``), gauges never in ``_total``; no label is named
    after an id and no label value is a user id, connection id or message id of the traffic."""
    gw_a = cluster.gateway("gw-a")
    gw_b = cluster.gateway("gw-b")
    router = cluster.router()
    users = [f"user-{i}-x7" for i in range(4)]
    a0 = await Client.connect(session, gw_a, users[0])
    a1 = await Client.connect(session, gw_a, users[1])
    b2 = await Client.connect(session, gw_b, users[2])
    msg_ids: set[str] = set()
    for to in (users[1], users[2], users[3]):  # local, routed, stored
        reply = await a0.send_and_wait({"type": "send", "to": to, "channel": "c", "payload": "p"})
        assert reply["type"] == "sent", reply
        msg_ids.add(reply["id"])
    msg_ids.add((await api_send(session, router, users[2]))["id"])
    await a1.wait_messages(1)
    await b2.wait_messages(2)
    late = await Client.connect(session, gw_b, users[3])
    await late.wait_messages(1)
    conn_ids = {c.welcome["conn"] for c in (a0, a1, b2, late)}
    forbidden = set(users) | msg_ids | conn_ids

    for svc in (gw_a, gw_b, router):
        for family in text_string_to_metric_families(await metrics_text(session, svc)):
            name = family.name
            assert name.startswith("beeline_"), name
            if family.type == "counter":
                assert not name.endswith("_total"), name  # the parser strips _total from counter families
                assert all(s.name.endswith(("_total", "_created")) for s in family.samples), name
            elif family.type == "histogram":
                assert name.endswith(("_seconds", "_ratio")), name
            elif family.type == "gauge":
                assert not name.endswith("_total"), name
            for sample in family.samples:
                for label, value in sample.labels.items():
                    assert label not in ("user", "user_id", "conn", "conn_id", "msg_id", "id"), (name, label)
                    assert value not in forbidden, f"{name}{{{label}={value!r}}} carries an id"
    for client in (a0, a1, b2, late):
        await client.close()


async def test_mailbox_fill_and_trims_are_counted(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """With ``BEELINE_MAILBOX_MAX=3``, five messages to an offline user append five times, trim two
    (``beeline_mailbox_trims_total``), and the last appends find the mailbox full (fill ratio 1.0, so
    above the le="0.9" bucket that the near-cap alert reads)."""
    router = cluster.router(BEELINE_MAILBOX_MAX="3")
    async with session.post(
        f"{router.base_url}/v1/messages/batch",
        json={"messages": [{"to": "offline", "channel": "c", "payload": i} for i in range(5)]},
        headers=api_headers(),
    ) as r:
        assert r.status == 202, await r.text()
    values = {
        (s.name, s.labels.get("le")): s.value
        for s in scrape(await metrics_text(session, router))
        if s.labels.get("service") == "router"
    }
    assert values[("beeline_mailbox_appends_total", None)] == 5
    assert values[("beeline_mailbox_trims_total", None)] == 2
    assert values[("beeline_mailbox_fill_ratio_count", None)] == 5
    assert values[("beeline_mailbox_fill_ratio_bucket", "0.5")] == 1  # 1/3 full after the first append
    assert values[("beeline_mailbox_fill_ratio_bucket", "0.9")] == 2  # 2/3 after the second
    assert values[("beeline_mailbox_fill_ratio_bucket", "1.0")] == 5  # full from the third on
    outcomes = {
        s.labels["outcome"]: s.value
        for s in scrape(await metrics_text(session, router))
        if s.name == "beeline_messages_total"
    }
    assert outcomes == {"routed": 0, "stored": 5, "error": 0}, outcomes
