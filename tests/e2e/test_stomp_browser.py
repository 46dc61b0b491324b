"""The original Spring STOMP chat page, unchanged, in a real browser against Beeline behind real nginx.

The stack is the one examples/stomp-chat documents: a real redis-server, two ``beeline gateway``
processes and a router (tests.support.Cluster), the example's app (``examples/stomp-chat/app.py``, a
process of its own) and nginx rendered from ``examples/stomp-chat/nginx.conf.template``. Chromium
(Playwright, ``/usr/bin/chromium``) signs in through the example's ``/login`` (which sets the
``beeline_token`` cookie), then uses only the page's own buttons and form: sockjs-client 1.1.4 and
stompjs 2.3.3 from npm do the rest, with no token in the CONNECT frame.

Pinned: a message sent through the page's form reaches the other user's page across gateways, once;
a message sent to a user who never connected waits in the mailbox and is on their page right after they
connect (delivered by the gateway on SUBSCRIBE: ``pullUnreadMessage`` returns nothing, so nothing shows
twice). A failure saves each page's screenshot and the browsers' console log and prints where.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from yarl import URL

from tests.support import (
    JWT_SECRET,
    ROOT,
    Cluster,
    Service,
    alive,
    api_headers,
    eventually,
    free_port,
    http_ok,
    port_taken,
    proc_stat_fields,
    wait_until,
)

pytestmark = pytest.mark.redis

CHROMIUM = Path("/usr/bin/chromium")
EXAMPLE = ROOT / "examples" / "stomp-chat"
STEP_TIMEOUT_MS = 15_000
"""Deadline of each wait on the page: generous for a cold browser, far below the test's own timeout."""


def _load(name: str, path: Path) -> ModuleType:
    """examples/stomp-chat is no package: its modules are loaded by path (once, under beeline.demo's name)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


example = _load("beeline_stomp_chat_run", EXAMPLE / "run.py")


def _skip_reason(*, browser: bool) -> str | None:
    """Why the test cannot run here, if it cannot: only a missing install skips it (CI installs all)."""
    if browser and not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (scripts/setup.sh installs chromium)"
    if example.nginx_binary() is None:
        return "nginx is missing (scripts/setup.sh installs it)"
    if missing := example.missing_libraries():
        return f"the example's npm packages are missing ({', '.join(missing)}): npm ci --prefix examples/stomp-chat"
    return None


@dataclass
class Stack:
    """Everything the browser talks to: one nginx per entry point, all in front of the same app."""

    gateways: list[Service]
    router: Service
    app_url: str
    nginx: dict[str, Any] = field(default_factory=dict)  # name -> run.NginxServer


@pytest.fixture
def app_server(cluster: Cluster) -> Iterator[tuple[str, Service]]:
    """The example's app as its own process, pointed at a fresh router; yields (base URL, router)."""
    if reason := _skip_reason(browser=False):
        pytest.skip(reason)
    router = cluster.router()
    port = free_port()
    fd, log_name = tempfile.mkstemp(prefix="stomp-chat-app-", suffix=".log")
    log_path = Path(log_name)
    env = {**cluster.env(), "BEELINE_LOG_LEVEL": "info"}  # the cluster's secrets: JWT_SECRET, API_KEY
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(
            example.app_command(port=port, router_url=router.base_url),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"app.py exited with {proc.returncode}:\n{log_path.read_text()}")
            return http_ok(f"{url}/login")

        wait_until(ready, timeout=15, what="the example app")
        yield url, router
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        tail = log_path.read_text(errors="replace")[-4000:]
        if tail.strip():
            print(f"--- stomp-chat app log tail ---\n{tail}")
        log_path.unlink(missing_ok=True)


@pytest.fixture
def stack(cluster: Cluster, app_server: tuple[str, Service], tmp_path: Path) -> Iterator[Stack]:
    # nginx's ip_hash keys on the client address, and every browser here is 127.0.0.1: one nginx in front
    # of both gateways would put alice and bob on the same one. To prove delivery across gateways, alice
    # and bob each get an nginx whose upstream is one gateway ("via-g1", "via-g2"); the template is the
    # same, only its gateway list differs. Carol goes through the config as deployed ("both": ip_hash over
    # both gateways).
    g1, g2 = cluster.gateway("g1"), cluster.gateway("g2")
    app_url, router = app_server
    app_port = int(app_url.rsplit(":", 1)[1])
    s = Stack(gateways=[g1, g2], router=router, app_url=app_url)
    upstreams = {"via-g1": [g1], "via-g2": [g2], "both": [g1, g2]}
    try:
        for name, gateways in upstreams.items():
            server = example.NginxServer(
                tmp_path / f"nginx-{name}",
                listen_port=free_port(),
                gateways=[("127.0.0.1", g.port) for g in gateways],
                app_port=app_port,
            )
            s.nginx[name] = server.start()
        yield s
    finally:
        for name, server in s.nginx.items():
            server.stop()
            errors = server.error_log().strip()
            if errors:
                print(f"--- nginx {name} error.log ---\n{errors[-4000:]}")


