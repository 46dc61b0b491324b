"""Typed, frozen configuration, read from the environment and command-line flags in exactly one place.

Every setting is a dataclass field whose metadata names its environment variable and flag; flags
override variables, variables override defaults. Invariants are checked at load, so a bad setting
stops the process at start rather than misbehaving later.
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

from shared.errors import ConfigError

Routing = Literal["routed", "broadcast"]
LogLevel = Literal["debug", "info", "warning", "error"]
EventLoop = Literal["auto", "uvloop", "asyncio"]

DRAIN_SHARE: Final = 0.7
"""Share of BEELINE_SHUTDOWN_TIMEOUT_SECONDS a gateway's drain may use; the cleanup after it gets the rest."""
DRAIN_FLUSH_S: Final = 1.0
"""How long the drain lets each socket flush its queue before the 1012 close."""
DEFAULT_MAILBOX_MAX: Final = 10_000
DEFAULT_MAILBOX_TTL_S: Final = 7 * 24 * 3600


def _setting(default: Any, env: str, help: str, *, factory: Any = None) -> Any:
    meta = {"env": env, "help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True, slots=True)
class CommonConfig:
    """Settings both services share: where Redis is, where to listen, the delivery model's limits."""

    redis_url: str = _setting("redis://127.0.0.1:6379/0", "BEELINE_REDIS_URL", "redis:// or rediss:// URL")
    redis_cluster: tuple[str, ...] = _setting(
        (), "BEELINE_REDIS_CLUSTER", "comma-separated host:port seeds of a Redis Cluster (overrides the URL)"
    )
    host: str = _setting("127.0.0.1", "BEELINE_HOST", "address to listen on")
    port: int = _setting(0, "BEELINE_PORT", "port to listen on (gateway 8080, router 8090)")
    key_prefix: str = _setting("beeline", "BEELINE_KEY_PREFIX", "prefix of every Redis key")
    heartbeat_interval_s: float = _setting(
        5.0, "BEELINE_HEARTBEAT_SECONDS", "node heartbeat interval; a node is dead after 2 missed beats"
    )
    routing: Routing = _setting("routed", "BEELINE_ROUTING", "routed or broadcast")
    mailbox_max: int = _setting(DEFAULT_MAILBOX_MAX, "BEELINE_MAILBOX_MAX", "messages kept per user mailbox")
    mailbox_ttl_s: int = _setting(
        DEFAULT_MAILBOX_TTL_S, "BEELINE_MAILBOX_TTL_SECONDS", "mailbox lifetime after the last message"
    )
    log_level: LogLevel = _setting("info", "BEELINE_LOG_LEVEL", "debug, info, warning or error")
    log_format: Literal["json", "console"] = _setting("json", "BEELINE_LOG_FORMAT", "json or console")
    max_payload_bytes: int = _setting(64 * 1024, "BEELINE_MAX_PAYLOAD_BYTES", "largest packed message")
    max_receivers: int = _setting(1000, "BEELINE_MAX_RECEIVERS", "receivers per send")
    redis_timeout_s: float = _setting(2.0, "BEELINE_REDIS_TIMEOUT_SECONDS", "Redis command timeout")
    durable_replicas: int = _setting(
        0, "BEELINE_DURABLE_REPLICAS", "replicas that must acknowledge each mailbox append (WAIT); 0: off"
    )
    durable_timeout_ms: int = _setting(200, "BEELINE_DURABLE_TIMEOUT_MS", "how long a send waits for them")
    stream_maxlen: int = _setting(100_000, "BEELINE_STREAM_MAXLEN", "approximate cap of each node stream")
    event_loop: EventLoop = _setting(
        "auto", "BEELINE_EVENT_LOOP", "uvloop, asyncio, or auto (uvloop when installed: it is on Linux)"
    )

    @property
    def node_dead_after_s(self) -> float:
        """A node whose last heartbeat is older than this is dead (2 missed beats)."""
        return 2 * self.heartbeat_interval_s

    @property
    def node_key_ttl_s(self) -> float:
        """TTL of a node's stream/info/member keys, refreshed each beat: they vanish soon after a death."""
        return max(3.0, 6 * self.heartbeat_interval_s)

    def _check_common(self) -> None:
        if self.heartbeat_interval_s <= 0:
            raise ConfigError("BEELINE_HEARTBEAT_SECONDS must be > 0")
        if self.routing not in ("routed", "broadcast"):
            raise ConfigError("BEELINE_ROUTING must be 'routed' or 'broadcast'")
        if self.event_loop not in ("auto", "uvloop", "asyncio"):
            raise ConfigError("BEELINE_EVENT_LOOP must be auto, uvloop or asyncio")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError("BEELINE_LOG_LEVEL must be debug, info, warning or error")
        if self.mailbox_max < 1 or self.mailbox_ttl_s < 1:
            raise ConfigError("BEELINE_MAILBOX_MAX and BEELINE_MAILBOX_TTL_SECONDS must be >= 1")
        if self.durable_replicas < 0 or self.durable_timeout_ms < 1:
            raise ConfigError("BEELINE_DURABLE_REPLICAS must be >= 0 and BEELINE_DURABLE_TIMEOUT_MS >= 1")
        if self.durable_timeout_ms >= self.redis_timeout_s * 1000:
            raise ConfigError("BEELINE_DURABLE_TIMEOUT_MS must be below the Redis command timeout")
        if self.redis_timeout_s <= 0:
            raise ConfigError("BEELINE_REDIS_TIMEOUT_SECONDS must be > 0")
        if not 0 <= self.port < 65536:
            raise ConfigError("BEELINE_PORT must be a TCP port")


@dataclass(frozen=True, slots=True)
class GatewayConfig(CommonConfig):
    """Gateway node settings."""

    node_id: str = _setting("", "BEELINE_NODE_ID", "gateway node id (default: the hostname)")
    jwt_secret: str = _setting("", "BEELINE_JWT_SECRET", "HS256 secret for client tokens")
    jwt_public_key: str = _setting("", "BEELINE_JWT_PUBLIC_KEY", "PEM public key (or @path) for RS256 tokens")
    jwt_audience: str = _setting("", "BEELINE_JWT_AUDIENCE", "required token `aud` (unset: any aud accepted)")
    max_frame_bytes: int = _setting(128 * 1024, "BEELINE_MAX_FRAME_BYTES", "largest inbound client frame")
    outbound_max_frames: int = _setting(1024, "BEELINE_OUTBOUND_MAX_FRAMES", "queued frames per connection")
    outbound_max_bytes: int = _setting(
        2 * 1024 * 1024, "BEELINE_OUTBOUND_MAX_BYTES", "queued bytes per connection before a slow close"
    )
    rate_limit_per_s: float = _setting(100.0, "BEELINE_RATE_LIMIT_PER_SECOND", "inbound frames/s per connection")
    rate_limit_burst: int = _setting(200, "BEELINE_RATE_LIMIT_BURST", "inbound frame burst per connection")
    ping_interval_s: float = _setting(20.0, "BEELINE_PING_SECONDS", "WebSocket ping interval (pong timeout too)")
    max_connections: int = _setting(100_000, "BEELINE_MAX_CONNECTIONS", "connections before HTTP 503")
    max_pending_handshakes: int = _setting(
        256, "BEELINE_MAX_PENDING_HANDSHAKES", "upgrades being set up at once before HTTP 503 busy"
    )
    drain_window_s: float = _setting(2.0, "BEELINE_DRAIN_WINDOW_SECONDS", "closes on drain are spread over this")
    shutdown_timeout_s: float = _setting(10.0, "BEELINE_SHUTDOWN_TIMEOUT_SECONDS", "bound on graceful stop")
    stream_block_ms: int = _setting(1000, "BEELINE_STREAM_BLOCK_MS", "XREADGROUP BLOCK")
    stream_batch: int = _setting(512, "BEELINE_STREAM_BATCH", "XREADGROUP COUNT")
    sockjs_path: str = _setting("/chat-websocket", "BEELINE_SOCKJS_PATH", "where SockJS (STOMP over it) is served")
    token_cookie: str = _setting(
        "beeline_token", "BEELINE_TOKEN_COOKIE", "cookie holding a client token (STOMP and SockJS pages)"
    )
    stomp_heartbeat_ms: int = _setting(
        10_000, "BEELINE_STOMP_HEARTBEAT_MS", "STOMP heart-beat the gateway offers (sends and expects); 0: none"
    )
    sockjs_heartbeat_s: float = _setting(25.0, "BEELINE_SOCKJS_HEARTBEAT_SECONDS", "SockJS 'h' frame interval")
    sockjs_disconnect_delay_s: float = _setting(
        5.0, "BEELINE_SOCKJS_DISCONNECT_DELAY_SECONDS", "an xhr session with no open request is closed after this"
    )

    @classmethod
    def default_port(cls) -> int:
        return 8080

    @property
    def drain_timeout_s(self) -> float:
        """The share of the shutdown timeout the drain may use; the bounded cleanup after it gets the rest."""
        return DRAIN_SHARE * self.shutdown_timeout_s

    def check(self) -> None:
        self._check_common()
        if self.drain_window_s < 0 or self.shutdown_timeout_s <= 0:
            raise ConfigError("BEELINE_DRAIN_WINDOW_SECONDS must be >= 0 and BEELINE_SHUTDOWN_TIMEOUT_SECONDS > 0")
        if self.drain_window_s + DRAIN_FLUSH_S > self.drain_timeout_s:
            raise ConfigError(
                f"BEELINE_DRAIN_WINDOW_SECONDS ({self.drain_window_s}) must leave room in the drain's share of "
                f"BEELINE_SHUTDOWN_TIMEOUT_SECONDS ({DRAIN_SHARE:.0%} of {self.shutdown_timeout_s} s) for the "
                f"last socket's {DRAIN_FLUSH_S} s flush"
            )
        if not self.jwt_secret and not self.jwt_public_key:
            raise ConfigError("the gateway needs BEELINE_JWT_SECRET (or BEELINE_JWT_PUBLIC_KEY) to verify tokens")
        if not self.node_id or any(c in self.node_id for c in "{}:"):
            raise ConfigError("BEELINE_NODE_ID must be non-empty without '{', '}' or ':'")
        if self.outbound_max_frames < 1 or self.outbound_max_bytes < 1024:
            raise ConfigError("outbound bounds too small")
        if self.stream_block_ms < 10:
            raise ConfigError("BEELINE_STREAM_BLOCK_MS must be >= 10")
        if not self.sockjs_path.startswith("/") or self.sockjs_path.rstrip("/") in ("", "/ws"):
            raise ConfigError("BEELINE_SOCKJS_PATH must start with '/' and be neither '/' nor '/ws'")
        if self.stomp_heartbeat_ms < 0 or self.sockjs_heartbeat_s <= 0 or self.sockjs_disconnect_delay_s <= 0:
            raise ConfigError("STOMP and SockJS heart-beats and delays must be positive")


@dataclass(frozen=True, slots=True)
class RouterConfig(CommonConfig):
    """Router settings."""

    api_keys: tuple[str, ...] = _setting((), "BEELINE_API_KEYS", "comma-separated API keys")
    idempotency_window_s: int = _setting(
        24 * 3600, "BEELINE_IDEMPOTENCY_WINDOW_SECONDS", "how long an Idempotency-Key is remembered"
    )
    http_front: Literal["lean", "aiohttp"] = _setting(
        "lean", "BEELINE_HTTP_FRONT", "lean: plain sends on the fast front, the rest on aiohttp; aiohttp: all"
    )

    @classmethod
    def default_port(cls) -> int:
        return 8090

    def check(self) -> None:
        self._check_common()
        if not self.api_keys:
            raise ConfigError("the router needs at least one key in BEELINE_API_KEYS")
        if self.idempotency_window_s < 1:
            raise ConfigError("BEELINE_IDEMPOTENCY_WINDOW_SECONDS must be >= 1")
        if self.http_front not in ("lean", "aiohttp"):
            raise ConfigError("BEELINE_HTTP_FRONT must be lean or aiohttp")


ConfigT = TypeVar("ConfigT", GatewayConfig, RouterConfig)


def _flag(f: dataclasses.Field[Any]) -> str:
    return "--" + f.name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls: type[GatewayConfig] | type[RouterConfig]) -> None:
    """Adds one flag per setting (defaults are None so that unset flags fall through to the env)."""
    for f in dataclasses.fields(cls):
        parser.add_argument(_flag(f), dest=f.name, default=None, help=f"{f.metadata['help']} [{f.metadata['env']}]")


