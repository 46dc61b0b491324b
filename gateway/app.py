"""The gateway service: accepts WebSockets, registers presence, delivers messages.

``Gateway`` owns every background task and Redis pool; ``create_app`` wires it into aiohttp with a
``cleanup_ctx`` (start on startup, stop on cleanup) and ``on_shutdown`` for the drain.

Shutdown order (SIGTERM, aiohttp's sequence, centrifuge ``Node.Shutdown``):
1. mark draining: ``/readyz`` fails, new upgrades get 503, the node leaves the registry so no sender
   pushes here any more;
2. remove this node's presence entries, then close every socket with 1012 (service restart), spread
   over ``drain_window_s`` so that clients do not all reconnect to one node at the same instant;
3. stop the heartbeat and the inbound reader;
4. close the Redis pools.
``stop()`` is idempotent. The whole sequence is bounded by ``shutdown_timeout_s``; Kubernetes'
``terminationGracePeriodSeconds`` must be larger (see README).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry

from gateway.connection import Connection, Outlet, RateLimiter, WebSocketOutlet
from gateway.heartbeat import Heartbeat
from gateway.hub import ConnectionHub
from gateway.sockjs import SockJSEndpoint, SockJSSession
from gateway.stomp import STOMP_SUBPROTOCOLS, StompSession
from gateway.stream_reader import STREAM_READS_IN_FLIGHT, BroadcastReader, InboundReader, NodeStreamReader
from shared.auth import Identity, TokenVerifier, bearer
from shared.autopipeline import AutoPipeline
from shared.config import DRAIN_FLUSH_S, GatewayConfig
from shared.envelope import Envelope
from shared.errors import AuthError, InvalidRequest, StoreUnavailable
from shared.http import json_error, json_response
from shared.keys import Keys
from shared.logs import get_logger
from shared.mailbox import SequenceState
from shared.metrics import CONTENT_TYPE_LATEST, Metrics
from shared.nodes import NodeInfo
from shared.protocol import SUBPROTOCOLS, CloseCode, ErrorCode, FrameCodec, codec_for, error_frame, parse_send
from shared.redis import RedisClient, create_autopipeline, create_redis, describe_target
from shared.routing import Message, Sender
from shared.runtime import stop_task
from shared.store import Store

log = get_logger("beeline.gateway")

MAX_REF_LEN: Final = 256
HANDSHAKE_DONE: Final = "beeline.handshake_done"
RESYNC_BATCH: Final = 500
"""Users whose sequence state one pipelined round trip fetches when a node resyncs after a lapse."""


class Gateway:
    """One gateway node: Redis pools, presence, heartbeat, inbound reader, local connections."""

    def __init__(self, cfg: GatewayConfig, *, registry: CollectorRegistry | None = None) -> None:
        self.cfg = cfg
        self.node_id = cfg.node_id
        self.metrics = Metrics(registry or CollectorRegistry(), service="gateway", node=cfg.node_id)
        self.hub = ConnectionHub(self.metrics)
        self.verifier = TokenVerifier(secret=cfg.jwt_secret, public_key=cfg.jwt_public_key, audience=cfg.jwt_audience)
        self.keys = Keys(cfg.key_prefix)
        self.draining = False
        self._stopped = False
        self._started_at = time.monotonic()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[object]] = set()
        self._recover_lock = asyncio.Lock()
        self._conn_counter = 0
        self._handshakes = 0  # upgrades between accept and welcome (admission control for storms)
        self._store: Store | None = None
        self._blocking: RedisClient | None = None
        self._stream_connection: AutoPipeline | None = None
        self.sockjs = SockJSEndpoint(
            cfg.sockjs_path,
            self._serve_sockjs,
            heartbeat_s=cfg.sockjs_heartbeat_s,
            disconnect_delay_s=cfg.sockjs_disconnect_delay_s,
            max_message_bytes=cfg.max_frame_bytes,
            max_sessions=cfg.max_connections,
            raw_websocket=self._serve_raw_stomp,
            authorize=self._admit_sockjs,
        )

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.cfg
        self._store = store = Store.open(cfg, self.keys, self.metrics)
        redis = store.redis
        self._blocking = blocking = create_redis(cfg, blocking_read_ms=cfg.stream_block_ms, max_connections=4)
        self._stream_connection = create_autopipeline(
            cfg, blocking_read_ms=cfg.stream_block_ms, reads_in_flight=STREAM_READS_IN_FLIGHT
        )
        self.mailbox, self.presence, self.registry = store.mailbox, store.presence, store.nodes
        self.sender = Sender(
            self.mailbox,
            self.registry,
            store.delivery,
            max_payload_bytes=cfg.max_payload_bytes,
            local_node=self.node_id,
            local_handoff=self.hub.handoff,
            metrics=self.metrics,
            push_in_append=store.push_in_append,
        )
        self.reader: InboundReader
        if cfg.routing == "broadcast":
            self.reader = BroadcastReader(
                blocking_redis=blocking,
                keys=self.keys,
                node_id=self.node_id,
                hub=self.hub,
                block_ms=cfg.stream_block_ms,
            )
        else:
            self.reader = NodeStreamReader(
                redis=redis,
                blocking_redis=blocking,
                stream_connection=self._stream_connection,
                keys=self.keys,
                node_id=self.node_id,
                hub=self.hub,
                metrics=self.metrics,
                batch=cfg.stream_batch,
                block_ms=cfg.stream_block_ms,
                on_stream_lost=self.recover,
            )
        self.heartbeat = Heartbeat(
            registry=self.registry,
            presence=self.presence,
            node_id=self.node_id,
            interval_s=cfg.heartbeat_interval_s,
            info=self._node_info,
            on_lost=self.recover,
        )
        with self.metrics.redis_op("node_start"):
            # A previous incarnation with this node id (a restarted pod) may have left entries behind.
            await self.presence.reap(self.node_id)
            await self.reader.prepare()
        await self.heartbeat.beat(initial=True)
        self._heartbeat_task = asyncio.create_task(self.heartbeat.run(), name="heartbeat")
        self._reader_task = asyncio.create_task(
            self._supervise(self.reader.run, "inbound-reader"), name="inbound-reader"
        )
        log.info(
            "gateway_started", node_id=self.node_id, routing=cfg.routing, redis=describe_target(cfg), port=cfg.port
        )

    async def _supervise(self, run: Callable[[], Awaitable[None]], name: str) -> None:
        # The reader handles Redis outages itself; anything else is a bug: log it and restart the loop
        # after a pause rather than leave a node that accepts sockets but delivers nothing.
        while True:
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task_crashed", node_id=self.node_id, task=name)
                await asyncio.sleep(1.0)

    async def _node_info(self) -> NodeInfo:
        lag = 0
        with contextlib.suppress(Exception):
            lag = await self.reader.lag()
        self.metrics.stream_lag.labels(self.node_id).set(lag)
        if self._store is not None:
            # One O(1) XLEN per beat: the heartbeat's cost stays constant per node.
            with contextlib.suppress(StoreUnavailable):
                with self.metrics.redis_op("stream_length"):
                    length = await self._store.redis.xlen(self.keys.node_stream(self.node_id))
                self.metrics.stream_length.labels(self.node_id).set(length)
        return NodeInfo(node_id=self.node_id, connections=len(self.hub), stream_lag=lag, draining=self.draining)

    async def recover(self) -> None:
        """Re-registers every local connection and resyncs each from its mailbox (Redis lost state)."""
        async with self._recover_lock:
            # Order matters: the stream must exist before presence says "push here", and every
            # connection is resynced after presence is back, so a message is either pushed or read.
            with self.metrics.redis_op("stream_ensure"):
                await self.reader.ensure_stream()
            counts = self.hub.counts()
            await self.presence.restore(self.node_id, counts)
            users = list(counts)
            for start in range(0, len(users), RESYNC_BATCH):
                states = await self.mailbox.open_many(users[start : start + RESYNC_BATCH])
                for user_id, state in states.items():
                    for conn in self.hub.connections_of(user_id):
                        conn.resync(state)
            log.info("node_recovered", node_id=self.node_id, users=len(counts), connections=len(self.hub))

    async def drain(self) -> None:
        """Steps 1-2 of the shutdown order; safe to call more than once."""
        if self.draining:
            return
        self.draining = True
        log.info("gateway_draining", node_id=self.node_id, connections=len(self.hub))
        # No more beats: a beat would put the node back in the registry.
        await stop_task(self._heartbeat_task)
        with contextlib.suppress(StoreUnavailable):
            await self.registry.leave(self.node_id)
            await self.presence.reap(self.node_id, keep_stream=True)
        conns = list(self.hub.connections())
        window = self.cfg.drain_window_s

        async def close_later(conn: Connection) -> None:
            await asyncio.sleep(random.uniform(0, window) if window > 0 else 0)
            await conn.flush_and_close(CloseCode.SERVICE_RESTART, timeout_s=DRAIN_FLUSH_S)

        await asyncio.gather(*(close_later(c) for c in conns), return_exceptions=True)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        # The whole stop fits in BEELINE_SHUTDOWN_TIMEOUT_SECONDS (the Kubernetes grace contract in the
        # README): the drain gets most of it, the cleanup after it the rest, and each step is bounded.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.shutdown_timeout_s
        try:
            await asyncio.wait_for(self.drain(), timeout=self.cfg.drain_timeout_s)
        except TimeoutError:
            log.warning("drain_timed_out", node_id=self.node_id)
        try:
            async with asyncio.timeout_at(deadline):
                await stop_task(self._heartbeat_task)
                await stop_task(self._reader_task)
                await self.sockjs.close()
                with contextlib.suppress(StoreUnavailable):
                    await self.presence.reap(self.node_id)  # now the stream too: nobody reads it any more
                if self._handlers:
                    await asyncio.wait(self._handlers, timeout=2.0)
        except TimeoutError:
            log.warning("stop_timed_out", node_id=self.node_id)
        if self._blocking is not None:
            await self._blocking.aclose()
        if self._stream_connection is not None:
            await self._stream_connection.aclose()
        if self._store is not None:
            await self._store.aclose()
        log.info("gateway_stopped", node_id=self.node_id)

    # -- connections -------------------------------------------------------------------------------
    def authenticate(self, request: web.Request) -> Identity:
        token = bearer(request.headers.get("Authorization")) or request.query.get("token")
        if not token:
            raise AuthError("missing token")
        return self.verifier.verify(token)

    def next_conn_id(self) -> str:
        self._conn_counter += 1
        return f"{self.node_id}-{os.getpid():x}-{self._conn_counter:x}"

    async def serve(self, request: web.Request, *, stomp: bool = False) -> web.StreamResponse:
        """``GET /ws``: authenticate, upgrade, register, catch up, then read frames until close. STOMP
        when the client offers only STOMP subprotocols (or ``stomp``: the raw SockJS websocket)."""
        cfg = self.cfg
        if self.draining:
            return json_error(503, "draining", "this node is draining; connect to another", retry_after=1)
        if self._handshakes >= cfg.max_pending_handshakes:
            # A reconnect storm: shed before any work (token check, Redis) with a cheap, clear 503, so
            # the handshakes in progress finish quickly and the rest retry after a jittered backoff.
            self.metrics.reject("busy")
            return json_error(503, "busy", "too many connections being set up; retry shortly", retry_after=1)
        self._handshakes += 1
        try:
            if stomp or _wants_stomp(request):
                return await self._upgrade_stomp(request)
            return await self._upgrade(request)
        finally:
            self._handshake_done(request)

    def _handshake_done(self, request: web.Request) -> None:
        if request.get(HANDSHAKE_DONE) is None:
            request[HANDSHAKE_DONE] = True
            self._handshakes -= 1

    async def _upgrade(self, request: web.Request) -> web.StreamResponse:
        cfg = self.cfg
        try:
            identity = self.authenticate(request)
        except AuthError as e:
            self.metrics.reject("unauthorized")
            return json_error(401, "unauthorized", str(e))
        if len(self.hub) >= cfg.max_connections:
            self.metrics.reject("over_capacity")
            return json_error(503, "over_capacity", "connection limit reached on this node", retry_after=2)
        try:
            since, since_epoch = _parse_since(request)
        except InvalidRequest as e:
            return json_error(400, e.code, e.message)
        ws = self.websocket(SUBPROTOCOLS)
        await ws.prepare(request)
        codec = codec_for(ws.ws_protocol)
        conn = self.connection(identity.user_id, WebSocketOutlet(ws, request.transport, binary=codec.binary), codec)

        async def serve(conn: Connection, state: SequenceState) -> None:
            conn.send_frame(
                {
                    "type": "welcome",
                    "node": self.node_id,
                    "user": conn.user_id,
                    "conn": conn.conn_id,
                    "epoch": state.epoch,
                }
            )
            resume = since is not None and (since_epoch in (None, state.epoch)) and since <= state.last_seq
            conn.begin(state, since if resume and since is not None else state.acked)
            self._handshake_done(request)
            await self._read_frames(conn, ws)

        async with self.handler():
            await self.run_connection(conn, identity, serve)
        return ws

    async def _upgrade_stomp(self, request: web.Request) -> web.StreamResponse:
        identity, refusal = self._check_stomp_upgrade(request)
        if refusal is not None:
            return refusal
        ws = self.websocket(STOMP_SUBPROTOCOLS)
        await ws.prepare(request)
        session = StompSession(
            self,
            WebSocketOutlet(ws, request.transport, binary=False),
            _inbound_bytes(ws),
            protocol="stomp",
            identity=identity,
            cookie_token=request.cookies.get(self.cfg.token_cookie),
            established=lambda: self._handshake_done(request),
        )
        async with self.handler():
            await session.run()
        return ws

    def _upgrade_identity(self, request: web.Request) -> Identity | None:
        token = bearer(request.headers.get("Authorization")) or request.query.get("token")
        return self.verifier.verify(token) if token else None

    def _check_stomp_upgrade(self, request: web.Request) -> tuple[Identity | None, web.Response | None]:
        """The identity of a token on a STOMP upgrade (None: no token, the CONNECT frame or the cookie
        must carry one), or the answer refusing it as on /ws: 401 for a bad token, 503 when full."""
        try:
            identity = self._upgrade_identity(request)
        except AuthError as e:
            self.metrics.reject("unauthorized")
            return None, json_error(401, "unauthorized", str(e))
        if len(self.hub) >= self.cfg.max_connections:
            self.metrics.reject("over_capacity")
            return None, json_error(503, "over_capacity", "connection limit reached on this node", retry_after=2)
        return identity, None

    def _admit_sockjs(self, request: web.Request) -> web.StreamResponse | None:
        """Before a SockJS session opens: the same refusals as an upgrade of ``/ws``."""
        if self.draining:
            return json_error(503, "draining", "this node is draining; connect to another", retry_after=1)
        return self._check_stomp_upgrade(request)[1]

    async def _serve_sockjs(self, session: SockJSSession) -> None:
        request = session.request
        try:
            identity = self._upgrade_identity(request)
        except AuthError:
            identity = None  # refused by _admit_sockjs already; the CONNECT must authenticate then
        stomp = StompSession(
            self,
            session,
            session.inbound(),
            protocol=f"sockjs-{session.transport}",
            identity=identity,
            cookie_token=request.cookies.get(self.cfg.token_cookie),
        )
        async with self.handler():
            await stomp.run()

    async def _serve_raw_stomp(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, stomp=True)

    def websocket(self, protocols: tuple[str, ...]) -> web.WebSocketResponse:
        """A WebSocket response with the gateway's limits: ping interval, largest inbound frame."""
        cfg = self.cfg
        return web.WebSocketResponse(
            protocols=protocols, heartbeat=cfg.ping_interval_s, max_msg_size=cfg.max_frame_bytes, compress=False
        )

    def connection(
        self, user_id: str, outlet: Outlet, codec: FrameCodec, *, protocol: str = "beeline", **options: Any
    ) -> Connection:
        """A new connection of ``user_id`` on this node, not yet registered (see :meth:`run_connection`)."""
        cfg = self.cfg
        return Connection(
            conn_id=self.next_conn_id(),
            user_id=user_id,
            outlet=outlet,
            codec=codec,
            metrics=self.metrics,
            read_mailbox=lambda user, after, count: self.mailbox.read(user, after, count=count),
            max_frames=cfg.outbound_max_frames,
            max_bytes=cfg.outbound_max_bytes,
            protocol=protocol,
            **options,
        )

    @contextlib.asynccontextmanager
    async def handler(self) -> AsyncIterator[None]:
        """Marks the current task as a connection handler, which stop() waits for."""
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            yield
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def run_connection(
        self, conn: Connection, identity: Identity, serve: Callable[[Connection, SequenceState], Awaitable[None]]
    ) -> None:
        """The life of one connection, whatever its protocol: registers it (hub and presence), opens the
        user's sequence, runs ``serve`` (the protocol: greeting, start point, inbound frames) until the
        connection ends, closes it at token expiry, then unregisters it."""
        registered = False
        self.hub.add(conn)
        self.metrics.connects.labels(self.node_id, conn.protocol).inc()
        expiry = asyncio.get_running_loop().call_later(
            max(0.0, identity.expires_at - time.time()), conn.close, CloseCode.TOKEN_EXPIRED, "token expired"
        )
        reason = "client"
        try:
            try:
                await self.presence.register(conn.user_id, self.node_id)
                registered = True
                state = await self.mailbox.open(conn.user_id)
            except StoreUnavailable:
                reason = "unavailable"
                conn.close(CloseCode.TRY_AGAIN_LATER, "store unavailable")
                await conn.wait_closed()
                return
            await serve(conn, state)
            reason = _close_reason(conn)
        finally:
            expiry.cancel()
            self.hub.remove(conn)
            if registered:
                with contextlib.suppress(StoreUnavailable):
                    await self.presence.unregister(conn.user_id, self.node_id)
            await conn.release()
            self.metrics.disconnects.labels(self.node_id, reason).inc()

    def rate_limiter(self) -> RateLimiter:
        return RateLimiter(self.cfg.rate_limit_per_s, self.cfg.rate_limit_burst)

    async def _read_frames(self, conn: Connection, ws: web.WebSocketResponse) -> None:
        limiter = self.rate_limiter()
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                if not limiter.allow():
                    self._reject(conn, ErrorCode.RATE_LIMITED, "over the per-connection rate limit", None)
                    continue
                await self._handle_frame(conn, msg.data)
            elif msg.type == WSMsgType.ERROR:
                break

    async def _handle_frame(self, conn: Connection, data: str | bytes) -> None:
        ref: object = None
        try:
            frame = conn.codec.decode(data)
            ref = frame.get("ref")
            kind = frame.get("type")
            if kind == "send":
                await self._handle_send(conn, frame)
            elif kind == "ack":
                await self._handle_ack(conn, frame)
            elif kind in ("subscribe", "unsubscribe"):
                channel = frame.get("channel")
                if not isinstance(channel, str) or not channel:
                    raise InvalidRequest(ErrorCode.INVALID_FIELD, "channel must be a non-empty string")
                if kind == "subscribe":
                    conn.subscribe(channel)
                else:
                    conn.unsubscribe(channel)
            else:
                raise InvalidRequest(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind!r}")
        except InvalidRequest as e:
            self._reject(conn, e.code, e.message, ref)
        except StoreUnavailable:
            self._reject(conn, ErrorCode.UNAVAILABLE, "message store unavailable; nothing was sent, retry", ref)
        except Exception:
            log.exception("frame_failed", node_id=self.node_id, user_id=conn.user_id, conn_id=conn.conn_id)
            self._reject(conn, ErrorCode.INTERNAL, "internal error", ref)

    def _reject(self, conn: Connection, code: str, message: str, ref: object) -> None:
        self.metrics.reject(code)
        conn.send_frame(error_frame(code, message, ref if _valid_ref(ref) else None))

    async def _handle_send(self, conn: Connection, frame: dict[str, object]) -> None:
        ref = frame.get("ref")
        if not _valid_ref(ref):
            raise InvalidRequest(ErrorCode.INVALID_FIELD, "ref must be a string or an integer")
        request = parse_send(frame, max_receivers=self.cfg.max_receivers)
        envelope = Envelope.create(sender=conn.user_id, channel=request.channel, payload=request.payload)
        [results] = await self.sender.send([Message(envelope, request.to)])
        conn.send_frame({"type": "sent", "ref": ref, "id": envelope.msg_id, "results": [r.as_json() for r in results]})

    async def _handle_ack(self, conn: Connection, frame: dict[str, object]) -> None:
        seq = frame.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise InvalidRequest(ErrorCode.INVALID_FIELD, "seq must be a non-negative integer")
        if conn.epoch is None:
            return
        limit = conn.ack_limit(seq)
        if limit > 0:
            await self.mailbox.ack(conn.user_id, conn.epoch, limit)