async def on_node(router: Service, user: str, node_id: str) -> bool:
    """Presence says ``user`` is connected to gateway ``node_id`` only."""
    return await presence_nodes(router, user) == [node_id]


async def presence_nodes(router: Service, user: str) -> list[str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{router.base_url}/v1/presence/{user}", headers=api_headers()) as r,
    ):
        assert r.status == 200
        body = await r.json()
    return list(body["nodes"])


# -- the app and nginx without a browser --------------------------------------------------------------------


async def test_app_through_nginx(stack: Stack) -> None:
    """Through nginx: the page needs a login; /login sets an HttpOnly beeline_token cookie holding a JWT of
    the user; sendToUser puts the message in the receiver's mailbox via the router and answers ok;
    pullUnreadMessage answers the original's shape, empty; SockJS's info comes from a gateway."""
    from shared.auth import TokenVerifier

    base = stack.nginx["both"].url
    # unsafe=True: aiohttp's jar otherwise keeps no cookie for an IP address such as 127.0.0.1.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        async with session.get(f"{base}/", allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"] == "/login"
        async with session.post(f"{base}/wsTemplate/sendToUser", data={"receiver": "x", "msg": "y"}) as r:
            assert r.status == 401
        async with session.post(f"{base}/login", data={"username": "dave"}, allow_redirects=False) as r:
            assert r.status == 303
            cookie = r.cookies["beeline_token"]
            assert cookie["httponly"]
            assert cookie["samesite"] == "Lax"
            assert TokenVerifier(secret=JWT_SECRET).verify(cookie.value).user_id == "dave"
        async with session.get(f"{base}/") as r:
            assert r.status == 200
            page = await r.text()
        for script in ("/webjars/jquery/jquery.min.js", "/webjars/sockjs-client/sockjs.min.js"):
            assert script in page
            async with session.get(f"{base}{script}") as lib:
                assert lib.status == 200
        async with session.get(f"{base}/chat-websocket/info") as r:
            assert r.status == 200
            assert (await r.json())["websocket"] is True
        async with session.post(f"{base}/wsTemplate/sendToUser", data={"receiver": "erin", "msg": "hi"}) as r:
            assert r.status == 200
            assert await r.text() == "ok"
        async with session.post(f"{base}/wsTemplate/pullUnreadMessage", data={"destination": "/topic/reply"}) as r:
            assert r.status == 200
            assert await r.json() == {"code": "200", "result": []}
        async with session.post(f"{base}/wsTemplate/sendToUser", data={"receiver": "", "msg": "hi"}) as r:
            assert r.status == 400
        # The message is in erin's mailbox: the router says so by its seq (the first one, 1).
        async with session.post(
            f"{stack.router.base_url}/v1/messages",
            json={"to": "erin", "channel": "reply", "payload": {"content": "probe"}},
            headers=api_headers(),
        ) as r:
            assert r.status == 202
            assert (await r.json())["results"][0]["seq"] == 2


# -- the browser ------------------------------------------------------------------------------------------


@dataclass
class Browsing:
    """The browser's pages by user, and every console line and WebSocket they produced."""

    artifacts: Path
    without_websocket: bool = False
    pages: dict[str, Any] = field(default_factory=dict)
    console: list[str] = field(default_factory=list)
    sockjs_requests: list[str] = field(default_factory=list)  # URL paths under /chat-websocket/
    websockets: list[str] = field(default_factory=list)

    async def save(self) -> None:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        for user, page in self.pages.items():
            with contextlib.suppress(Exception):  # a crashed page has no screenshot; the log still matters
                await page.screenshot(path=str(self.artifacts / f"{user}.png"), full_page=True)
        lines = [*self.console, "", "SockJS requests:", *self.sockjs_requests]
        (self.artifacts / "console.log").write_text("\n".join(lines) + "\n")
        print(f"browser artifacts (screenshots, console.log): {self.artifacts}")


