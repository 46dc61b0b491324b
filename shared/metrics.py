"""Prometheus metrics, one :class:`Metrics` object per service built on an injected registry.

Never module-level collectors: tests build many apps in one process. Names follow Prometheus
conventions (``beeline_`` namespace, base units, ``_total`` / ``_seconds`` / ``_ratio`` / ``_entries``);
labels are bounded (service, node, path, outcome, op, code, reason, route, status): never a user id,
connection id or message id. The names are the contract with ``grafana/`` (dashboard and alert rules);
rename in both places (``tests/observability`` checks that every name the dashboard uses exists).

The delivery latency is end to end: the accept timestamp travels in the envelope (``Envelope.ts``) and
the gateway observes ``now - ts`` right after the frame was written to the receiving socket, so it
includes the Redis hops, the node stream, the outbound queue and, on the ``mailbox`` path, the time
the message waited for an offline receiver. It compares two hosts' clocks: keep them NTP-synced.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from math import isnan
from types import TracebackType
from typing import Final, Generic, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST as _CONTENT_TYPE
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.metrics_core import Metric

from shared import __version__
from shared.errors import StoreUnavailable
from shared.protocol import ErrorCode
from shared.redis import is_unavailable, unavailable

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
"""Delivery latency: sub-millisecond (the local path) up to the seconds a mailbox catch-up can take."""
REDIS_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FILL_BUCKETS: Final = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
"""Mailbox fill ratio (length / cap) after an append: the alert on a mailbox near its cap reads le="0.9"."""

PATHS: Final = ("local", "routed", "mailbox")
PROTOCOLS: Final = ("beeline", "stomp", "sockjs-websocket", "sockjs-xhr-streaming", "sockjs-xhr-polling")
"""Client protocols of gateway connections: Beeline's own frames on /ws, STOMP on a WebSocket (/ws by
subprotocol, or the raw <BEELINE_SOCKJS_PATH>/websocket), and STOMP over each SockJS transport."""
"""Delivery paths: the sender's own node, another node's stream (or broadcast), the mailbox (catch-up/gap)."""
OUTCOMES: Final = {
    "gateway": ("local", "routed", "stored", "dropped", "error"),
    "router": ("routed", "stored", "error"),
}
"""Message outcomes per service, pre-created at 0 so that a rate() over them has data from the first scrape."""
REJECTION_CODES: Final = {
    "gateway": (
        ErrorCode.BAD_FRAME,
        ErrorCode.WRONG_FRAME_KIND,
        ErrorCode.UNKNOWN_TYPE,
        ErrorCode.INVALID_FIELD,
        ErrorCode.PAYLOAD_TOO_LARGE,
        ErrorCode.TOO_MANY_RECEIVERS,
        ErrorCode.RATE_LIMITED,
        ErrorCode.UNAVAILABLE,
        ErrorCode.INTERNAL,
        "unauthorized",
        "over_capacity",
        "busy",
    ),
    "router": (
        "unauthorized",
        "bad_json",
        ErrorCode.INVALID_FIELD,
        ErrorCode.PAYLOAD_TOO_LARGE,
        ErrorCode.TOO_MANY_RECEIVERS,
    ),
}
"""Known rejection codes, pre-created at 0 (a series born at its first increment shows no rate for it)."""
DISCONNECT_REASONS: Final = ("client", "slow_consumer", "drain", "admin", "token_expired", "unavailable")


class CounterChild:
    """One labelled counter: a plain float.

    The services are single-threaded event loops, and the exposition runs on the same loop, so the
    lock prometheus_client's children take on every increment buys nothing here: without it and the
    calls around it an update costs a fifth (62 against 335 ns per ``inc``, 148 against 777 per
    ``observe``), and the send path makes several per message.
    """

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.value += amount


class HistogramChild:
    """One labelled histogram: a count per bucket (cumulated only when scraped) and the sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.sum += amount
        if isnan(amount):  # in no bucket, as prometheus_client does (only the sum shows it)
            return
        # bisect_left: the first bound >= amount, as a Prometheus bucket counts values <= its le.
        self.counts[bisect_left(self.bounds, amount)] += 1


Child = TypeVar("Child", CounterChild, HistogramChild)


