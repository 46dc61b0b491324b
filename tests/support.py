"""Test support: real redis-server processes, real gateway/router processes, WebSocket clients.

Everything binds to 127.0.0.1 on free ports, every wait has a deadline, and every process started here
is stopped by the fixture that started it (see conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.auth import mint_token

JWT_SECRET = "test-secret-" + "x" * 32
API_KEY = "test-api-key"
ROOT = Path(__file__).resolve().parent.parent
PORT_ATTEMPTS = 5
"""How many ports a redis-server (on its first start) or a service tries before the test fails."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_taken(port: int) -> bool:
    """Whether another socket listens on the loopback ``port``: judged by trying to bind it as servers do
    (SO_REUSEADDR, so a closed connection's TIME_WAIT does not count), not by any server's log wording."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class ServerExited(AssertionError):
    """A server the suite started exited instead of serving; ``port_taken`` says whether its port was
    in use by another socket when it was seen to exit."""

    def __init__(self, message: str, *, port_taken: bool) -> None:
        super().__init__(message)
        self.port_taken = port_taken


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_cluster_port(taken: set[int] | None = None) -> int:
    """A free port whose cluster bus port (+10000) is free too, as Redis Cluster requires.

    Ports come from 10000-19999 (or up to the kernel's ephemeral range, if it starts lower), so bus
    ports (20000 and up) never collide with another node's port, and the kernel's own picks for
    outgoing connections never land on either. ``taken``: ports already picked for this cluster, not
    started yet (so still free) and added to by this call. Once, in CI, a node's port was another
    node's bus port: it found it in use and exited.
    """
    import random

    high = min(19999, _ephemeral_ports_start() - 10001)
    if high < 11000:  # an ephemeral range that starts that low leaves no room below it
        high = 19999
    taken = taken if taken is not None else set()
    for _ in range(200):
        port = random.randint(10000, high)
        if port not in taken and _bindable(port) and _bindable(port + 10000):
            taken.add(port)
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> None:
    """Polls ``predicate`` until it is true; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


async def eventually(
    predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> None:
    """Async version of :func:`wait_until`; ``predicate`` may be a coroutine function (a Redis query)
    or a plain condition on the test's own state."""
    deadline = time.monotonic() + timeout
    while True:
        holds = predicate()
        if holds if isinstance(holds, bool) else await holds:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


def proc_stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, ...; Linux). The name
    may hold spaces or parentheses, so the split is after the last ")". Raises OSError if it is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def alive(pid: int) -> bool:
    """Running (a zombie, waiting for its parent to reap it, counts as gone)."""
    try:
        return proc_stat_fields(pid)[0] != "Z"
    except OSError:
        return False


def http_ok(url: str) -> bool:
    """GET ``url`` answers 200 within a second."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (scripts/setup.sh installs it)")
    return binary


class RedisServer:
    """A redis-server process of our own on a free loopback port (no persistence)."""

    def __init__(
        self,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        password: str | None = None,
        pick_port: Callable[[], int] = free_port,
    ) -> None:
        # A port we picked may be picked again if something takes it before the first start.
        self._pick_port = pick_port if port is None else None
        self.port = port or pick_port()
        self.password = password
        self.extra_args = (*extra_args, "--requirepass", password) if password else extra_args
        self.dir = tempfile.mkdtemp(prefix="beeline-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Starts redis-server and waits until it answers. If it exits instead, the test fails with
        its log, unless the port it was given was taken since we picked it: then, on a first start, it
        gets another (a restart keeps its port, which clients already know)."""
        log_path = Path(self.dir) / "redis.log"
        for _ in range(PORT_ATTEMPTS):
            log_start = log_path.stat().st_size if log_path.exists() else 0
            proc = self.proc = subprocess.Popen(
                [
                    redis_server_binary(),
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self.dir,
                    "--logfile",
                    str(log_path),
                    *self.extra_args,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_until(self._answers_or_exited, timeout=10, what=f"redis on {self.port}")
            except AssertionError:
                self.stop()  # running but silent: the caller gets no server to clean up
                raise
            if proc.poll() is None:
                self._pick_port = None  # started: clients may know this port from now on
                return self
            with log_path.open("rb") as log:
                log.seek(log_start)
                tail = log.read().decode(errors="replace")[-2000:]
            taken = port_taken(self.port)
            if not taken or self._pick_port is None:
                message = f"redis-server on {self.port} exited with {proc.returncode}:\n{tail}"
                raise ServerExited(message, port_taken=taken)
            self.port = self._pick_port()
        raise AssertionError(f"redis-server found no free port in {PORT_ATTEMPTS} tries")

    def _answers_or_exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None or self.ping()

    def ping(self) -> bool:
        """One short try: on a port some other process listens on, a PING with the usual timeout and
        retries would block past a whole start deadline before the server's exit is noticed."""
        quick = redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            with quick:
                return bool(quick.ping())
        except redis.exceptions.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2, socket_connect_timeout=1
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


LOG_TAIL_CHARS = 8000


@dataclass
class Service:
    """A ``beeline gateway`` or ``beeline router`` subprocess; a failed test shows its log's tail."""

    kind: str
    port: int
    env: dict[str, str]
    node_id: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 20.0) -> Service:
        fd, path = tempfile.mkstemp(prefix=f"beeline-{self.kind}-", suffix=".log")
        self.log_path = Path(path)
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.kind], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(self.ready, timeout=timeout, what=f"{self.kind} {self.node_id} ready on {self.port}")
        return self

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            message = f"{self.kind} exited with {self.proc.returncode}:\n{self.logs()}"
            raise ServerExited(message, port_taken=port_taken(self.port))
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                pass
        except OSError:
            return False
        return http_ok(f"{self.base_url}/readyz")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def events(self) -> list[str]:
        """The ``event`` of each structured (JSON) line the service has logged so far, in order."""
        events = []
        for line in self.logs().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and isinstance(record.get("event"), str):
                    events.append(record["event"])
        return events

    def kill(self) -> None:
        """kill -9: no drain, no cleanup."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.log_path is not None:
            # Services log at warning level here, so the tail is short; pytest shows what a test printed
            # only when it fails, which is when the servers' side of the story is wanted.
            tail = self.logs()[-LOG_TAIL_CHARS:]
            if tail.strip():
                print(f"--- {self.kind} {self.node_id} on :{self.port}, log tail ---\n{tail}")
            with contextlib.suppress(OSError):
                self.log_path.unlink()
            self.log_path = None  # a second stop (the test's, then its cluster's) has nothing to show


@dataclass
class Cluster:
    """Gateways and routers as real processes sharing one Redis and one key prefix."""

    redis_url: str
    prefix: str = field(default_factory=lambda: "t" + uuid.uuid4().hex[:10])
    base_env: dict[str, str] = field(default_factory=dict)
    services: list[Service] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BEELINE_")}
        env.update(
            {
                "BEELINE_REDIS_URL": self.redis_url,
                "BEELINE_KEY_PREFIX": self.prefix,
                "BEELINE_JWT_SECRET": JWT_SECRET,
                "BEELINE_API_KEYS": API_KEY,
                "BEELINE_HEARTBEAT_SECONDS": "0.5",
                "BEELINE_LOG_LEVEL": "warning",
                "BEELINE_DRAIN_WINDOW_SECONDS": "0.2",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.base_env)
        env.update(extra)
        return env

    def gateway(self, node_id: str | None = None, **extra: str) -> Service:
        node_id = node_id or f"gw{len(self.services)}"
        return self._start("gateway", node_id, BEELINE_NODE_ID=node_id, **extra)

    def router(self, **extra: str) -> Service:
        return self._start("router", "", **extra)

    def _start(self, kind: str, node_id: str, **extra: str) -> Service:
        """Starts a service on a free port. The port is the kernel's pick, free then but not reserved:
        one taken before the service bound it is picked again (the service exits at once, saying so)."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = free_port()
            svc = Service(kind, port, self.env(BEELINE_PORT=str(port), **extra), node_id)
            self.services.append(svc)  # stopped by stop() even if it never became ready
            try:
                return svc.start()
            except ServerExited as e:
                if not e.port_taken or attempt == PORT_ATTEMPTS:
                    raise
                svc.stop()
                self.services.remove(svc)
        raise AssertionError("unreachable")

    def stop(self) -> None:
        for svc in reversed(self.services):
            svc.stop()


def token(user: str, ttl_s: int = 3600) -> str:
    return mint_token(JWT_SECRET, user, ttl_s=ttl_s)


class Client:
    """A WebSocket client that keeps every frame it receives, per type, for assertions."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, user: str) -> None:
        self.session = session
        self.ws = ws
        self.user = user
        self.welcome: dict[str, Any] = {}
        self.frames: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @classmethod
    async def connect(
        cls,
        session: aiohttp.ClientSession,
        service: Service,
        user: str,
        *,
        since: int | None = None,
        epoch: str | None = None,
        protocols: tuple[str, ...] = (),
        query: Mapping[str, str] | None = None,
    ) -> Client:
        params = dict(query or {})
        if since is not None:
            params["since"] = str(since)
        if epoch is not None:
            params["epoch"] = epoch
        ws = await session.ws_connect(
            service.ws_url,
            headers={"Authorization": f"Bearer {token(user)}"},
            params=params,
            protocols=protocols,
            heartbeat=None,
        )
        client = cls(session, ws, user)
        first = await client._receive_one(timeout=10)
        assert first is not None and first["type"] == "welcome", first
        client.welcome = first
        client._reader = asyncio.create_task(client._read_loop())
        return client

    @classmethod
    async def connect_retrying(
        cls, session: aiohttp.ClientSession, service: Service, user: str, deadline_s: float = 60.0, **kwargs: Any
    ) -> Client:
        """Connects like a well-behaved client in a storm: on HTTP 503 (busy, over capacity) or a 1013
        close, retries after a jittered, growing backoff until ``deadline_s``."""
        import random

        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        delay = 0.05
        while True:
            try:
                return await cls.connect(session, service, user, **kwargs)
            except (aiohttp.WSServerHandshakeError, AssertionError, aiohttp.ClientError, OSError):
                if loop.time() > deadline:
                    raise
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(1.0, delay * 2)

    async def _receive_one(self, timeout: float) -> dict[str, Any] | None:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type == aiohttp.WSMsgType.TEXT:
            return dict(json.loads(msg.data))
        if msg.type == aiohttp.WSMsgType.BINARY:
            import msgpack

            return dict(msgpack.unpackb(msg.data, raw=False))
        self.close_code = self.ws.close_code
        return None

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await self._receive_one(timeout=3600)
                if frame is None:
                    return
                self.frames.append(frame)
                self._changed.set()
        finally:
            self.close_code = self.ws.close_code
            self._changed.set()

    @property
    def epoch(self) -> str:
        return str(self.welcome["epoch"])

    def messages(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == "message"]

    def seqs(self) -> list[int]:
        return [int(f["seq"]) for f in self.messages()]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == kind]

    async def wait_for(self, predicate: Callable[[Client], bool], timeout: float = 10.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.user}: timed out waiting for {what or predicate}; got {self.frames[-5:]} "
                    f"(close={self.close_code})"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.5))

    async def wait_messages(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        await self.wait_for(lambda c: len(c.messages()) >= count, timeout, f"{count} messages")
        return self.messages()

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        await self.wait_for(lambda c: c.close_code is not None, timeout, "close")
        return self.close_code

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_json(frame)

    async def send_and_wait(self, frame: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Sends a frame with a fresh ref and returns the matching ``sent`` or ``error`` reply."""
        ref = frame.setdefault("ref", uuid.uuid4().hex)
        await self.send(frame)

        def replied(c: Client) -> bool:
            return any(f.get("ref") == ref and f["type"] in ("sent", "error") for f in c.frames)

        await self.wait_for(replied, timeout, f"reply to {ref}")
        return next(f for f in self.frames if f.get("ref") == ref and f["type"] in ("sent", "error"))

    async def ack(self, seq: int) -> None:
        await self.send({"type": "ack", "seq": seq})

    async def close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


def api_headers(**extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}", **extra}


async def api_send(
    session: aiohttp.ClientSession,
    router: Service,
    to: str | list[str],
    payload: Any = "hi",
    channel: str = "chat",
    **extra: Any,
) -> dict[str, Any]:
    async with session.post(
        f"{router.base_url}/v1/messages",
        json={"to": to, "channel": channel, "payload": payload, **extra},
        headers=api_headers(),
    ) as r:
        body = await r.json()
        assert r.status == 202, body
        return dict(body)


def assert_exactly_once_in_order(seqs: list[int], expected: range | list[int]) -> None:
    """Every expected seq exactly once, in order: the delivery guarantee in one assertion."""
    dupes = len(seqs) - len(set(seqs))
    assert dupes == 0, f"{dupes} duplicates"
    assert seqs == sorted(seqs), "out of order"
    missing = sorted(set(expected) - set(seqs))
    assert not missing, f"missing {len(missing)}: {missing[:20]}"
    assert seqs == list(expected)


class RedisClusterServer:
    """A real local Redis Cluster: ``masters`` primaries, each with ``replicas`` replicas, on free ports."""

    def __init__(self, masters: int = 3, replicas: int = 0) -> None:
        self.masters = masters
        self.replicas = replicas
        picked: set[int] = set()
        self.servers = [
            RedisServer(
                extra_args=("--cluster-enabled", "yes", "--cluster-node-timeout", "2000"),
                pick_port=lambda: free_cluster_port(picked),
            )
            for _ in range(masters * (1 + replicas))
        ]

    @property
    def seeds(self) -> str:
        return ",".join(f"127.0.0.1:{s.port}" for s in self.servers[: self.masters])

    def start(self) -> RedisClusterServer:
        """Starts every node and creates the cluster; if any step fails, stops the nodes it started."""
        try:
            return self._start()
        except BaseException:
            self.cleanup()
            raise

    def _start(self) -> RedisClusterServer:
        for server in self.servers:
            server.extra_args = (*server.extra_args, "--cluster-config-file", os.path.join(server.dir, "nodes.conf"))
            server.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed (it comes with Debian's redis-tools)")
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *[f"127.0.0.1:{s.port}" for s in self.servers],
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        wait_until(self.healthy, timeout=30, what="redis cluster state ok")
        return self

    def healthy(self) -> bool:
        for server in self.servers:
            try:
                with server.client() as client:
                    info = client.execute_command("CLUSTER", "INFO")
            except redis.exceptions.RedisError:
                return False
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return False
        if self.replicas:
            # Replicas must be linked and in sync before tests rely on WAIT or on a failover.
            roles = []
            for server in self.servers:
                with server.client() as client:
                    replication = client.info("replication")
                roles.append(replication["role"])
                if replication["role"] == "master" and int(replication["connected_slaves"]) < self.replicas:
                    return False
                if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                    return False
            if roles.count("master") != self.masters:
                return False
        return True

    def cleanup(self) -> None:
        for server in self.servers:
            server.cleanup()


class ResumingClient:
    """A user's device that reconnects after any close, to the next gateway in turn, resuming with
    ``since``/``epoch`` from the last message it saw: the client behaviour the delivery guarantee assumes.
    It acks as it goes (cumulative) and records every message seq it ever received."""

    def __init__(self, session: aiohttp.ClientSession, gateways: list[Service], user: str, start: int = 0) -> None:
        self.session = session
        self.gateways = gateways
        self.user = user
        self._turn = start
        self.seqs: list[int] = []
        self.epoch: str | None = None
        self.closes: list[int | None] = []
        self.reconnects = 0
        self.current: Service | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            gateway = self.gateways[self._turn % len(self.gateways)]
            self._turn += 1
            if gateway.proc is None or gateway.proc.poll() is not None:
                await asyncio.sleep(0.02)  # never spin: every gateway may be down for a while
                continue
            params = {}
            if self.epoch is not None and self.seqs:
                params = {"since": str(self.seqs[-1]), "epoch": self.epoch}
            try:
                ws = await self.session.ws_connect(
                    gateway.ws_url,
                    params=params,
                    headers={"Authorization": f"Bearer {token(self.user)}"},
                    heartbeat=None,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5),
                )
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(0.05)
                continue
            self.current = gateway
            try:
                await self._consume(ws)
            finally:
                self.closes.append(ws.close_code)
                self.connected.clear()
                self.reconnects += 1
                await ws.close()

    async def _consume(self, ws: aiohttp.ClientWebSocketResponse) -> None:

        unacked = 0
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            frame = json.loads(msg.data)
            if frame["type"] == "welcome":
                if self.epoch is not None and frame["epoch"] != self.epoch:
                    raise AssertionError(f"{self.user}: epoch changed unexpectedly")
                self.epoch = frame["epoch"]
                self.connected.set()
            elif frame["type"] == "message":
                self.seqs.append(int(frame["seq"]))
                unacked += 1
                if unacked >= 20:
                    await ws.send_json({"type": "ack", "seq": self.seqs[-1]})
                    unacked = 0
            if self._stop.is_set():
                break

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def run_load(
    session: aiohttp.ClientSession,
    router: Service,
    users: list[str],
    *,
    rate: float,
    seconds: float,
    batch: int = 20,
) -> dict[str, int]:
    """Sends ``rate`` msg/s for ``seconds`` (bounded: rate*seconds messages) through the router's batch
    endpoint, receivers round-robin over ``users``; retries a batch on 503 with the same
    Idempotency-Key so nothing is sent twice. Returns how many messages each user was sent."""
    total = int(rate * seconds)
    interval = batch / rate
    sent: dict[str, int] = dict.fromkeys(users, 0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    posts: list[asyncio.Task[None]] = []

    async def post(messages: list[dict[str, Any]], key: str) -> None:
        deadline = loop.time() + 30
        while True:
            try:
                async with session.post(
                    f"{router.base_url}/v1/messages/batch",
                    json={"messages": messages},
                    headers=api_headers(**{"Idempotency-Key": key}),
                    timeout=aiohttp.ClientTimeout(total=10),
                ) as r:
                    if r.status == 202:
                        return
                    # 503: nothing accepted, retry; 409: the first attempt with this key is still
                    # running or failed mid-way, retry with the same key.
                    if r.status not in (503, 409):
                        raise AssertionError(f"batch failed: {r.status} {await r.text()}")
            except (aiohttp.ClientError, TimeoutError):
                pass
            if loop.time() > deadline:
                raise AssertionError("load batch not accepted within 30 s")
            await asyncio.sleep(0.05)

    for index in range(0, total, batch):
        await asyncio.sleep(max(0.0, start + (index // batch) * interval - loop.time()))
        messages = []
        for i in range(index, min(total, index + batch)):
            user = users[i % len(users)]
            sent[user] += 1
            messages.append({"to": user, "channel": "load", "payload": {"i": i}})
        posts.append(asyncio.create_task(post(messages, uuid.uuid4().hex)))
    # Every post is awaited here, finished or not, so that a failed one fails the load with its own
    # error instead of leaving its messages counted as sent.
    try:
        await asyncio.gather(*posts)
    finally:
        for task in posts:
            task.cancel()
    return sent


def raw_websocket(port: int, user: str, rcvbuf: int | None = None) -> socket.socket:
    """A WebSocket upgraded by hand on a blocking socket that the test then never reads from: a
    client that stopped reading (or a half-open peer that answers nothing, not even pings)."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        (
            f"GET /ws?token={token(user)} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock
