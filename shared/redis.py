"""Redis client factory: every option explicit, one place.

redis-py 8 changed defaults (5 s socket timeout, RESP3, built-in retries). We pin them:

* ``protocol=2`` so response shapes (XINFO, XREADGROUP) are the documented RESP2 ones.
* ``decode_responses=False``: envelopes are msgpack bytes.
* no automatic retries on the command client: an ``EVALSHA`` that appends to a mailbox or an ``XADD``
  is not idempotent, so a failure goes back to the caller (HTTP 503 / ``unavailable``) instead of
  risking a second ``seq`` for the same message. Loops that own their own retry (heartbeat, stream
  reader) back off themselves.
* the blocking client (XREADGROUP BLOCK, pub/sub) gets a read timeout longer than its BLOCK so the
  socket timeout never cuts a healthy blocking read (see channels_redis#422, docket#425).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from importlib.resources import files
from typing import Any, TypeAlias

from redis import exceptions as redis_exceptions
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio import connection as redis_connection
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from shared.autopipeline import AutoPipeline
from shared.config import CommonConfig
from shared.errors import StoreUnavailable

RedisClient: TypeAlias = "Redis | RedisCluster"


def _connect_timeout_s(cfg: CommonConfig) -> float:
    return min(cfg.redis_timeout_s, 2.0)


def _common_options(cfg: CommonConfig, read_timeout_s: float) -> dict[str, Any]:
    return {
        "socket_timeout": read_timeout_s,
        "socket_connect_timeout": _connect_timeout_s(cfg),
        "retry": Retry(NoBackoff(), 0),
        "protocol": 2,
        "decode_responses": False,
    }


def create_redis(cfg: CommonConfig, *, blocking_read_ms: int | None = None, max_connections: int = 256) -> RedisClient:
    """A client for ``cfg``'s Redis (standalone URL or Cluster seeds).

    ``blocking_read_ms``: the longest BLOCK this client will issue; its read timeout is set above it.
    """
    read_timeout = cfg.redis_timeout_s if blocking_read_ms is None else blocking_read_ms / 1000 + cfg.redis_timeout_s
    options = _common_options(cfg, read_timeout)
    if cfg.redis_cluster:
        nodes = []
        for seed in cfg.redis_cluster:
            host, _, port = seed.rpartition(":")
            nodes.append(ClusterNode(host or "127.0.0.1", int(port)))
        # On MOVED, patch the one slot from the redirect instead of rebuilding the topology every 5th
        # time (redis-py's default): a rebuild closes every node connection, with other commands'
        # writes in flight on them, and in a failover each of those fails. Measured: 9 CLUSTER
        # FAILOVERs under 8 senders of batches, 65 and 74 of about 5,300 requests answered 503 with the
        # default, none with this. A lost node (ConnectionError) still triggers a full rebuild.
        return RedisCluster(startup_nodes=nodes, max_connections=max_connections, reinitialize_steps=0, **options)
    # A blocking pool makes a burst of concurrent requests wait (up to the command timeout) for a free
    # connection instead of failing with MaxConnectionsError.
    pool = BlockingConnectionPool.from_url(
        cfg.redis_url, max_connections=max_connections, timeout=cfg.redis_timeout_s, **options
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() disconnects it


def create_standalone(cfg: CommonConfig, *, host: str, port: int, max_connections: int = 64) -> Redis:
    """A standalone client to one server of ``cfg``'s deployment (e.g. a cluster primary), same options."""
    pool = BlockingConnectionPool(
        host=host,
        port=port,
        max_connections=max_connections,
        timeout=cfg.redis_timeout_s,
        **_common_options(cfg, cfg.redis_timeout_s),
    )
    return Redis.from_pool(pool)


