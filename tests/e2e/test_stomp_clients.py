"""End-to-end STOMP and SockJS: the real npm client libraries (Node) against real gateway processes.

Pages written for Spring's STOMP broker must work against Beeline unchanged (SPEC "STOMP and SockJS").
So the clients here are the libraries those pages load, not a re-implementation: ``@stomp/stompjs`` 7
over a plain WebSocket on ``/ws``, and the original page's ``sockjs-client`` 1.1.4 + ``stompjs`` 2.3.3
over each SockJS transport. Each runs in a Node driver (``tests/js/*.mjs``) that the test speaks to in
line-delimited JSON: commands in, the frames the library saw out. Where a library would hide what is
being tested (a silent client, a malformed frame), a raw aiohttp WebSocket speaks STOMP by hand.

Invariants: every assertion is about Beeline's own frames and headers (CONNECTED, MESSAGE, RECEIPT,
ERROR, close codes), never another library's wording; every wait has a deadline, and "not delivered" is
proven by order (a later message arrives first, and one connection's delivery is in seq order), not by
waiting; every Node process is killed in teardown.

The module shares one cluster (gateways g1 and g2, a router, one Redis); each test uses user ids of
its own, so tests do not see each other's messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from shared.auth import mint_token
from shared.keys import Keys
from shared.protocol import CloseCode
from tests.support import JWT_SECRET, ROOT, Cluster, RedisServer, Service, api_send, eventually, token

pytestmark = pytest.mark.redis

JS_DIR = ROOT / "tests" / "js"
DEADLINE_S = 10.0
STOMP_PROTOCOLS = ("v12.stomp", "v11.stomp", "v10.stomp")
SOCKJS_PATH = "/chat-websocket"
MAX_FRAME_BYTES = 128 * 1024
"""The gateway's default BEELINE_MAX_FRAME_BYTES (the module's gateways run with the defaults)."""
CHUNK_BYTES = 32 * 1024


# -- the cluster ------------------------------------------------------------------------------------------


@dataclass
class Nodes:
    cluster: Cluster
    g1: Service
    g2: Service
    router: Service


@pytest.fixture(scope="module")
def nodes(redis_server: RedisServer) -> Iterator[Nodes]:
    """Two gateways and a router for the whole module (starting them per test would cost most of its time)."""
    cluster = Cluster(redis_url=redis_server.url)
    try:
        yield Nodes(cluster, cluster.gateway("g1"), cluster.gateway("g2"), cluster.router())
    finally:
        cluster.stop()


def users(*names: str) -> list[str]:
    """User ids of this test alone."""
    tag = uuid.uuid4().hex[:8]
    return [f"{name}-{tag}" for name in names]


def ws_url(service: Service, query: str = "") -> str:
    return f"ws://127.0.0.1:{service.port}/ws{query}"


def sockjs_url(service: Service, query: str = "") -> str:
    return f"{service.base_url}{SOCKJS_PATH}{query}"


# -- the Node drivers -------------------------------------------------------------------------------------


class JsClient:
    """One Node driver process (``tests/js/<script>``): a real client library, one connection at a time.

    Every event it prints is kept in order; :meth:`expect` takes the first one of a kind not taken yet,
    so a test can wait for a RECEIPT while MESSAGEs pile up behind it."""

    def __init__(self, script: str, proc: asyncio.subprocess.Process) -> None:
        self.script = script
        self.proc = proc
        self.history: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._stderr = bytearray()
        self._tasks = [asyncio.create_task(self._read_events()), asyncio.create_task(self._read_stderr())]

    @classmethod
    async def start(cls, script: str) -> JsClient:
        proc = await asyncio.create_subprocess_exec(
            "node",
            script,
            cwd=JS_DIR,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        client = cls(script, proc)
        await client.expect("ready")
        return client

    async def _read_events(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            event = json.loads(line)
            self.history.append(event)
            self._pending.append(event)
            self._changed.set()
        self._changed.set()  # the process ended: waiters fail at once instead of at their deadline

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self._stderr += line

    async def command(self, op: str, **fields: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        await self.proc.stdin.drain()

    def _describe(self) -> str:
        return f"{self.script} events so far: {self.history}\nstderr: {self._stderr.decode(errors='replace')[-2000:]}"

    async def expect(
        self, event: str, timeout: float = DEADLINE_S, where: Callable[[dict[str, Any]], bool] = lambda e: True
    ) -> dict[str, Any]:
        """The first not yet taken ``event`` (that ``where`` accepts); fails at the deadline, or at once
        if the driver reported a failed command or exited."""
        deadline = time.monotonic() + timeout
        while True:
            failed = [e for e in self._pending if e["event"] == "failed"]
            assert not failed, f"driver command failed: {failed}\n{self._describe()}"
            for index, candidate in enumerate(self._pending):
                if candidate["event"] == event and where(candidate):
                    return self._pending.pop(index)
            left = deadline - time.monotonic()
            assert not self._tasks[0].done(), f"driver exited waiting for {event}\n{self._describe()}"
            assert left > 0, f"no {event!r} within {timeout}s\n{self._describe()}"
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def messages(self, count: int, timeout: float = DEADLINE_S) -> list[dict[str, Any]]:
        return [await self.expect("message", timeout) for _ in range(count)]

    def seen(self, event: str) -> list[dict[str, Any]]:
        """Every ``event`` printed so far, taken or not."""
        return [e for e in self.history if e["event"] == event]

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
async def spawn() -> AsyncIterator[Callable[..., Any]]:
    """Starts Node drivers; kills every one of them after the test, whatever happened."""
    # A missing install fails here, loudly: a skip would let a machine without the clients pass.
    assert shutil.which("node"), "node is not installed (scripts/setup.sh installs it)"
    assert (JS_DIR / "node_modules").is_dir(), "the npm clients are not installed: npm ci --prefix tests/js"
    started: list[JsClient] = []

    async def start(script: str = "stomp_client.mjs") -> JsClient:
        client = await JsClient.start(script)
        started.append(client)
        return client

    yield start
    for client in started:
        await client.stop()


async def stomp_connect(
    spawn: Callable[..., Any], url: str, headers: dict[str, str] | None = None, **fields: Any
) -> tuple[JsClient, dict[str, Any]]:
    """An @stomp/stompjs client connected to ``url``: (the client, its CONNECTED headers)."""
    client: JsClient = await spawn()
    await client.command("connect", url=url, headers=headers or {}, **fields)
    connected = await client.expect("connected")
    return client, connected["headers"]


async def subscribe(client: JsClient, destination: str, sub_id: str, **fields: Any) -> None:
    """SUBSCRIBE with a receipt, and wait for it: the gateway has taken the subscription when it answers."""
    receipt = f"sub-{sub_id}"
    await client.command("subscribe", destination=destination, id=sub_id, receipt=receipt, **fields)
    await client.expect("receipt", where=lambda e: e["headers"].get("receipt-id") == receipt)


async def send_with_receipt(
    client: JsClient, destination: str, body: str, receipt: str, headers: dict[str, str] | None = None
) -> None:
    await client.command("send", destination=destination, body=body, headers={"receipt": receipt, **(headers or {})})
    await client.expect("receipt", where=lambda e: e["headers"].get("receipt-id") == receipt)


def seq_of(message: dict[str, Any]) -> int:
    return int(message["headers"]["beeline-seq"])


# -- a raw STOMP client (for what the libraries would not send) -------------------------------------------


def encode(command: str, headers: dict[str, str] | None = None, body: str = "") -> str:
    lines = [command, *(f"{name}:{value}" for name, value in (headers or {}).items())]
    return "\n".join(lines) + "\n\n" + body + "\x00"


@dataclass
class Frame:
    command: str
    headers: dict[str, str]
    body: str


@dataclass
class RawStomp:
    """An aiohttp WebSocket speaking STOMP by hand; collects the server's frames and heart-beats."""

    ws: aiohttp.ClientWebSocketResponse
    frames: list[Frame] = field(default_factory=list)
    beats: int = 0

    @classmethod
    async def open(
        cls, session: aiohttp.ClientSession, service: Service, protocols: tuple[str, ...] = ("v12.stomp",)
    ) -> RawStomp:
        ws = await session.ws_connect(service.ws_url, protocols=protocols, heartbeat=None, autoping=True)
        return cls(ws)

    async def send(self, data: str) -> None:
        await self.ws.send_str(data)

    async def connect(self, user: str, **headers: str) -> Frame:
        await self.send(encode("CONNECT", {"accept-version": "1.2", "passcode": token(user), **headers}))
        frame = await self.next_frame()
        assert frame.command == "CONNECTED", frame
        return frame

    def _take(self, text: str) -> None:
        """Splits one WebSocket message into heart-beats (bare EOLs) and frames."""
        while text:
            stripped = text.lstrip("\r\n")
            self.beats += text.count("\n", 0, len(text) - len(stripped))
            text = stripped
            if not text:
                return
            frame, nul, text = text.partition("\x00")
            assert nul, f"frame without its NUL: {frame!r}"
            head, _, body = frame.partition("\n\n")
            command, *header_lines = head.split("\n")
            headers: dict[str, str] = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers.setdefault(name, value)
            self.frames.append(Frame(command, headers, body))

    async def _receive(self, deadline: float, what: str) -> aiohttp.WSMessage:
        try:
            return await self.ws.receive(timeout=max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            raise AssertionError(f"no {what} in time; frames {self.frames}, {self.beats} heart-beats") from None

    async def next_frame(self, timeout: float = DEADLINE_S) -> Frame:
        deadline = time.monotonic() + timeout
        while not self.frames:
            msg = await self._receive(deadline, "a frame")
            assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a frame, got {msg.type} {msg.data!r}"
            self._take(msg.data)
        return self.frames.pop(0)

    async def until_closed(self, timeout: float = DEADLINE_S) -> int | None:
        """Reads (keeping frames and beats) until the server closes; its close code."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"not closed within {timeout}s"
            msg = await self._receive(deadline, "the close")
            if msg.type == aiohttp.WSMsgType.TEXT:
                self._take(msg.data)
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                return self.ws.close_code
            else:
                raise AssertionError(f"unexpected {msg.type} {msg.data!r}")

    async def error_then_close(self) -> tuple[Frame, int | None]:
        """The ERROR frame the server sends, then the close code it closes with."""
        frame = await self.next_frame()
        assert frame.command == "ERROR", frame
        code = await self.until_closed()
        return frame, code


# -- 1. CONNECT ---------------------------------------------------------------------------------------------


async def test_connect_with_a_token_in_each_connect_header(nodes: Nodes, spawn: Callable[..., Any]) -> None:
    """CONNECT carrying the token as ``Authorization: Bearer``, ``passcode`` or ``token`` -> CONNECTED with
    the negotiated ``version`` (1.2 for @stomp/stompjs), a ``heart-beat`` and ``user-name`` = the token's sub."""
    (bob,) = users("bob")
    for headers in ({"Authorization": f"Bearer {token(bob)}"}, {"passcode": token(bob)}, {"token": token(bob)}):
        client, connected = await stomp_connect(spawn, ws_url(nodes.g1), headers)
        assert connected["version"] == "1.2", connected
        assert connected["user-name"] == bob, connected
        send_ms, expect_ms = (int(part) for part in connected["heart-beat"].split(","))
        assert send_ms >= 0 and expect_ms >= 0, connected
        await client.command("disconnect")
        await client.expect("close")


async def test_cookie_authenticates_a_page_that_sends_no_token(nodes: Nodes, spawn: Callable[..., Any]) -> None:
    """The original page calls ``connect({})``: the ``beeline_token`` cookie on the upgrade is the token."""
    (bob,) = users("bob")
    _client, connected = await stomp_connect(
        spawn, ws_url(nodes.g1), {}, wsHeaders={"Cookie": f"beeline_token={token(bob)}"}
    )
    assert connected["user-name"] == bob, connected


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
async def test_each_stomp_version_is_negotiated_and_delivers(
    version: str, nodes: Nodes, spawn: Callable[..., Any], session: aiohttp.ClientSession
) -> None:
    """@stomp/stompjs forced to one version (its accept-version and its subprotocol) gets CONNECTED with
    that version, a heart-beat header, and messages in that version's MESSAGE form; ACK in that
    version's form is taken too."""
    (bob,) = users("bob")
    client, connected = await stomp_connect(
        spawn, ws_url(nodes.g1), {"passcode": token(bob)}, versions=[version], heartbeat=[0, 0]
    )
    assert connected["version"] == version, connected
    assert connected["user-name"] == bob, connected
    assert "heart-beat" in connected, connected
    await subscribe(client, "/user/topic/reply", "s1", ack="client")
    await api_send(session, nodes.router, bob, {"content": version}, channel="reply")
    (message,) = await client.messages(1)
    assert json.loads(message["body"]) == {"content": version}
    assert message["headers"]["subscription"] == "s1"
    assert message["headers"]["destination"] == "/user/topic/reply"
    await client.command("ack", messageId=message["headers"]["message-id"])
    await send_with_receipt(client, "/user/nobody-here/topic/reply", "x", "after-ack")
    assert not client.seen("error"), client.seen("error")


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"passcode": "not-a-jwt"}, id="garbage"),
        pytest.param({"passcode": mint_token("another-secret-" + "y" * 32, "bob")}, id="wrong-secret"),
        pytest.param({"Authorization": f"Bearer {mint_token(JWT_SECRET, 'bob', ttl_s=-60)}"}, id="expired"),
    ],
)
async def test_connect_without_a_valid_token_gets_error_then_close(
    headers: dict[str, str], nodes: Nodes, spawn: Callable[..., Any]
) -> None:
    """No valid token anywhere (upgrade, CONNECT headers, cookie): an ERROR frame with a ``message`` header,
    then the close with 1008 (policy violation); never CONNECTED."""
    client: JsClient = await spawn()
    await client.command("connect", url=ws_url(nodes.g1), headers=headers)
    error = await client.expect("error")
    assert error["headers"].get("message"), error
    close = await client.expect("close")
    assert close["code"] == CloseCode.POLICY_VIOLATION, close
    assert not client.seen("connected")


