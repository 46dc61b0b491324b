"""The router's lean HTTP/1.1 front (router/fastpath.py) against a real router process, over raw sockets.

The front answers plain ``POST /v1/messages`` requests itself (``Server: beeline``) and hands the
connection, with every byte it has not answered, to aiohttp (``Server: Python/... aiohttp/...``) for
anything else. Pinned here: keep-alive and pipelined sends (also split at awkward byte boundaries) are
answered in order with the same 202 body aiohttp gives; after a hand-over the connection keeps
working on aiohttp; every request the front must not answer (chunked body, Idempotency-Key, Expect,
Upgrade, Connection, duplicate headers, malformed heads, HTTP/1.0, heads over 8 KiB, bodies over
1 MiB) is answered as aiohttp answers it; the front's error answers equal aiohttp's for the same bytes
and leave the connection usable; /metrics counts the front's requests under ``/v1/messages``; and a
client that half-closes after its request still gets its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from router.fastpath import FastPathFront, _plain_send
from shared.config import RouterConfig, load
from shared.envelope import Envelope
from shared.errors import ConfigError
from shared.keys import Keys
from shared.redis import RedisClient
from shared.routing import Message, SendResult
from tests.observability.support import metrics_text, scrape
from tests.support import API_KEY, Client, Cluster, Service, eventually, proc_stat_fields, wait_until

pytestmark = pytest.mark.redis

FAST_SERVER = "beeline"
AUTH = f"Authorization: Bearer {API_KEY}"
MAX_BODY_BYTES = 1024 * 1024  # router.fastpath.MAX_BODY_BYTES: larger bodies go to aiohttp


def http(
    method: str, path: str, *lines: str, body: bytes = b"", version: str = "HTTP/1.1", length: bool = True
) -> bytes:
    """One request's bytes: request line, ``Host``, ``lines``, then ``Content-Length`` (unless told not)."""
    head = [f"{method} {path} {version}", "Host: 127.0.0.1", *lines]
    if length:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def send_body(to: str | list[str], payload: Any = "hi", **extra: Any) -> bytes:
    return json.dumps({"to": to, "channel": "chat", "payload": payload, **extra}).encode()


def send(to: str | list[str], payload: Any = "hi", *lines: str, auth: str | None = AUTH, **kwargs: Any) -> bytes:
    """A ``POST /v1/messages`` (a plain one, which the front answers, unless ``lines`` say otherwise)."""
    head = (auth,) if auth is not None else ()
    return http(
        "POST", "/v1/messages", *head, "Content-Type: application/json", *lines, body=send_body(to, payload), **kwargs
    )


HEALTHZ = http("GET", "/healthz", length=False)


@dataclass
class Answer:
    """One HTTP response as read off the socket; header names lower-cased."""

    version: str
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def server(self) -> str:
        return self.headers.get("server", "")

    @property
    def fast(self) -> bool:
        """Answered by the front (aiohttp's answers name aiohttp in ``Server``)."""
        return self.server == FAST_SERVER

    @property
    def by_aiohttp(self) -> bool:
        return "aiohttp/" in self.server

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str:
        """The ``error.code`` of a JSON error body (fails the test when the body is not one)."""
        body = self.json()
        assert isinstance(body, dict) and set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"code", "message"}, error
        assert isinstance(error["code"], str) and isinstance(error["message"], str) and error["message"], error
        return str(error["code"])

    def seq(self, index: int = 0) -> int:
        assert self.status == 202, self
        return int(self.json()["results"][index]["seq"])

    def comparable_headers(self) -> dict[str, str]:
        """Headers that must be equal between the two layers' answers (not Date, Server)."""
        return {k: v for k, v in self.headers.items() if k not in ("date", "server")}


class Connection:
    """A raw HTTP/1.1 client connection: writes exact bytes, reads answers one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, timeout: float = 10.0) -> Answer:
        """The next response (a 1xx too); its body by Content-Length, else up to the server's close."""
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
            version, status, _ = status_line.split(" ", 2)
            headers: dict[str, str] = {}
            for line in lines:
                name, _, value = line.partition(":")
                assert name.lower() not in headers, f"duplicate header {name}: {head!r}"
                headers[name.lower()] = value.strip()
            if int(status) < 200:
                body = b""
            elif "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"]))
            else:
                assert "transfer-encoding" not in headers, head
                body = await self.reader.read()
        return Answer(version, int(status), headers, body)

    async def answer_or_close(self, timeout: float = 10.0) -> Answer | None:
        """The next response, or None when the server closes the connection instead."""
        try:
            return await self.answer(timeout)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise
            return None

    async def exchange(self, data: bytes, timeout: float = 10.0) -> Answer:
        await self.write(data)
        return await self.answer(timeout)

    async def closed_by_server(self, timeout: float = 10.0) -> bool:
        """The server closes the connection (EOF) within ``timeout``, with nothing more to read."""
        async with asyncio.timeout(timeout):
            rest = await self.reader.read()
        assert rest == b"", rest
        return True

    async def assert_silent(self, seconds: float = 0.05) -> None:
        """Nothing (no answer, no close) arrives within ``seconds``: the server waits for the rest of a
        request. Also gives the server the chance to read what was written as a separate segment."""
        with contextlib.suppress(TimeoutError):
            data = await asyncio.wait_for(self.reader.read(1), seconds)
            raise AssertionError(f"expected silence, got {data!r}")

    async def half_close(self) -> None:
        """shutdown(SHUT_WR): the client sends nothing more but keeps reading."""
        self.writer.write_eof()
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