# The page is the same in both runs; only the browser differs. Without a WebSocket class sockjs-client
# falls back to its xhr-streaming transport: a long receiving request and one xhr_send per frame, through
# nginx's unbuffered proxy (and, for carol, its ip_hash upstream over both gateways).
TRANSPORTS = ("websocket", "xhr-streaming")


@pytest.fixture(params=TRANSPORTS)
async def browsing(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Any, Browsing]]:
    if reason := _skip_reason(browser=True):
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    record = Browsing(artifacts=tmp_path / "browser-artifacts", without_websocket=request.param != "websocket")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield browser, record
        finally:
            await browser.close()


async def sign_in(browser: Any, record: Browsing, base_url: str, user: str) -> Any:
    """A browser context of its own (its own cookies), signed in as ``user`` through the login form."""
    from playwright.async_api import expect

    context = await browser.new_context()
    if record.without_websocket:
        # Before any script of the page runs: sockjs-client sees no WebSocket and picks xhr-streaming.
        await context.add_init_script("delete window.WebSocket; delete window.MozWebSocket;")
    page = await context.new_page()
    record.pages[user] = page
    page.on("console", lambda m: record.console.append(f"[{user}] {m.type}: {m.text}"))
    page.on("pageerror", lambda e: record.console.append(f"[{user}] pageerror: {e}"))

    def on_websocket(ws: Any) -> None:
        record.websockets.append(ws.url)
        record.console.append(f"[{user}] websocket: {ws.url}")

    def on_request(req: Any) -> None:
        path = urlsplit(req.url).path
        if path.startswith("/chat-websocket/"):
            record.sockjs_requests.append(path)

    page.on("websocket", on_websocket)
    page.on("request", on_request)
    await page.goto(f"{base_url}/", timeout=STEP_TIMEOUT_MS)  # redirected to /login
    await page.fill("#username", user)
    await page.click("#login")
    await expect(page.locator("#user")).to_have_text(user, timeout=STEP_TIMEOUT_MS)
    return page


async def connect(page: Any) -> None:
    """The page's Connect button; the page enables Disconnect once STOMP's CONNECTED came."""
    from playwright.async_api import expect

    async with page.expect_response("**/wsTemplate/pullUnreadMessage", timeout=STEP_TIMEOUT_MS) as pulled:
        await page.click("#connect")
        await expect(page.locator("#disconnect")).to_be_enabled(timeout=STEP_TIMEOUT_MS)
    # Sent by the page right after it subscribed: nothing to pull, Beeline delivers unread on SUBSCRIBE.
    response = await pulled.value
    assert json.loads(await response.text()) == {"code": "200", "result": []}


async def send(page: Any, receiver: str, text: str) -> None:
    """The page's form: receiver, message, Send; waits for the app's ``ok`` (the message is in the
    receiver's mailbox by then)."""
    await page.fill("#receiver", receiver)
    await page.fill("#msg", text)
    async with page.expect_response("**/wsTemplate/sendToUser", timeout=STEP_TIMEOUT_MS) as sent:
        await page.click("#send")
    response = await sent.value
    assert response.status == 200
    assert await response.text() == "ok"


async def test_original_page_in_a_browser(browsing: tuple[Any, Browsing], stack: Stack) -> None:
    """alice (gateway g1) and bob (gateway g2) chat through the page's form and each sees the other's
    message once; carol, who never connected, is sent a message, signs in, connects and sees it once."""
    from playwright.async_api import expect

    browser, record = browsing
    try:
        alice = await sign_in(browser, record, stack.nginx["via-g1"].url, "alice")
        bob = await sign_in(browser, record, stack.nginx["via-g2"].url, "bob")
        await connect(alice)
        await connect(bob)
        for user, node in (("alice", "g1"), ("bob", "g2")):
            await eventually(lambda u=user, n=node: on_node(stack.router, u, n), timeout=5, what=f"{user} on {node}")

        await send(alice, "bob", "hello bob")
        await expect(bob.locator("#response td")).to_have_text(["alice say: hello bob"], timeout=STEP_TIMEOUT_MS)
        await send(bob, "alice", "hello alice")
        await expect(alice.locator("#response td")).to_have_text(["bob say: hello alice"], timeout=STEP_TIMEOUT_MS)

        # carol has never connected: the message waits in her mailbox.
        assert await presence_nodes(stack.router, "carol") == []
        await send(alice, "carol", "hi carol")
        carol = await sign_in(browser, record, stack.nginx["both"].url, "carol")
        await connect(carol)
        await expect(carol.locator("#response td")).to_have_text(["alice say: hi carol"], timeout=STEP_TIMEOUT_MS)

        # Nothing arrived twice or where it did not belong, by the end either.
        await expect(alice.locator("#response td")).to_have_text(["bob say: hello alice"])
        await expect(bob.locator("#response td")).to_have_text(["alice say: hello bob"])
        await expect(carol.locator("#response td")).to_have_text(["alice say: hi carol"])

        # The transport was the one this run is about.
        if record.without_websocket:
            assert not record.websockets
            assert any(p.endswith("/xhr_streaming") for p in record.sockjs_requests), record.sockjs_requests
            assert any(p.endswith("/xhr_send") for p in record.sockjs_requests), record.sockjs_requests
        else:
            assert len(record.websockets) == 3, record.websockets
            assert all(urlsplit(u).path.endswith("/websocket") for u in record.websockets)
    except BaseException:
        await record.save()
        raise