async def test_a_bad_token_on_the_upgrade_is_refused_before_it(nodes: Nodes, session: aiohttp.ClientSession) -> None:
    """A token on the upgrade itself (``?token=``) is checked before it, as on ``/ws``: HTTP 401."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(nodes.g1.ws_url, params={"token": "not-a-jwt"}, protocols=STOMP_PROTOCOLS)
    assert refused.value.status == 401


# -- 2. MESSAGE -------------------------------------------------------------------------------------------


async def test_router_message_arrives_as_a_stomp_message(
    nodes: Nodes, spawn: Callable[..., Any], session: aiohttp.ClientSession
) -> None:
    """A router-API send to a subscribed user on channel ``reply`` is a MESSAGE with Beeline's headers
    and the payload as a JSON body."""
    (bob,) = users("bob")
    client, _ = await stomp_connect(spawn, ws_url(nodes.g1), {"Authorization": f"Bearer {token(bob)}"})
    await subscribe(client, "/user/topic/reply", "sub-0")
    sent = await api_send(
        session, nodes.router, bob, {"content": "hello", "n": [1, 2]}, channel="reply", **{"from": "svc-orders"}
    )
    (message,) = await client.messages(1)
    headers = message["headers"]
    assert headers["destination"] == "/user/topic/reply"
    assert headers["subscription"] == "sub-0"
    assert headers["message-id"]
    assert headers["content-type"].split(";")[0] == "application/json"
    assert int(headers["beeline-seq"]) == sent["results"][0]["seq"]
    assert headers["beeline-epoch"]
    assert headers["beeline-from"] == "svc-orders"
    assert json.loads(message["body"]) == {"content": "hello", "n": [1, 2]}


async def test_stomp_send_from_another_gateway_is_routed_to_the_receiver(
    nodes: Nodes, spawn: Callable[..., Any]
) -> None:
    """alice on g2 SENDs to ``/user/bob/topic/reply`` with a receipt: RECEIPT; bob on g1 gets the MESSAGE
    stamped ``beeline-from: alice``. A JSON body arrives as the parsed payload, any other body as a string."""
    alice, bob = users("alice", "bob")
    receiver, _ = await stomp_connect(spawn, ws_url(nodes.g1), {"passcode": token(bob)})
    await subscribe(receiver, "/user/topic/reply", "r")
    sender, _ = await stomp_connect(spawn, ws_url(nodes.g2), {"passcode": token(alice)})
    payload = {"content": "hi bob", "emoji": "\U0001f41d"}
    await send_with_receipt(
        sender, f"/user/{bob}/topic/reply", json.dumps(payload), "s-1", {"content-type": "application/json"}
    )
    await send_with_receipt(sender, f"/user/{bob}/queue/reply", "plain words", "s-2", {"content-type": "text/plain"})
    first, second = await receiver.messages(2)
    assert first["headers"]["beeline-from"] == alice
    assert json.loads(first["body"]) == payload
    assert second["headers"]["beeline-from"] == alice
    assert json.loads(second["body"]) == "plain words"
    assert seq_of(second) == seq_of(first) + 1
    assert first["headers"]["destination"] == "/user/topic/reply"


async def test_a_refused_send_gets_error_with_a_message_header(nodes: Nodes, spawn: Callable[..., Any]) -> None:
    """SEND to a destination that is not ``/user/<to>/...`` (Spring's ``/app/hello``): ERROR with a
    ``message`` header, then the close; the gateway keeps serving others."""
    (alice,) = users("alice")
    client, _ = await stomp_connect(spawn, ws_url(nodes.g1), {"passcode": token(alice)})
    await client.command("send", destination="/app/hello", body="{}", headers={"receipt": "r-1"})
    error = await client.expect("error")
    assert error["headers"].get("message"), error
    close = await client.expect("close")
    assert close["code"] == CloseCode.PROTOCOL_ERROR, close
    assert not [e for e in client.seen("receipt") if e["headers"].get("receipt-id") == "r-1"]
    _other, connected = await stomp_connect(spawn, ws_url(nodes.g1), {"passcode": token(alice)})
    assert connected["user-name"] == alice


# -- 3. unread on subscribe, channel filter ---------------------------------------------------------------


async def test_unread_messages_arrive_on_subscribe_and_only_for_subscribed_channels(
    nodes: Nodes, spawn: Callable[..., Any], session: aiohttp.ClientSession
) -> None:
    """Sent while bob is offline: reply #1, other #2, reply #3. Subscribing to ``reply`` delivers 1 and 3
    (2 would have come before 3); subscribing to ``/user/queue/other`` later delivers 2."""
    (bob,) = users("bob")
    seqs = []
    for channel in ("reply", "other", "reply"):
        sent = await api_send(session, nodes.router, bob, {"content": channel}, channel=channel)
        assert sent["results"][0]["status"] == "stored", sent
        seqs.append(sent["results"][0]["seq"])
    client, _ = await stomp_connect(spawn, ws_url(nodes.g2), {"passcode": token(bob)})
    await subscribe(client, "/user/topic/reply", "reply")
    first, second = await client.messages(2)
    assert [seq_of(first), seq_of(second)] == [seqs[0], seqs[2]]
    assert {first["headers"]["subscription"], second["headers"]["subscription"]} == {"reply"}
    await subscribe(client, "/user/queue/other", "other")
    (third,) = await client.messages(1)
    assert seq_of(third) == seqs[1]
    assert third["headers"]["destination"] == "/user/queue/other"
    assert third["headers"]["subscription"] == "other"
    assert json.loads(third["body"]) == {"content": "other"}


# -- 5. ack modes across a reconnect ----------------------------------------------------------------------


async def read_cursor(redis_url: str, prefix: str, user: str) -> int:
    client = aioredis.Redis.from_url(redis_url)
    try:
        raw = await client.hget(Keys(prefix).user_meta(user), "acked")
    finally:
        await client.aclose()
    return int(raw or 0)


async def wait_read_cursor(nodes: Nodes, user: str, seq: int) -> None:
    """Acks have no reply: wait until the user's read cursor in Redis is ``seq``."""

    async def reached() -> bool:
        return await read_cursor(nodes.cluster.redis_url, nodes.cluster.prefix, user) == seq

    await eventually(reached, timeout=5, what=f"{user} read cursor == {seq}")


async def test_client_ack_is_cumulative_and_unacked_messages_come_again(
    nodes: Nodes, spawn: Callable[..., Any], session: aiohttp.ClientSession
) -> None:
    """``ack:client``: of three messages, ACK of the second acknowledges 1-2; after a reconnect the third
    (unacknowledged) is delivered again, 1 and 2 are not."""
    (bob,) = users("bob")
    client, _ = await stomp_connect(spawn, ws_url(nodes.g1), {"passcode": token(bob)})
    await subscribe(client, "/user/topic/reply", "s", ack="client")
    seqs = [
        (await api_send(session, nodes.router, bob, {"i": i}, channel="reply"))["results"][0]["seq"] for i in range(3)
    ]
    received = await client.messages(3)
    assert [seq_of(m) for m in received] == seqs
    await client.command("ack", messageId=received[1]["headers"]["message-id"])
    await wait_read_cursor(nodes, bob, seqs[1])
    await client.command("disconnect")
    await client.expect("close")

    again, _ = await stomp_connect(spawn, ws_url(nodes.g2), {"passcode": token(bob)})
    await subscribe(again, "/user/topic/reply", "s", ack="client")
    (redelivered,) = await again.messages(1)
    assert seq_of(redelivered) == seqs[2]
    assert redelivered["headers"]["message-id"] == received[2]["headers"]["message-id"]
    assert json.loads(redelivered["body"]) == {"i": 2}


async def test_auto_ack_messages_are_not_delivered_again(
    nodes: Nodes, spawn: Callable[..., Any], session: aiohttp.ClientSession
) -> None:
    """``ack:auto`` (the default): written is read, so after a reconnect only new messages arrive."""
    (bob,) = users("bob")
    client, _ = await stomp_connect(spawn, ws_url(nodes.g1), {"passcode": token(bob)})
    await subscribe(client, "/user/topic/reply", "s")
    for i in range(3):
        await api_send(session, nodes.router, bob, {"i": i}, channel="reply")
    received = await client.messages(3)
    await wait_read_cursor(nodes, bob, seq_of(received[-1]))
    await client.command("disconnect")
    await client.expect("close")

    again, _ = await stomp_connect(spawn, ws_url(nodes.g1), {"passcode": token(bob)})
    await subscribe(again, "/user/topic/reply", "s")
    fresh = await api_send(session, nodes.router, bob, {"i": 3}, channel="reply")
    (first,) = await again.messages(1)
    assert seq_of(first) == fresh["results"][0]["seq"] == seq_of(received[-1]) + 1


# -- 6. heart-beats ---------------------------------------------------------------------------------------


async def test_heart_beats_are_kept_both_ways(
    cluster: Cluster, spawn: Callable[..., Any], session: aiohttp.ClientSession
) -> None:
    """With the gateway offering 500 ms: a client that beats (@stomp/stompjs, 500 ms) stays connected; a
    raw client that negotiates 500,500 and then goes silent sees the server's own beats (EOLs) and is
    closed with 4002 (heart-beat missed) within a bounded time, not before its interval."""
    gateway = cluster.gateway("hb", BEELINE_STOMP_HEARTBEAT_MS="500")
    alice, bob = users("alice", "bob")
    beating, connected = await stomp_connect(spawn, ws_url(gateway), {"passcode": token(alice)}, heartbeat=[500, 500])
    assert connected["heart-beat"] == "500,500", connected

    silent = await RawStomp.open(session, gateway)
    reply = await silent.connect(bob, **{"heart-beat": "500,500"})
    assert reply.headers["heart-beat"] == "500,500", reply
    connected_at = time.monotonic()
    code = await silent.until_closed(timeout=5)
    silent_for = time.monotonic() - connected_at
    assert code == CloseCode.HEARTBEAT_MISSED
    assert 0.5 <= silent_for < 5, silent_for
    assert silent.beats >= 1, "the server sent no heart-beat"
    assert not silent.frames, silent.frames

    # The beating client was connected for longer than the silent one and is still served.
    await send_with_receipt(beating, f"/user/{bob}/topic/reply", "still here", "alive")
    assert not beating.seen("close"), beating.seen("close")


# -- 7. bad frames ----------------------------------------------------------------------------------------


async def test_malformed_frames_get_error_then_close_and_others_keep_working(
    nodes: Nodes, spawn: Callable[..., Any], session: aiohttp.ClientSession
) -> None:
    """Garbage instead of CONNECT, a header line without a colon, a bad content-length, and a STOMP frame
    over the frame limit (in WebSocket messages under it) each get ERROR with a ``message`` header and
    the close 1002; one WebSocket message over the limit is closed with 1009. A connection on the same
    gateway is served throughout."""
    alice, bob = users("alice", "bob")
    bystander, _ = await stomp_connect(spawn, ws_url(nodes.g1), {"passcode": token(bob)})
    await subscribe(bystander, "/user/topic/reply", "s")

    garbage = await RawStomp.open(session, nodes.g1)
    await garbage.send("\x01\x02 this is not stomp \x00")
    error, code = await garbage.error_then_close()
    assert error.headers.get("message") and code == CloseCode.PROTOCOL_ERROR, (error, code)

    for bad in (
        "SEND\ndestination-without-a-colon\n\nbody\x00",
        f"SEND\ndestination:/user/{bob}/topic/reply\ncontent-length:abc\n\nbody\x00",
    ):
        raw = await RawStomp.open(session, nodes.g1)
        await raw.connect(alice)
        await raw.send(bad)
        error, code = await raw.error_then_close()
        assert error.headers.get("message") and code == CloseCode.PROTOCOL_ERROR, (bad, error, code)

    chunked = await RawStomp.open(session, nodes.g1)
    await chunked.connect(alice)
    await chunked.send(f"SEND\ndestination:/user/{bob}/topic/reply\n\n")
    # Four 32 KiB messages: the fourth takes the frame past the limit, and nothing is sent after it
    # (a send racing the server's close would fail on the client's side, not on Beeline's).
    for _ in range(MAX_FRAME_BYTES // CHUNK_BYTES):
        await chunked.send("a" * CHUNK_BYTES)
    error, code = await chunked.error_then_close()
    assert error.headers.get("message") and code == CloseCode.PROTOCOL_ERROR, (error, code)

    whole = await RawStomp.open(session, nodes.g1)
    await whole.connect(alice)
    await whole.send(encode("SEND", {"destination": f"/user/{bob}/topic/reply"}, "b" * (MAX_FRAME_BYTES + 1)))
    assert await whole.until_closed() == CloseCode.MESSAGE_TOO_BIG

    await api_send(session, nodes.router, bob, {"content": "after the bad frames"}, channel="reply")
    (message,) = await bystander.messages(1)
    assert json.loads(message["body"]) == {"content": "after the bad frames"}
    assert nodes.g1.proc is not None and nodes.g1.proc.poll() is None
    assert not bystander.seen("close")


# -- 8. UNSUBSCRIBE, DISCONNECT ---------------------------------------------------------------------------


async def test_unsubscribe_stops_a_channel_and_disconnect_gets_its_receipt(
    nodes: Nodes, spawn: Callable[..., Any], session: aiohttp.ClientSession
) -> None:
    """After UNSUBSCRIBE of ``news``, a ``news`` message is not delivered (the later ``reply`` one comes
    first, and delivery is in order); DISCONNECT with a receipt gets that RECEIPT, then the close."""
    (bob,) = users("bob")
    client, _ = await stomp_connect(spawn, ws_url(nodes.g1), {"passcode": token(bob)})
    await subscribe(client, "/user/topic/reply", "reply")
    await subscribe(client, "/user/topic/news", "news")
    await api_send(session, nodes.router, bob, {"content": "news 1"}, channel="news")
    (news,) = await client.messages(1)
    assert news["headers"]["subscription"] == "news"

    await client.command("unsubscribe", id="news", receipt="unsub")
    await client.expect("receipt", where=lambda e: e["headers"].get("receipt-id") == "unsub")
    await api_send(session, nodes.router, bob, {"content": "news 2"}, channel="news")
    last = await api_send(session, nodes.router, bob, {"content": "reply 1"}, channel="reply")
    (reply,) = await client.messages(1)
    assert seq_of(reply) == last["results"][0]["seq"], reply
    assert reply["headers"]["subscription"] == "reply"

    await client.command("disconnect", receipt="bye-1")
    disconnected = await client.expect("disconnected")
    assert disconnected["headers"]["receipt-id"] == "bye-1"
    await client.expect("close")


# -- 9. the original page's stack: sockjs-client 1.1.4 + stompjs 2.3.3 ------------------------------------


@pytest.mark.parametrize("transport", ["websocket", "xhr-streaming", "xhr-polling"])
async def test_sockjs_and_stompjs_2_over_each_transport(
    transport: str, nodes: Nodes, spawn: Callable[..., Any], session: aiohttp.ClientSession
) -> None:
    """``Stomp.over(new SockJS(url, null, {transports: [transport]}))`` as the original page does: bob
    with the token in the SockJS URL, alice with it in the CONNECT headers; bob receives a router-sent
    ``{content}`` on ``/user/topic/reply``, then sends to alice on the other gateway."""
    alice, bob = users("alice", "bob")

    async def connect(service: Service, query: str, headers: dict[str, str]) -> tuple[JsClient, dict[str, Any]]:
        client: JsClient = await spawn("sockjs_client.mjs")
        await client.command("connect", url=sockjs_url(service, query), transport=transport, headers=headers)
        opened = await client.expect("open")
        assert opened["transport"] == transport, opened
        connected = await client.expect("connected")
        return client, connected["headers"]

    bob_client, bob_connected = await connect(nodes.g1, f"?token={token(bob)}", {})
    assert bob_connected["user-name"] == bob, bob_connected
    assert bob_connected["version"] == "1.1", bob_connected  # stompjs 2.3.3 offers 1.1,1.0
    alice_client, alice_connected = await connect(nodes.g2, "", {"passcode": token(alice)})
    assert alice_connected["user-name"] == alice, alice_connected

    for client in (bob_client, alice_client):
        await client.command("subscribe", destination="/user/topic/reply", id="sub-0", receipt="subscribed")
        await client.expect("receipt", where=lambda e: e["headers"].get("receipt-id") == "subscribed")

    sent = await api_send(
        session, nodes.router, bob, {"content": f"over {transport}"}, channel="reply", **{"from": "svc-chat"}
    )
    (message,) = await bob_client.messages(1)
    assert json.loads(message["body"]) == {"content": f"over {transport}"}
    headers = message["headers"]
    assert headers["destination"] == "/user/topic/reply"
    assert headers["subscription"] == "sub-0"
    assert int(headers["beeline-seq"]) == sent["results"][0]["seq"]
    assert headers["content-type"].split(";")[0] == "application/json"
    assert headers["message-id"] and headers["beeline-epoch"]
    assert headers["beeline-from"] == "svc-chat"

    await bob_client.command(
        "send",
        destination=f"/user/{alice}/topic/reply",
        headers={"content-type": "application/json", "receipt": "to-alice"},
        body=json.dumps({"content": "hi alice"}),
    )
    await bob_client.expect("receipt", where=lambda e: e["headers"].get("receipt-id") == "to-alice")
    (to_alice,) = await alice_client.messages(1)
    assert to_alice["headers"]["beeline-from"] == bob
    assert json.loads(to_alice["body"]) == {"content": "hi alice"}
    assert not bob_client.seen("error") and not alice_client.seen("error")