Connect = Callable[[Service], Awaitable[Connection]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Opens raw connections to a service's port; closes every one after the test."""
    opened: list[Connection] = []

    async def open_connection(service: Service) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        opened.append(Connection(reader, writer))
        return opened[-1]

    yield open_connection
    for connection in opened:
        await connection.close()


async def aiohttp_connection(connect: Connect, router: Service) -> Connection:
    """A connection already handed over to aiohttp (by a GET /healthz first)."""
    connection = await connect(router)
    health = await connection.exchange(HEALTHZ)
    assert (health.status, health.json()) == (200, {"status": "ok"}) and health.by_aiohttp, health
    return connection


def shape(value: Any) -> Any:
    """The JSON structure without its values: key order, types, list lengths."""
    if isinstance(value, dict):
        return [(k, shape(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


# -- keep-alive and pipelining -------------------------------------------------------------------------


async def test_keepalive_sends_are_answered_by_the_front_like_aiohttp(
    cluster: Cluster, session: aiohttp.ClientSession, connect: Connect
) -> None:
    """Several plain sends on one kept-alive connection are each answered 202 by the front, with seqs
    1..n in order for the receiver, ``routed`` to its gateway; the receiver gets them in order with
    the answered ids. The 202 is the one aiohttp gives for the same send: same headers (but Date and
    Server), same JSON structure, byte for byte the same formatting."""
    gw = cluster.gateway("g1")
    router = cluster.router()
    alice = await Client.connect(session, gw, "alice")
    connection = await connect(router)
    answers = [await connection.exchange(send("alice", f"m{i}")) for i in range(1, 6)]
    for i, answer in enumerate(answers, start=1):
        assert answer.fast and answer.version == "HTTP/1.1" and answer.status == 202, answer
        body = answer.json()
        assert len(body["id"]) == 32, body
        assert body["results"] == [{"to": "alice", "seq": i, "epoch": alice.epoch, "status": "routed", "nodes": ["g1"]}]
    messages = await alice.wait_messages(5)
    assert [(m["seq"], m["payload"], m["id"]) for m in messages] == [
        (i, f"m{i}", a.json()["id"]) for i, a in enumerate(answers, start=1)
    ]

    slow = await (await aiohttp_connection(connect, router)).exchange(send("alice", "m6"))
    assert slow.by_aiohttp and slow.status == 202 and slow.seq() == 6, slow
    fast = answers[-1]
    assert shape(fast.json()) == shape(slow.json())
    assert fast.comparable_headers().keys() == slow.comparable_headers().keys()
    assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json; charset=utf-8"
    for answer in (fast, slow):
        # Both layers answer in the same compact JSON (shared.http / shared.protocol.dumps_json).
        assert answer.body == json.dumps(answer.json(), separators=(",", ":")).encode(), answer.body
        assert int(answer.headers["content-length"]) == len(answer.body)
    await alice.close()


async def test_pipelined_requests_are_answered_in_order(cluster: Cluster, connect: Connect) -> None:
    """Requests written ahead of their answers are answered in request order: six in one write, then
    four written in pieces split at awkward places (after the first byte, inside the request line and
    a header name, between the CR LF CR and LF that end the head, inside bodies, and with one write
    holding the end of a request and the start of the next). Nothing is answered, and the connection is
    not handed over, while a request is incomplete."""
    router = cluster.router()
    connection = await connect(router)
    await connection.write(b"".join(send(["alice", f"r{i}"], i) for i in range(6)))
    for i in range(6):
        answer = await connection.answer()
        assert answer.fast and answer.status == 202, answer
        assert [(r["to"], r["seq"]) for r in answer.json()["results"]] == [("alice", i + 1), (f"r{i}", 1)]

    async def fast_seq() -> int:
        answer = await connection.answer()
        assert answer.fast, answer
        return answer.seq()

    r6, r7, r8, r9 = (send(["alice", f"r{i}"], "x" * 40) for i in range(6, 10))
    end6 = r6.index(b"\r\n\r\n")
    pieces6 = [
        r6[:1],
        r6[1 : r6.index(b"/v1/mes") + 7],
        r6[r6.index(b"/v1/mes") + 7 : r6.index(b"Content-Length") + 7],
        r6[r6.index(b"Content-Length") + 7 : end6 + 3],
        r6[end6 + 3 : end6 + 4],
        r6[end6 + 4 : end6 + 20],
    ]
    for piece in pieces6:
        await connection.write(piece)
        await connection.assert_silent()
    await connection.write(r6[end6 + 20 :] + r7[:20])
    assert await fast_seq() == 7
    split7 = [r7.index(b"Authorization") + 5, r7.index(b"\r\n\r\n") + 10]
    await connection.write(r7[20 : split7[0]])
    await connection.assert_silent()
    await connection.write(r7[split7[0] : split7[1]])
    await connection.assert_silent()
    await connection.write(r7[split7[1] :] + r8 + r9[: r9.index(b"\r\n\r\n") + 2])
    assert await fast_seq() == 8
    assert await fast_seq() == 9
    await connection.assert_silent()
    await connection.write(r9[r9.index(b"\r\n\r\n") + 2 :])
    last = await connection.answer()
    assert last.fast and [(r["to"], r["seq"]) for r in last.json()["results"]] == [("alice", 10), ("r9", 1)], last


async def test_sends_arriving_together_on_many_connections_each_get_their_own_answer(
    cluster: Cluster, connect: Connect
) -> None:
    """Sends written at once on many connections, which the front takes in shared passes when they
    arrive in one loop turn: each request still gets its own answer, in its connection's order, a bad
    one among them its own 400 at once, a many-receiver one its results, and every user's seqs are
    gapless and unique."""
    router = cluster.router()
    connections = [await connect(router) for _ in range(24)]
    users = ["alice", "bob", "carol"]
    for i, connection in enumerate(connections):
        bad = http("POST", "/v1/messages", AUTH, body=b'{"to": ')
        connection.writer.write(send(users[i % 3], i) + bad + send(["dave", users[i % 3]], i))
    seqs: dict[str, list[int]] = {user: [] for user in [*users, "dave"]}
    ids = set()
    for i, connection in enumerate(connections):
        first, bad_answer, multi = [await connection.answer() for _ in range(3)]
        assert first.fast and first.status == 202, first
        assert [r["to"] for r in first.json()["results"]] == [users[i % 3]]
        assert (bad_answer.status, bad_answer.code) == (400, "bad_json"), bad_answer
        assert [r["to"] for r in multi.json()["results"]] == ["dave", users[i % 3]], multi
        for answer in (first, multi):
            ids.add(answer.json()["id"])
            for result in answer.json()["results"]:
                seqs[result["to"]].append(result["seq"])
    assert len(ids) == 48
    for user, got in seqs.items():
        assert sorted(got) == list(range(1, len(got) + 1)), (user, got)


@pytest.mark.parametrize("half_close", [False, True])
async def test_a_flood_of_bad_requests_is_answered_in_order_over_several_turns(
    half_close: bool, cluster: Cluster, connect: Connect
) -> None:
    """Bad requests pipelined in one write are answered at once, but only SYNC_ANSWERS_PER_TURN per
    loop turn (the rest in later turns, so one client's flood does not hold the loop): all 100, in
    order, then the send behind them, also when the client half-closes right after writing."""
    router = cluster.router()
    connection = await connect(router)
    await connection.write(send("alice", auth=None) * 100 + send("alice"))
    if half_close:
        await connection.half_close()
    for _ in range(100):
        answer = await connection.answer()
        assert (answer.status, answer.code) == (401, "unauthorized"), answer
    assert (await connection.answer()).seq() == 1
    if half_close:
        assert await connection.closed_by_server()


async def test_a_send_that_fails_in_redis_fails_alone(
    cluster: Cluster, connect: Connect, session: aiohttp.ClientSession, redis_client: RedisClient, keys: Keys
) -> None:
    """A send whose mailbox script gets an error reply (a key of the wrong type here) is answered 500;
    the send that arrives with it in the same pass (the router is stopped while both are written, so it
    reads them in one turn: one timed mailbox_append for the two) is stored once and answered 202."""
    router = cluster.router()
    assert router.proc is not None
    pid = router.proc.pid
    await redis_client.set(keys.user_meta("mallory"), "not a hash")
    good, bad = await connect(router), await connect(router)
    assert (await good.exchange(send("alice"))).seq() == 1
    appends = ("beeline_redis_command_duration_seconds_count", (("op", "mailbox_append"), ("service", "router")))
    before = (await metric_values(session, router))[appends]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: proc_stat_fields(pid)[0] == "T", timeout=5, what="the router to stop")
        good.writer.write(send("alice"))
        bad.writer.write(send("mallory"))
        await good.writer.drain()
        await bad.writer.drain()
    finally:
        os.kill(pid, signal.SIGCONT)
    failed = await bad.answer()
    assert (failed.status, failed.code) == (500, "internal"), failed
    assert (await good.answer()).seq() == 2
    assert await redis_client.xlen(keys.mailbox("alice")) == 2
    assert (await metric_values(session, router))[appends] == before + 1, "both sends in one pass"


async def test_one_connection_failing_to_go_on_does_not_leave_the_rest_of_its_pass_unanswered() -> None:
    """A pass answers its requests one by one; if going on with one connection fails (a bug), that
    connection is closed and the others of the pass still get their answers."""

    class Sender:
        isolates_sends = True

        async def send_separately(self, messages: list[Message], _packed: Any) -> list[list[SendResult]]:
            return [[SendResult(m.to[0], 1, "e", "stored", ())] for m in messages]

    class Router:
        sender = Sender()

    class Protocol:
        def __init__(self, fails: bool) -> None:
            self.fails = fails
            self.answers: list[int] = []
            self.closed = False

        def write_answer(self, status: int, payload: bytes, headers: Any, start: float) -> None:
            self.answers.append(status)

        def go_on(self) -> None:
            if self.fails:
                raise RuntimeError("bug")

        def close(self) -> None:
            self.closed = True

    front = FastPathFront(Router(), asyncio.Protocol)  # type: ignore[arg-type]
    front.loop = asyncio.get_running_loop()
    first, failing, last = Protocol(False), Protocol(True), Protocol(False)
    envelope = Envelope.create(sender="system", channel="c", payload=1)
    tasks = {front.submit(p, Message(envelope, ("alice",)), b"", 0.0) for p in (first, failing, last)}  # type: ignore[arg-type]
    assert len(tasks) == 1, "one pass"
    await tasks.pop()
    assert (first.answers, failing.answers, last.answers) == ([202], [202], [202])
    assert failing.closed and not first.closed and not last.closed


# -- hand-over to aiohttp ------------------------------------------------------------------------------


async def test_hand_over_to_aiohttp_keeps_the_connection_working(cluster: Cluster, connect: Connect) -> None:
    """On one connection: a plain send (front), GET /healthz (aiohttp), then POST /v1/messages again,
    now answered by aiohttp (the hand-over is for good), 202 with the next seq, and more requests after
    it. The same sequence written in one go is answered in order, by the same layers."""
    router = cluster.router()
    connection = await connect(router)
    first = await connection.exchange(send("alice", 1))
    assert first.fast and first.seq() == 1, first
    health = await connection.exchange(HEALTHZ)
    assert health.by_aiohttp and (health.status, health.json()) == (200, {"status": "ok"}), health
    for seq in (2, 3):
        again = await connection.exchange(send("alice", seq))
        assert again.by_aiohttp and again.seq() == seq, again
    wrong = await connection.exchange(http("GET", "/v1/messages", AUTH, length=False))
    assert wrong.by_aiohttp and (wrong.status, wrong.code) == (405, "method_not_allowed"), wrong
    after = await connection.exchange(send("alice", 4))
    assert after.by_aiohttp and after.seq() == 4, after

    pipelined = await connect(router)
    await pipelined.write(send("alice", 5) + HEALTHZ + send("alice", 6) + send("alice", 7))
    answers = [await pipelined.answer() for _ in range(4)]
    assert [(a.fast, a.status) for a in answers] == [(True, 202), (False, 200), (False, 202), (False, 202)], answers
    assert all(a.by_aiohttp for a in answers[1:]), answers
    assert [answers[0].seq(), answers[2].seq(), answers[3].seq()] == [5, 6, 7]


async def test_requests_the_front_must_not_answer_are_answered_by_aiohttp(cluster: Cluster, connect: Connect) -> None:
    """Each request that is not a plain send goes to aiohttp with its connection, and gets aiohttp's
    answer: a chunked body, Expect, Upgrade and Connection headers, a query string, a missing
    Content-Length, duplicate Authorization (aiohttp reads the first), duplicate Content-Length,
    malformed header lines and obs-fold (400, closed), HTTP/1.0 (answered in HTTP/1.0, closed), a head
    over 8 KiB, a body over 1 MiB. A connection aiohttp keeps open answers the next plain send on
    aiohttp too; the seqs show exactly the 202s were stored. A body of exactly 1 MiB is still the
    front's."""
    router = cluster.router()
    body = send_body("alice")
    chunked = b"a\r\n" + body[:10] + b"\r\n" + f"{len(body) - 10:x}\r\n".encode() + body[10:]
    padding = [f"X-Pad-{i}: " + "p" * 3000 for i in range(3)]
    over = send_body("alice", "")
    over = send_body("alice", "x" * (MAX_BODY_BYTES + 1 - len(over)))
    assert len(over) == MAX_BODY_BYTES + 1
    post = "POST", "/v1/messages", AUTH
    # name, request, status, error code (None: no JSON error), closed by the server after the answer
    cases: list[tuple[str, bytes, int, str | None, bool]] = [
        (
            "chunked",
            http(*post, "Transfer-Encoding: chunked", body=chunked + b"\r\n0\r\n\r\n", length=False),
            202,
            None,
            False,
        ),
        ("expect", http(*post, "Expect: 100-continue", body=body), 202, None, False),
        ("upgrade", http(*post, "Upgrade: h2c", body=body), 202, None, False),
        ("connection keep-alive", http(*post, "Connection: keep-alive", body=body), 202, None, False),
        ("connection close", http(*post, "Connection: close", body=body), 202, None, True),
        ("query string", http("POST", "/v1/messages?x=1", AUTH, body=body), 202, None, False),
        ("no content-length", http(*post, length=False), 400, "bad_json", False),
        ("duplicate authorization", http(*post, "Authorization: Bearer wrong", body=body), 202, None, False),
        (
            "duplicate authorization, wrong first",
            http("POST", "/v1/messages", "Authorization: Bearer wrong", AUTH, body=body),
            401,
            "unauthorized",
            False,
        ),
        ("duplicate content-length", http(*post, f"Content-Length: {len(body)}", body=body), 400, None, True),
        ("header line without colon", http(*post, "NoColonHere", body=body), 400, None, True),
        ("space before colon", http(*post, "X-Thing : 1", body=body), 400, None, True),
        ("obs-fold", http(*post, "X-Thing: 1", " folded", body=body), 400, None, True),
        ("HTTP/1.0", http(*post, body=body, version="HTTP/1.0"), 202, None, True),
        ("head over 8 KiB", http(*post, *padding, body=body), 202, None, False),
        ("body over 1 MiB", http(*post, body=over), 413, "payload_too_large", False),
    ]
    failures = []
    seq = 0
    for name, request, status, code, closes in cases:
        connection = await connect(router)
        answer = await connection.exchange(request)
        if name == "expect" and answer.status == 100:
            answer = await connection.answer()
        if status == 202:
            seq += 1
        if answer.fast or not answer.by_aiohttp:
            failures.append(f"{name}: answered by {answer.server!r}")
        if answer.status != status or (code is not None and answer.code != code):
            failures.append(f"{name}: expected {status} {code}, got {answer.status} {answer.body[:200]!r}")
        elif status == 202 and answer.seq() != seq:
            failures.append(f"{name}: expected seq {seq}, got {answer.json()}")
        if name == "HTTP/1.0" and answer.version != "HTTP/1.0":
            failures.append(f"{name}: answered in {answer.version}")
        if closes:
            await connection.closed_by_server()
        else:
            seq += 1
            await connection.write(send("alice"))
            next_send = await connection.answer_or_close()
            if next_send is None:
                failures.append(f"{name}: the connection was closed before the next send was answered")
                seq -= 1  # unless it was stored anyway: the seqs after this will tell
                continue
            if not next_send.by_aiohttp or next_send.status != 202 or next_send.seq() != seq:
                failures.append(f"{name}: the next send got {next_send.server} {next_send.status} {next_send.body!r}")
    assert not failures, "\n".join(failures)

    exact = send_body("alice", "")
    exact = send_body("alice", "x" * (MAX_BODY_BYTES - len(exact)))
    assert len(exact) == MAX_BODY_BYTES
    connection = await connect(router)
    answer = await connection.exchange(http(*post, body=exact))
    assert answer.fast and (answer.status, answer.code) == (413, "payload_too_large"), answer
    assert (await connection.exchange(send("alice"))).seq() == seq + 1


async def test_idempotency_key_requests_are_answered_by_aiohttp(cluster: Cluster, connect: Connect) -> None:
    """A send with an Idempotency-Key is aiohttp's: 202 with ``Idempotent-Replayed: false``; the same
    request again on that connection, and as the first request of a new one, replays the same id and
    seq with ``Idempotent-Replayed: true``; the connection then keeps working on aiohttp."""
    router = cluster.router()
    keyed = send("alice", "once", "Idempotency-Key: order-1")
    connection = await connect(router)
    first = await connection.exchange(keyed)
    assert first.by_aiohttp and first.status == 202 and first.headers["idempotent-replayed"] == "false", first
    assert first.seq() == 1
    for replay in (await connection.exchange(keyed), await (await connect(router)).exchange(keyed)):
        assert replay.by_aiohttp and replay.status == 202, replay
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.json() == first.json()
    after = await connection.exchange(send("alice", "after"))
    assert after.by_aiohttp and after.seq() == 2 and "idempotent-replayed" not in after.headers, after


# -- the front's own error answers ---------------------------------------------------------------------


async def test_front_error_answers_equal_aiohttps_and_keep_the_connection(cluster: Cluster, connect: Connect) -> None:
    """The front answers a plain send's failures as the app does: 401 ``unauthorized`` with
    ``WWW-Authenticate: Bearer`` (no key, unknown key, other scheme), 400 ``bad_json``, 400
    ``invalid_field``, 400 ``too_many_receivers`` and 413 ``payload_too_large``, each a JSON
    {error: {code, message}} with the same status, headers (but Date, Server) and body aiohttp gives for
    the same bytes. The connection stays usable after each, and nothing was stored."""
    router = cluster.router(BEELINE_MAX_RECEIVERS="3", BEELINE_MAX_PAYLOAD_BYTES="1024")

    def post(body: bytes, auth: str | None = AUTH) -> bytes:
        return http("POST", "/v1/messages", *((auth,) if auth is not None else ()), body=body)

    cases: list[tuple[str, bytes, int, str]] = [
        ("no key", post(send_body("alice"), auth=None), 401, "unauthorized"),
        ("unknown key", post(send_body("alice"), auth="Authorization: Bearer not-the-key"), 401, "unauthorized"),
        ("other scheme", post(send_body("alice"), auth=f"Authorization: Basic {API_KEY}"), 401, "unauthorized"),
        ("bearer without key", post(send_body("alice"), auth="Authorization: Bearer"), 401, "unauthorized"),
        ("not json", post(b"{not json"), 400, "bad_json"),
        ("empty body", post(b""), 400, "bad_json"),
        ("json array", post(b'[{"to": "alice"}]'), 400, "bad_json"),
        ("invalid utf-8", post(b'{"to": "\xff\xfe"}'), 400, "bad_json"),
        ("to a number", post(send_body(5)), 400, "invalid_field"),  # type: ignore[arg-type]
        ("channel missing", post(b'{"to": "alice", "payload": 1}'), 400, "invalid_field"),
        ("from empty", post(send_body("alice", **{"from": ""})), 400, "invalid_field"),
        ("too many receivers", post(send_body(["alice", "b", "c", "d"])), 400, "too_many_receivers"),
        ("payload too large", post(send_body("alice", "x" * 2048)), 413, "payload_too_large"),
    ]
    fast = await connect(router)
    slow = await aiohttp_connection(connect, router)
    failures = []
    for name, request, status, code in cases:
        mine = await fast.exchange(request)
        theirs = await slow.exchange(request)
        assert mine.fast and theirs.by_aiohttp, (name, mine, theirs)
        if (mine.status, mine.code) != (status, code):
            failures.append(f"{name}: expected {status} {code}, got {mine.status} {mine.body!r}")
        if (mine.status, mine.body, mine.comparable_headers()) != (
            theirs.status,
            theirs.body,
            theirs.comparable_headers(),
        ):
            failures.append(f"{name}: front {mine} != aiohttp {theirs}")
        if status == 401 and mine.headers.get("www-authenticate") != "Bearer":
            failures.append(f"{name}: WWW-Authenticate {mine.headers.get('www-authenticate')!r}")
    assert not failures, "\n".join(failures)
    ok = await fast.exchange(send(["alice", "b"]))
    assert ok.fast and [r["seq"] for r in ok.json()["results"]] == [1, 1], ok


# -- metrics -------------------------------------------------------------------------------------------


async def metric_values(
    session: aiohttp.ClientSession, router: Service
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in scrape(await metrics_text(session, router))}


async def test_metrics_count_front_requests_under_the_route(
    cluster: Cluster, session: aiohttp.ClientSession, connect: Connect
) -> None:
    """The front's requests are counted in ``beeline_http_requests_total`` under route
    ``/v1/messages`` by status, timed in ``beeline_http_request_duration_seconds``, and its rejections
    counted in ``beeline_rejections_total`` by code, like aiohttp's."""
    router = cluster.router()
    before = await metric_values(session, router)
    connection = await connect(router)
    answers = [await connection.exchange(send("alice", i)) for i in range(3)]
    answers.append(await connection.exchange(send("alice", auth=None)))
    answers.append(await connection.exchange(http("POST", "/v1/messages", AUTH, body=b"{x")))
    assert [(a.fast, a.status) for a in answers] == [(True, 202)] * 3 + [(True, 401), (True, 400)], answers
    after = await metric_values(session, router)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    route = {"service": "router", "route": "/v1/messages"}
    requests = {
        status: delta("beeline_http_requests_total", **route, status=status) for status in ("202", "401", "400")
    }
    assert requests == {"202": 3, "401": 1, "400": 1}, requests
    assert delta("beeline_http_request_duration_seconds_count", **route) == 5
    rejections = {
        code: delta("beeline_rejections_total", service="router", code=code) for code in ("unauthorized", "bad_json")
    }
    assert rejections == {"unauthorized": 1, "bad_json": 1}, rejections


# -- half-close ----------------------------------------------------------------------------------------


async def test_half_closed_client_gets_its_answer(cluster: Cluster, connect: Connect) -> None:
    """A client that shuts down its sending side right after a plain send still gets the front's 202,
    then the server closes the connection; the message was stored once."""
    router = cluster.router()
    connection = await connect(router)
    await connection.write(send("alice", "bye"))
    await connection.half_close()
    answer = await connection.answer()
    assert answer.fast and answer.seq() == 1, answer
    assert await connection.closed_by_server()
    assert (await (await connect(router)).exchange(send("alice"))).seq() == 2


async def test_half_close_after_pipelined_sends_answers_every_one(cluster: Cluster, connect: Connect) -> None:
    """Three plain sends written in one go, then a half-close: each is stored and answered, in order,
    before the server closes (it once stored the second without answering it). Pinned by counting
    answers until the server closes and by the seq the receiver's next message gets."""
    router = cluster.router()
    connection = await connect(router)
    await connection.write(send("alice", 1) + send("alice", 2) + send("alice", 3))
    await connection.half_close()
    answered = []
    while (answer := await connection.answer_or_close()) is not None:
        assert answer.fast, answer
        answered.append(answer.seq())
    assert answered == [1, 2, 3], answered
    next_seq = (await (await connect(router)).exchange(send("alice"))).seq()
    assert next_seq == len(answered) + 1, f"answered seqs {answered}, but the next send got seq {next_seq}"


async def test_the_front_can_be_switched_off(cluster: Cluster, connect: Connect) -> None:
    """BEELINE_HTTP_FRONT=aiohttp serves every request with aiohttp (an operator's way around the front
    without a release); a value that is neither refuses to start."""
    router = cluster.router(BEELINE_HTTP_FRONT="aiohttp")
    connection = await connect(router)
    for seq in (1, 2):
        answer = await connection.exchange(send("alice"))
        assert not answer.fast and answer.status == 202 and answer.seq() == seq, answer
    with pytest.raises(ConfigError, match="BEELINE_HTTP_FRONT"):
        load(RouterConfig, {"BEELINE_API_KEYS": API_KEY, "BEELINE_HTTP_FRONT": "fast"})


async def test_a_client_that_never_reads_is_held_to_a_bounded_buffer(cluster: Cluster) -> None:
    """A client pipelining sends without reading the answers stops being read once the front has a
    bounded backlog (it once buffered gigabytes: it resumed reading after every answer). Pinned by how
    much the client can write before its socket stays full: the front's bound plus kernel buffers."""
    router = cluster.router()
    request = send("alice", auth=None)  # no API key: each is a 401 that never reaches Redis
    chunk = request * 200
    sock = socket.create_connection(("127.0.0.1", router.port))
    sock.setblocking(False)
    written = 0
    stalled_since: float | None = None
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline and written < 256 * 1024 * 1024:
            try:
                written += sock.send(chunk)
                stalled_since = None
            except BlockingIOError:
                now = time.monotonic()
                stalled_since = stalled_since or now
                if now - stalled_since > 1.0:
                    break  # the router stopped reading
                await asyncio.sleep(0.01)
        assert stalled_since is not None, f"the router read all {written} bytes without pausing"
        assert written < 64 * 1024 * 1024, written
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("name", "head_lines", "status"),
    [
        ("more headers than the front parses", [f"X-Pad-{i}: {i}" for i in range(100)], 202),
        ("a repeated Host", ["Host: other"], 400),
        ("a Content-Length of 5,000 digits", ["Content-Length: " + "9" * 5000], 400),
    ],
)
async def test_unusual_heads_are_answered_by_aiohttp(
    name: str, head_lines: list[str], status: int, cluster: Cluster, connect: Connect
) -> None:
    """Heads the front does not parse as aiohttp would go to aiohttp, which answers them (a huge
    Content-Length once killed the connection unanswered)."""
    router = cluster.router()
    connection = await connect(router)
    length = not any(line.startswith("Content-Length") for line in head_lines)
    data = http("POST", "/v1/messages", AUTH, *head_lines, body=send_body("alice"), length=length)
    answer = await connection.exchange(data)
    assert not answer.fast and answer.status == status, (name, answer)


@pytest.mark.parametrize(
    ("head_lines", "expected"),
    [
        (["Content-Length: 5", "Authorization: Bearer k"], (5, b"Bearer k")),
        (["content-length:\t 5 \t", "AUTHORIZATION:Bearer k \t"], (5, b"Bearer k")),
        (["Content-Length: 5", "X-Tab: a\tb", "X-Empty:", "X-Colons: a:b"], (5, None)),
        (["Content-Length: 5", "X-Bad: a\x01b"], None),
        (["Content-Length: 5", "X-Bad: a\x7fb"], None),
        (["Content-Length: 5", "X-Bad : 1"], None),
        (["Content-Length: 5", ": no name"], None),
        (["Content-Length: 5", "no colon"], None),
        (["Content-Length: 5", " folded"], None),
        (["Content-Length: 5", "content-length: 5"], None),
        (["Content-Length: 05"], (5, None)),
        (["Content-Length: 12345678"], None),
        (["Content-Length: -1"], None),
        (["Content-Length: 5", "Transfer-Encoding: chunked"], None),
        (["Authorization: Bearer k"], None),
        ([], None),
    ],
)
def test_the_front_parses_a_head_like_aiohttp_or_declines(
    head_lines: list[str], expected: tuple[int, bytes | None] | None
) -> None:
    """The head parser, line by line: OWS stripped, names case-insensitive, any control character,
    whitespace before the colon, a nameless or colonless line, a repeat or a meaning-changing header
    declines (aiohttp answers those)."""
    head = "\r\n".join(["POST /v1/messages HTTP/1.1", *head_lines]).encode("latin-1")
    assert _plain_send(head) == expected


async def test_a_bare_lf_head_is_answered_at_once(cluster: Cluster, connect: Connect) -> None:
    """A head ending its lines with a bare LF goes to aiohttp, which answers 400 at once (the front
    once waited for a CRLF CRLF that never came)."""
    router = cluster.router()
    connection = await connect(router)
    body = send_body("alice")
    data = f"POST /v1/messages HTTP/1.1\nHost: x\n{AUTH}\nContent-Length: {len(body)}\n\n".encode() + body
    answer = await connection.exchange(data, timeout=5)
    assert not answer.fast and answer.status == 400, answer


@contextlib.asynccontextmanager
async def a_send_held_by_paused_redis(redis: RedisClient, connection: Connection, data: bytes) -> AsyncIterator[None]:
    """Pauses Redis's writes for 1 s (under the 2 s command timeout), writes ``data`` (a plain send
    first) and returns once that send's script sits postponed in Redis; unpauses on the way out."""
    await redis.execute_command("CLIENT", "PAUSE", "1000", "WRITE")
    try:
        await connection.write(data)

        async def postponed() -> bool:
            clients = await redis.client_list()
            return any(c.get("cmd") == "evalsha" and "b" in c.get("flags", "") for c in clients)

        await eventually(postponed, timeout=5, what="a send's script postponed by the paused Redis")
        yield
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")


async def test_shutdown_answers_every_send_it_stores(
    cluster: Cluster, connect: Connect, redis_client: RedisClient
) -> None:
    """SIGTERM while pipelined sends wait on a paused Redis: the front finishes the send in progress,
    starts no other, and every stored send was answered (it once stored the next pipelined send and
    closed the connection without its answer)."""
    router = cluster.router()
    assert router.proc is not None
    connection = await connect(router)
    await connection.exchange(send("alice"))  # seq 1, and the scripts are loaded
    answered = []
    async with a_send_held_by_paused_redis(redis_client, connection, send("alice") * 3):
        router.proc.send_signal(signal.SIGTERM)
        while (answer := await connection.answer_or_close()) is not None:
            answered.append(answer.seq())
        assert router.proc.wait(timeout=10) == 0
    meta = await redis_client.hget(Keys(cluster.prefix).user_meta("alice"), "seq")
    assert answered == [2] and int(meta or 0) == 2, (answered, meta)


async def test_a_half_close_is_passed_on_at_hand_over(
    cluster: Cluster, connect: Connect, redis_client: RedisClient
) -> None:
    """A client that half-closes while the front answers, after a request that goes to aiohttp, gets
    the front's answer and then the server closes the connection (it once stayed open in CLOSE-WAIT:
    the EOF was not passed on to aiohttp). aiohttp itself does not answer a half-closed client."""
    router = cluster.router()
    connection = await connect(router)
    await connection.exchange(send("alice"))  # the scripts are loaded
    async with a_send_held_by_paused_redis(redis_client, connection, send("alice")):
        await connection.write(HEALTHZ)
        await connection.half_close()
        answer = await connection.answer()
        assert answer.fast and answer.seq() == 2, answer
        rest = await connection.answer_or_close(timeout=5)
        assert rest is None or (not rest.fast and rest.status == 200), rest
        assert await connection.closed_by_server(timeout=5)