def _convert(f: dataclasses.Field[Any], raw: str) -> object:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("tuple"):
            return _csv(raw)
    except ValueError as e:
        raise ConfigError(f"{f.metadata['env']}={raw!r} is not a valid {kind}") from e
    return raw.strip()


def load(
    cls: type[ConfigT], env: Mapping[str, str], args: argparse.Namespace | None = None, **overrides: Any
) -> ConfigT:
    """Builds ``cls`` from defaults < environment < flags < keyword overrides, then checks invariants."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None:
            raw = env.get(f.metadata["env"])
        if raw is not None and raw != "":
            values[f.name] = _convert(f, str(raw))
    values.update(overrides)
    if not values.get("port"):
        values["port"] = cls.default_port()
    if cls is GatewayConfig and not values.get("node_id"):
        values["node_id"] = socket.gethostname()
    cfg = cls(**values)
    cfg.check()
    return cfg


def with_overrides(cfg: ConfigT, **changes: Any) -> ConfigT:
    """A copy with some settings changed, re-checked (used by tests and the demo)."""
    new = dataclasses.replace(cfg, **changes)
    new.check()
    return new


def load_cli(cls: type[ConfigT], argv: Sequence[str] | None, env: Mapping[str, str]) -> ConfigT | None:
    """Config for ``beeline gateway|router``: flags over ``env``; prints the problem and returns None."""
    try:
        return load(cls, env, parse_args(cls, argv))
    except ConfigError as e:
        print(f"beeline {'gateway' if cls is GatewayConfig else 'router'}: {e}", file=sys.stderr)
        return None


def parse_args(cls: type[GatewayConfig] | type[RouterConfig], argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"beeline {'gateway' if cls is GatewayConfig else 'router'}")
    add_flags(parser, cls)
    return parser.parse_args(argv)
