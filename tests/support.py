"""Test support: real redis-server processes, real gateway/router processes, WebSocket clients.

Everything binds to 127.0.0.1 on free ports, every wait has a deadline, and every process started here
is stopped by the fixture that started it (see conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis

from shared.auth import mint_token

JWT_SECRET = "test-secret-" + "x" * 32
API_KEY = "test-api-key"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> None:
    """Async version of :func:`wait_until`."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (scripts/setup.sh installs it)")
    return binary


class RedisServer:
    """A redis-server process of our own on a free loopback port (no persistence)."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.extra_args = extra_args
        self.dir = tempfile.mkdtemp(prefix="beeline-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
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
                os.path.join(self.dir, "redis.log"),
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, timeout=10, what=f"redis on {self.port}")
        return self

    def ping(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.exceptions.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Service:
    """A ``beeline gateway`` or ``beeline router`` subprocess."""

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
            raise AssertionError(f"{self.kind} exited with {self.proc.returncode}:\n{self.logs()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                pass
        except OSError:
            return False
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.base_url}/readyz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

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
            with contextlib.suppress(OSError):
                self.log_path.unlink()


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
        port = free_port()
        svc = Service("gateway", port, self.env(BEELINE_NODE_ID=node_id, BEELINE_PORT=str(port), **extra), node_id)
        self.services.append(svc)
        return svc.start()

    def router(self, **extra: str) -> Service:
        port = free_port()
        svc = Service("router", port, self.env(BEELINE_PORT=str(port), **extra))
        self.services.append(svc)
        return svc.start()

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

    async def _receive_one(self, timeout: float) -> dict[str, Any] | None:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type == aiohttp.WSMsgType.TEXT:
            import json

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