def create_autopipeline(
    cfg: CommonConfig, *, blocking_read_ms: int | None = None, reads_in_flight: int = 1
) -> AutoPipeline | None:
    """A lean coalescing connection (send path, stream reads), same timeouts as the command client;
    ``None`` for a Redis Cluster, where redis-py's cluster client routes commands per slot instead.

    ``blocking_read_ms``: the longest BLOCK this connection will issue, ``reads_in_flight`` of them at
    a time (Redis runs them one after the other); its timeout is set above their sum.
    """
    if cfg.redis_cluster:
        return None
    timeout = cfg.redis_timeout_s
    if blocking_read_ms is not None:
        timeout += blocking_read_ms * reads_in_flight / 1000
    return AutoPipeline(cfg.redis_url, timeout_s=timeout, connect_timeout_s=_connect_timeout_s(cfg))


def is_cluster(client: RedisClient) -> bool:
    return isinstance(client, RedisCluster)


def describe_target(cfg: CommonConfig) -> str:
    """Where Redis is, for logs, without credentials."""
    if cfg.redis_cluster:
        return "cluster:" + ",".join(cfg.redis_cluster)
    url = cfg.redis_url
    if "@" in url:
        scheme, _, rest = url.partition("://")
        url = f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


def lua_source(name: str) -> str:
    """The text of ``shared/lua/<name>.lua`` (each file documents its KEYS and ARGV)."""
    return (files("shared") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    redis_exceptions.ConnectionError,
    redis_exceptions.TimeoutError,
    redis_exceptions.BusyLoadingError,
    redis_exceptions.ClusterDownError,
    redis_exceptions.TryAgainError,
    redis_exceptions.MasterDownError,
    redis_exceptions.ReadOnlyError,
    OSError,
)


# redis-py 8.1's asyncio cluster client closes every node connection when it rebuilds the topology
# (on CLUSTERDOWN or a lost node; on MOVED too, unless ``reinitialize_steps=0`` as create_redis sets),
# also the ones other commands are writing on at that moment, and a pooled connection the server has
# reset is written to without a check. The write then fails with the event loop's or the stream's own
# error instead of ConnectionError: under uvloop
# RuntimeError("... the handler is closed"), else AttributeError or TypeError on the writer that is
# gone (redis-py#4287; seen here in cluster failovers). redis-py 8.2 (#4288) checks the transport first
# and raises ConnectionError, which needs nothing of this; the check stays for the older releases that
# pyproject's range allows. The command was not sent, so that is "not available now", like a reset; any
# other error of those types is a bug and stays one.
_REDIS_CONNECTION_FILE = redis_connection.__file__
_WRITE_FUNCTIONS = frozenset({"send_packed_command", "_send_packed_command"})


def _write_on_closed_connection(error: BaseException) -> bool:
    if not isinstance(error, (RuntimeError, AttributeError, TypeError)):
        return False
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in _WRITE_FUNCTIONS and code.co_filename == _REDIS_CONNECTION_FILE:
            return True
        tb = tb.tb_next
    return False


def is_unavailable(error: BaseException) -> bool:
    """Whether ``error`` means "Redis not reachable right now": one of :data:`UNAVAILABLE_ERRORS`, or
    redis-py's write of a command on a connection that had already been closed."""
    return isinstance(error, UNAVAILABLE_ERRORS) or _write_on_closed_connection(error)


def unavailable(error: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"redis unavailable: {type(error).__name__}: {error}")


@contextmanager
def store_errors() -> Iterator[None]:
    """Turns the Redis errors that mean "not reachable right now" into :class:`StoreUnavailable`."""
    try:
        yield
    except Exception as e:
        if is_unavailable(e):
            raise unavailable(e) from e
        raise


OpGuard: TypeAlias = Callable[[str], AbstractContextManager[None]]
"""Wraps one named Redis operation: translates unavailability errors (and, in services, times it).

A plain context manager around the awaited call (``with guard(op): await ...``): its enter and exit
are synchronous work, and an async one would cost two coroutines per Redis call on the send path."""


def untimed(op: str) -> AbstractContextManager[None]:
    """The :data:`OpGuard` used when no metrics are wanted (tools, tests)."""
    return store_errors()