class _Family(Generic[Child]):
    """A labelled family registered as a collector; exported exactly as prometheus_client's own
    Counter and Histogram export (``_total``/``_bucket``/``_count``/``_sum`` and ``_created``)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        kind: str,
        new_child: Callable[[], Child],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._kind = kind
        self._new_child: Callable[[], Child] = new_child
        self._children: dict[tuple[str, ...], Child] = {}
        registry.register(self)

    def labels(self, *values: str) -> Child:
        """The child for these label values (created at 0 on first use); look it up once, off the hot path."""
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
            child = self._children[key] = self._new_child()
        return child

    def describe(self) -> list[Metric]:
        return [Metric(self._name, self._documentation, self._kind)]

    def collect(self) -> list[Metric]:
        family = Metric(self._name, self._documentation, self._kind)
        for key, child in list(self._children.items()):
            self._samples(family, dict(zip(self._labelnames, key, strict=True)), child)
        return [family]

    def _samples(self, family: Metric, labels: dict[str, str], child: Child) -> None:
        raise NotImplementedError


class CounterFamily(_Family[CounterChild]):
    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], *, registry: CollectorRegistry
    ) -> None:
        # As prometheus_client: the family is named without _total, its sample with it.
        super().__init__(
            name.removesuffix("_total"),
            documentation,
            labelnames,
            kind="counter",
            new_child=CounterChild,
            registry=registry,
        )

    def _samples(self, family: Metric, labels: dict[str, str], child: CounterChild) -> None:
        family.add_sample(f"{self._name}_total", labels, child.value)
        family.add_sample(f"{self._name}_created", labels, child.created)


class HistogramFamily(_Family[HistogramChild]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = tuple(sorted(float(b) for b in buckets if b != float("inf")))
        super().__init__(
            name,
            documentation,
            labelnames,
            kind="histogram",
            new_child=lambda: HistogramChild(bounds),
            registry=registry,
        )
        # Bucket bounds as prometheus_client writes them (Go's float format: 0.0001, 1.0, +Inf).
        self._le = [*(repr(b) for b in bounds), "+Inf"]

    def _samples(self, family: Metric, labels: dict[str, str], child: HistogramChild) -> None:
        cumulative = 0
        for le, count in zip(self._le, child.counts, strict=True):
            cumulative += count
            family.add_sample(f"{self._name}_bucket", {**labels, "le": le}, cumulative)
        family.add_sample(f"{self._name}_count", labels, cumulative)
        family.add_sample(f"{self._name}_sum", labels, child.sum)
        family.add_sample(f"{self._name}_created", labels, child.created)


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
        self.delivery_latency = HistogramFamily(
            f"{ns}_delivery_latency_seconds",
            "End to end: accept by the router or the sending gateway -> frame written to the receiving socket.",
            ["node", "path"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.messages = CounterFamily(
            f"{ns}_messages_total",
            "Messages per receiver by outcome (local, routed, stored, dropped, error).",
            ["service", "outcome"],
            registry=registry,
        )
        self.deliveries = CounterFamily(
            f"{ns}_gateway_deliveries_total",
            "Message frames written to client connections, by path and client protocol.",
            ["node", "path", "protocol"],
            registry=registry,
        )
        self.connections = Gauge(
            f"{ns}_gateway_connections", "Open client connections by protocol.", ["node", "protocol"], registry=registry
        )
        self.connects = CounterFamily(
            f"{ns}_gateway_connects_total",
            "Accepted client connections by protocol.",
            ["node", "protocol"],
            registry=registry,
        )
        self.disconnects = CounterFamily(
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
        self.stream_length = Gauge(
            f"{ns}_gateway_stream_length_entries",
            "Entries held in the node stream (read or not; capped at BEELINE_STREAM_MAXLEN).",
            ["node"],
            registry=registry,
        )
        self.stream_entries = CounterFamily(
            f"{ns}_gateway_stream_entries_total", "Node-stream entries consumed.", ["node"], registry=registry
        )
        self.mailbox_appends = CounterFamily(
            f"{ns}_mailbox_appends_total", "Messages appended to user mailboxes.", ["service"], registry=registry
        )
        self.mailbox_trims = CounterFamily(
            f"{ns}_mailbox_trims_total",
            "Oldest mailbox entries dropped to keep a mailbox at its cap (BEELINE_MAILBOX_MAX).",
            ["service"],
            registry=registry,
        )
        self.mailbox_fill = HistogramFamily(
            f"{ns}_mailbox_fill_ratio",
            "Mailbox length / cap after each append (1.0: full, the next append trims the oldest).",
            ["service"],
            buckets=FILL_BUCKETS,
            registry=registry,
        )
        self.mailbox_reads = CounterFamily(
            f"{ns}_gateway_mailbox_reads_total",
            "Mailbox reads by reason (catchup on connect, gap fill, resync).",
            ["node", "reason"],
            registry=registry,
        )
        self.redis_latency = HistogramFamily(
            f"{ns}_redis_command_duration_seconds",
            "Redis round trips by operation.",
            ["service", "op"],
            buckets=REDIS_BUCKETS,
            registry=registry,
        )
        self.redis_errors = CounterFamily(
            f"{ns}_redis_errors_total", "Failed Redis operations.", ["service", "op"], registry=registry
        )
        self.rejections = CounterFamily(
            f"{ns}_rejections_total", "Rejected input by stable error code.", ["service", "code"], registry=registry
        )
        self.slow_closes = CounterFamily(
            f"{ns}_gateway_slow_client_closes_total",
            "Connections closed because their outbound buffer was over its bound.",
            ["node"],
            registry=registry,
        )
        self.http_requests = CounterFamily(
            f"{ns}_http_requests_total",
            "HTTP requests by route and status.",
            ["service", "route", "status"],
            registry=registry,
        )
        self.http_latency = HistogramFamily(
            f"{ns}_http_request_duration_seconds",
            "HTTP request handling time.",
            ["service", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.info.labels(service=service, version=_version(), node=node).set(1)
        self._redis_ops: dict[str, _RedisOpMetrics] = {}
        self._http: dict[tuple[str, int], tuple[CounterChild, HistogramChild]] = {}
        # Per protocol, per path: filled for gateways.
        self._delivered: dict[str, dict[str, tuple[HistogramChild, CounterChild]]] = {}
        # The children the send path touches per message, looked up once: ``labels()`` builds a tuple
        # key of strings each time, several per send.
        self._outcomes: dict[str, CounterChild] = {}
        self._appends = self.mailbox_appends.labels(service)
        self._trims = self.mailbox_trims.labels(service)
        self._fill = self.mailbox_fill.labels(service)
        self._precreate()

    def _precreate(self) -> None:
        # Children for every known label value start at 0: a panel or alert over them has data (a
        # rate of 0) from the first scrape instead of "no data" until the first event.
        service = self.service
        self._outcomes = {outcome: self.messages.labels(service, outcome) for outcome in OUTCOMES.get(service, ())}
        for code in REJECTION_CODES.get(service, ()):
            self.rejections.labels(service, code)
        if service != "gateway":
            return
        node = self.node
        self._delivered = {
            protocol: {
                path: (self.delivery_latency.labels(node, path), self.deliveries.labels(node, path, protocol))
                for path in PATHS
            }
            for protocol in PROTOCOLS
        }
        for gauge in (self.presence_users, self.stream_lag, self.stream_length):
            gauge.labels(node).set(0)
        for protocol in PROTOCOLS:
            self.connections.labels(node, protocol).set(0)
            self.connects.labels(node, protocol)
        for reason in DISCONNECT_REASONS:
            self.disconnects.labels(node, reason)
        self.stream_entries.labels(node)
        self.mailbox_reads.labels(node, "sync")
        self.slow_closes.labels(node)

    def redis_op(self, op: str) -> TimedRedisOp:
        """Times one Redis round trip and counts its failure; Redis errors surface as StoreUnavailable."""
        timer = self._redis_ops.get(op)
        if timer is None:
            timer = self._redis_ops[op] = _RedisOpMetrics(
                self.redis_latency.labels(self.service, op), self.redis_errors.labels(self.service, op)
            )
        return TimedRedisOp(timer)

    def delivery_recorder(self, protocol: str) -> Callable[[str, float], None]:
        """What a connection speaking ``protocol`` calls for each message frame it writes: ``(path,
        latency_s)``, ``latency_s`` after the message was accepted. The children are looked up once."""
        children = self._delivered.get(protocol) or self._delivered.get("beeline", {})

        def delivered(path: str, latency_s: float) -> None:
            latency, count = children[path]
            latency.observe(latency_s)
            count.inc()

        return delivered

    def observe_http(self, route: str, status: int, seconds: float) -> None:
        """One handled HTTP request (route is the route template, never the raw path)."""
        children = self._http.get((route, status))
        if children is None:
            children = self._http[route, status] = (
                self.http_requests.labels(self.service, route, str(status)),
                self.http_latency.labels(self.service, route),
            )
        requests, latency = children
        requests.inc()
        latency.observe(seconds)

    def reject(self, code: str) -> None:
        self.rejections.labels(self.service, code).inc()

    def observe_mailbox(self, length: int, trimmed: int, cap: int) -> None:
        """One append: how full that mailbox is now, and how many old entries the cap pushed out."""
        self._fill.observe(length / cap if cap > 0 else 0.0)
        if trimmed > 0:
            self._trims.inc(trimmed)

    def sent(self, statuses: Iterable[str]) -> None:
        """Counts one accepted send: a mailbox append and an outcome per receiver."""
        counts: dict[str, int] = {}
        for status in statuses:
            counts[status] = counts.get(status, 0) + 1
        for status, count in counts.items():
            self._outcome(status).inc(count)
        self._appends.inc(sum(counts.values()))

    def send_failed(self, receivers: int) -> None:
        """A send that stored nothing (Redis unavailable): every receiver counts as outcome ``error``."""
        self._outcome("error").inc(receivers)

    def _outcome(self, outcome: str) -> CounterChild:
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self.messages.labels(self.service, outcome)
        return child

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True, slots=True)
class _RedisOpMetrics:
    latency: HistogramChild
    errors: CounterChild


class TimedRedisOp:
    """The guard :meth:`Metrics.redis_op` returns: a plain class rather than a generator-based context
    manager, because every Redis call on the send path goes through one."""

    __slots__ = ("_metrics", "_start")

    def __init__(self, metrics: _RedisOpMetrics) -> None:
        self._metrics = metrics
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._metrics.latency.observe(time.perf_counter() - self._start)
        if exc is None:
            return
        if isinstance(exc, StoreUnavailable):
            self._metrics.errors.inc()
        elif is_unavailable(exc):
            self._metrics.errors.inc()
            raise unavailable(exc) from exc


def _version() -> str:
    return __version__