def _valid_ref(ref: object) -> bool:
    return (
        ref is None
        or (isinstance(ref, str) and len(ref) <= 256)
        or (isinstance(ref, int) and not isinstance(ref, bool))
    )


def _wants_stomp(request: web.Request) -> bool:
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    return not any(p in SUBPROTOCOLS for p in offered) and any(p in STOMP_SUBPROTOCOLS for p in offered)


async def _inbound_bytes(ws: web.WebSocketResponse) -> AsyncIterator[bytes]:
    """A STOMP WebSocket's inbound data: text and binary messages alike, as bytes, until the close."""
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            yield msg.data.encode()
        elif msg.type == WSMsgType.BINARY:
            yield msg.data
        elif msg.type == WSMsgType.ERROR:
            return


def _close_reason(conn: Connection) -> str:
    return {
        CloseCode.SLOW_CONSUMER: "slow_consumer",
        CloseCode.SERVICE_RESTART: "drain",
        CloseCode.DISCONNECTED_BY_ADMIN: "admin",
        CloseCode.TOKEN_EXPIRED: "token_expired",
    }.get(conn.close_code or 0, "client")


def _parse_since(request: web.Request) -> tuple[int | None, str | None]:
    raw = request.query.get("since")
    epoch = request.query.get("epoch") or None
    if raw is None or raw == "":
        return None, epoch
    try:
        since = int(raw)
    except ValueError:
        raise InvalidRequest(ErrorCode.INVALID_FIELD, "since must be a non-negative integer") from None
    if since < 0:
        raise InvalidRequest(ErrorCode.INVALID_FIELD, "since must be a non-negative integer")
    return since, epoch


GATEWAY_KEY: Final = web.AppKey("gateway", Gateway)


async def _healthz(_request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    if gateway.draining:
        return json_error(503, "draining", "node is draining")
    try:
        with gateway.metrics.redis_op("ping"):
            await gateway.registry.refresh()
    except StoreUnavailable:
        return json_error(503, "unavailable", "redis unavailable", retry_after=1)
    return json_response({"status": "ready", "node": gateway.node_id})


async def _metrics(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    return web.Response(body=gateway.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _ws(request: web.Request) -> web.StreamResponse:
    return await request.app[GATEWAY_KEY].serve(request)


def create_app(cfg: GatewayConfig, *, registry: CollectorRegistry | None = None) -> web.Application:
    """The gateway's aiohttp application; the ``Gateway`` lives under ``GATEWAY_KEY``."""
    app = web.Application()
    gateway = Gateway(cfg, registry=registry)
    app[GATEWAY_KEY] = gateway

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await gateway.start()
        yield
        await gateway.stop()

    async def on_shutdown(_app: web.Application) -> None:
        await gateway.drain()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/ws", _ws)
    gateway.sockjs.add_routes(app)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app