# -- beeline demo --stomp ------------------------------------------------------------------------------------


def _children(pid: int) -> set[int]:
    """Direct children of ``pid``, from /proc (Linux)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int(proc_stat_fields(int(entry.name))[1]) == pid:
                    found.add(int(entry.name))
    return found


@dataclass
class DemoRun:
    proc: subprocess.Popen[bytes]
    log_path: Path
    stomp_url: str

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def stomp_demo(tmp_path: Path) -> Iterator[DemoRun]:
    """``python examples/stomp-chat/run.py`` (that is, ``beeline demo --stomp``) on free ports, up."""
    if reason := _skip_reason(browser=False):
        pytest.skip(reason)
    ports: set[int] = set()
    while len(ports) < 5:
        ports.add(free_port())
    gw1, gw2, router, web, stomp = sorted(ports)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEELINE_")}  # its own Redis and secrets
    env["PYTHONUNBUFFERED"] = "1"
    argv = [sys.executable, str(EXAMPLE / "run.py"), "--quiet", "--gateway-ports", f"{gw1},{gw2}"]
    argv += ["--router-port", str(router), "--web-port", str(web), "--stomp-port", str(stomp)]
    log_path = tmp_path / "demo.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    run = DemoRun(proc, log_path, f"http://127.0.0.1:{stomp}")
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the demo exited with {proc.returncode}:\n{run.output()}")
            return f"STOMP page  {run.stomp_url}/" in run.output()

        wait_until(up, timeout=40, what="beeline demo --stomp")
        yield run
    finally:
        if proc.poll() is None:  # the test failed before its own Ctrl-C
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


async def test_demo_stomp_serves_the_page_and_stops_everything(stomp_demo: DemoRun) -> None:
    """``beeline demo --stomp`` serves the page through nginx on --stomp-port: the login sets the cookie,
    a SockJS WebSocket through nginx authenticated by that cookie alone gets STOMP's CONNECTED for the
    user, sendToUser answers ok; Ctrl-C stops every process, nginx and the app included, and frees the port."""
    base = stomp_demo.stomp_url
    children = _children(stomp_demo.proc.pid)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        async with session.post(f"{base}/login", data={"username": "alice"}) as r:
            assert r.status == 200  # redirected to the page
        cookie = session.cookie_jar.filter_cookies(URL(base))["beeline_token"].value
        async with session.ws_connect(
            f"{base}/chat-websocket/000/demostmp/websocket", headers={"Cookie": f"beeline_token={cookie}"}
        ) as ws:
            assert (await ws.receive_str(timeout=10)) == "o"
            await ws.send_str(json.dumps(["CONNECT\naccept-version:1.2\nheart-beat:0,0\n\n\x00"]))
            frame = await ws.receive_str(timeout=10)
            assert frame.startswith("a"), frame
            [connected] = json.loads(frame[1:])
            assert connected.startswith("CONNECTED\n"), connected
            assert "\nuser-name:alice\n" in connected
        async with session.post(f"{base}/wsTemplate/sendToUser", data={"receiver": "bob", "msg": "hi"}) as r:
            assert await r.text() == "ok"
    stomp_demo.proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(stomp_demo.proc.wait, 30) == 0, stomp_demo.output()
    assert len(children) >= 6, children  # redis, 2 gateways, router, app, nginx
    await eventually(lambda: not [pid for pid in children if alive(pid)], timeout=10, what="the demo's children gone")
    assert not port_taken(int(base.rsplit(":", 1)[1])), "nginx's port is still in use"
