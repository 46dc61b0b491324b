"""Prometheus metrics, one :class:`Metrics` object per service built on an injected registry.

Never module-level collectors: tests build many apps in one process. Names follow Prometheus
conventions (``beeline_`` namespace, base units, ``_total`` / ``_seconds``); labels are bounded (path,
outcome, op, code, reason, node): never a user id, connection id or message id. The names are the
contract with ``grafana/``; rename in both places.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST as _CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shared import __version__
from shared.errors import StoreUnavailable
from shared.redis import store_errors

CONTENT_TYPE_LATEST: Final = _CONTENT_TYPE

LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
REDIS_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Every collector of one service. ``service`` is ``gateway`` or ``router``; ``node`` labels a gateway."""

    def __init__(self, registry: CollectorRegistry, *, service: str, node: str = "") -> None:
        self.registry = registry
        self.service = service
        self.node = node
        ns = "beeline"
        self.info = Gauge(
            f"{ns}_build_info", "Static build information (value 1).", ["service", "version", "node"], registry=registry
        )
        self.delivery_latency = Histogram(
            f"{ns}_delivery_latency_seconds",
            "End to end: accept by the router or the sending gateway -> frame written to the receiving socket.",
            ["node", "path"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.messages = Counter(
            f"{ns}_messages_total",
            "Messages per receiver by outcome (local, routed, stored, dropped, error).",
            ["service", "outcome"],
            registry=registry,
        )
        self.deliveries = Counter(
            f"{ns}_gateway_deliveries_total",
            "Message frames queued to client sockets, by path.",
            ["node", "path"],
            registry=registry,
        )
        self.connections = Gauge(f"{ns}_gateway_connections", "Open client connections.", ["node"], registry=registry)
        self.connects = Counter(
            f"{ns}_gateway_connects_total", "Accepted client connections.", ["node"], registry=registry
        )
        self.disconnects = Counter(
            f"{ns}_gateway_disconnects_total",
            "Closed client connections by reason.",
            ["node", "reason"],
            registry=registry,
        )
        self.presence_users = Gauge(
            f"{ns}_gateway_presence_users", "Distinct users registered by this node.", ["node"], registry=registry
        )
        self.stream_lag = Gauge(
            f"{ns}_gateway_stream_lag_entries", "Entries in the node stream not yet read.", ["node"], registry=registry
        )
        self.stream_entries = Counter(
            f"{ns}_gateway_stream_entries_total", "Node-stream entries consumed.", ["node"], registry=registry
        )
        self.mailbox_appends = Counter(
            f"{ns}_mailbox_appends_total", "Messages appended to user mailboxes.", ["service"], registry=registry
        )
        self.mailbox_reads = Counter(
            f"{ns}_gateway_mailbox_reads_total",
            "Mailbox reads by reason (catchup on connect, gap fill, resync).",
            ["node", "reason"],
            registry=registry,
        )
        self.redis_latency = Histogram(
            f"{ns}_redis_command_duration_seconds",
            "Redis round trips by operation.",
            ["service", "op"],
            buckets=REDIS_BUCKETS,
            registry=registry,
        )
        self.redis_errors = Counter(
            f"{ns}_redis_errors_total", "Failed Redis operations.", ["service", "op"], registry=registry
        )
        self.rejections = Counter(
            f"{ns}_rejections_total", "Rejected input by stable error code.", ["service", "code"], registry=registry
        )
        self.slow_closes = Counter(
            f"{ns}_gateway_slow_client_closes_total",
            "Connections closed because their outbound buffer was over its bound.",
            ["node"],
            registry=registry,
        )
        self.http_requests = Counter(
            f"{ns}_http_requests_total",
            "HTTP requests by route and status.",
            ["service", "route", "status"],
            registry=registry,
        )
        self.http_latency = Histogram(
            f"{ns}_http_request_duration_seconds",
            "HTTP request handling time.",
            ["service", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.info.labels(service=service, version=_version(), node=node).set(1)

    @asynccontextmanager
    async def redis_op(self, op: str) -> AsyncIterator[None]:
        """Times one Redis round trip and counts its failure; Redis errors surface as StoreUnavailable."""
        start = time.perf_counter()
        try:
            async with store_errors():
                yield
        except StoreUnavailable:
            self.redis_errors.labels(self.service, op).inc()
            raise
        finally:
            self.redis_latency.labels(self.service, op).observe(time.perf_counter() - start)

    def reject(self, code: str) -> None:
        self.rejections.labels(self.service, code).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _version() -> str:
    return __version__
