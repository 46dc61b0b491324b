"""``beeline bench`` as a user runs it, at smoke size: every message delivered exactly once in both routing
modes, a JSON report with every field, and no process left behind. Never a timed assertion: the
benchmark's numbers belong in docs/benchmarks.md, not in the suite. The accounting helpers it relies on
are checked on made-up data first."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from beeline.bench import IDLE_FIELDS, PEER_DIR, RUN_FIELDS, format_table, parse_args, plan_requests
from beeline.bench_client import (
    WS_GUID,
    HttpConnection,
    Receivers,
    WsConnection,
    WsError,
    message_json,
    request_body,
    stomp_message,
)
from beeline.bench_stats import (
    INFO_COMMAND,
    Receipt,
    RedisSnapshot,
    count_deliveries,
    git_commit,
    latency_summary,
    percentile,
    resp_bulk_bytes,
    resp_command_bytes,
)
from tests.support import alive, eventually

BENCH_TIMEOUT_S = 120
LATENCY_KEYS = {"p50", "p90", "p99", "max", "mean"}
REDIS_KEYS = {
    "bytes_in_per_msg",
    "bytes_out_per_msg",
    "commands_per_msg",
    "bytes_in",
    "bytes_out",
    "commands",
    "calls_per_msg",
    "cpu_s",
    "cpu_s_per_1k",
}
CPU_KEYS = {
    "router_s",
    "gateways_s",
    "router_s_per_1k",
    "gateways_s_per_1k",
    "server_ms_per_msg",
    "clients_s",
    "clients_s_per_1k",
    "per_process_s",
}
RSS_KEYS = {"router", "gateways", "gateway_max", "redis", "clients"}


def bench_command() -> list[str]:
    script = Path(sys.executable).with_name("beeline")
    return [str(script)] if script.exists() else [sys.executable, "-m", "beeline.cli"]


def run_bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    report_path = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEELINE_")}
    proc = subprocess.run(
        [*bench_command(), "bench", *args, "--quiet", "--json", str(report_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"beeline bench exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(report_path.read_text())


@pytest.mark.redis
def test_smoke_run_delivers_every_message_once_in_both_modes(tmp_path: Path) -> None:
    messages = 300
    proc, report = run_bench(
        tmp_path, "--nodes", "2", "--users", "40", "--messages", str(messages), "--mode", "both", "--warmup", "20"
    )
    runs = report["runs"]
    assert [r["mode"] for r in runs] == ["routed", "broadcast"]
    for run in runs:
        assert set(RUN_FIELDS) <= set(run), f"missing {set(RUN_FIELDS) - set(run)}"
        assert run["sent"] == messages
        assert run["delivered"] == run["sent"], run
        assert run["lost"] == 0
        assert run["duplicated"] == 0
        assert run["misrouted"] == 0
        assert run["send_errors"] == {}
        assert run["ok"] is True
        assert run["nodes"] == 2
        assert set(run["latency_ms"]) == LATENCY_KEYS
        assert all(isinstance(run["latency_ms"][k], float) for k in LATENCY_KEYS)
        assert set(run["redis"]) == REDIS_KEYS
        assert run["redis"]["bytes_out_per_msg"] > 0
        assert run["redis"]["commands_per_msg"] > 0
        assert set(run["cpu"]) == CPU_KEYS
        assert {"router", "gw1", "gw2"} <= set(run["cpu"]["per_process_s"])
        assert set(run["peak_rss_mb"]) == RSS_KEYS
        assert set(run["peak_rss_mb"]["gateways"]) == {"gw1", "gw2"}
        assert run["peak_rss_mb"]["router"] > 0
        assert run["achieved_rate"] > 0
        assert run["servers_exited"] == []
        # Every server stopped on SIGTERM by itself, with status 0 (none killed, none cut off).
        assert run["servers_killed"] == []
        assert set(run["stop_exit_codes"]) == {"router", "gw1", "gw2", "redis"}
        assert set(run["stop_exit_codes"].values()) == {0}, run["stop_exit_codes"]
        # Every process it started is gone once it has exited.
        left = {name: pid for name, pid in run["pids"].items() if alive(pid)}
        assert left == {}, f"still running after beeline bench exited: {left}"
    # Routed sends one XADD per message; broadcast one PUBLISH instead.
    assert runs[0]["redis"]["calls_per_msg"].get("publish", 0) == 0
    assert runs[1]["redis"]["calls_per_msg"].get("publish", 0) == pytest.approx(1.0)
    for key in ("machine", "runs", "argv", "started"):
        assert key in report
    assert report["machine"]["redis"]
    assert "p99" in proc.stdout  # the table
    assert "routed" in proc.stdout
    assert "broadcast" in proc.stdout


@pytest.mark.redis
@pytest.mark.parametrize("protocol", ["stomp", "sockjs-xhr-streaming"])
def test_smoke_run_with_stomp_receivers_delivers_every_message_once(tmp_path: Path, protocol: str) -> None:
    """The same run with receivers speaking STOMP 1.2, on the gateways' /ws or inside SockJS sessions
    over xhr-streaming: every message once."""
    messages = 200
    proc, report = run_bench(
        tmp_path, "--nodes", "2", "--users", "20", "--messages", str(messages), "--protocol", protocol, "--warmup", "10"
    )
    [run] = report["runs"]
    assert set(RUN_FIELDS) <= set(run), f"missing {set(RUN_FIELDS) - set(run)}"
    assert run["protocol"] == protocol
    assert run["sent"] == messages
    assert run["delivered"] == messages, run
    assert (run["lost"], run["duplicated"], run["misrouted"]) == (0, 0, 0)
    assert run["receivers_closed"] == 0
    assert run["ok"] is True
    left = {name: pid for name, pid in run["pids"].items() if alive(pid)}
    assert left == {}, f"still running after beeline bench exited: {left}"
    assert protocol in proc.stdout


def test_stomp_message_frames_read_like_beeline_message_frames() -> None:
    body = b'{"i":3,"t":1.5,"p":"x"}'
    frame = b"MESSAGE\ndestination:/user/topic/bench\nsubscription:s0\nbeeline-seq:7\nbeeline-seq:8\n\n" + body
    assert stomp_message(frame) == {"type": "message", "seq": b"7", "payload": {"i": 3, "t": 1.5, "p": "x"}}
    assert stomp_message(frame.replace(b"\n", b"\r\n")) == stomp_message(frame)
    assert stomp_message(b"RECEIPT\nreceipt-id:s0\n\n") is None
    assert stomp_message(b"MESSAGE\nsubscription:s0\n\n" + body) is None


@pytest.mark.redis
def test_batch_and_multi_forms_deliver_every_message(tmp_path: Path) -> None:
    for form in ("batch", "multi"):
        _proc, report = run_bench(
            tmp_path,
            *("--nodes", "2", "--users", "30", "--messages", "200", "--form", form, "--batch", "10"),
            *("--rate", "2000", "--warmup", "20"),
        )
        [run] = report["runs"]
        assert run["form"] == form
        assert run["sent"] == 200
        assert run["delivered"] == 200, run
        assert run["lost"] == 0
        assert run["duplicated"] == 0


@pytest.mark.redis
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_router_own_cpu_placement_keeps_everything_else_off_the_routers_cpu(tmp_path: Path) -> None:
    _proc, report = run_bench(
        tmp_path,
        *("--nodes", "2", "--users", "20", "--messages", "100", "--warmup", "10"),
        *("--placement", "router-own-cpu,shared"),
    )
    own, shared = report["runs"]
    mine = sorted(os.sched_getaffinity(0))
    placement = own["placement"]
    assert own["label"].endswith("router-own-cpu")
    assert placement["router_cpu"] == mine[-1]
    assert placement["other_cpus"] == mine[:-1]
    # As the kernel reported while the run was live: the router alone on its CPU, every other process
    # the bench started (Redis, both gateways, the client workers) on the rest.
    allowed = placement["allowed_cpus"]
    assert {"router", "redis", "gw1", "gw2", "receivers-1", "sender-1"} <= set(allowed)
    assert allowed["router"] == [mine[-1]]
    assert all(cpus == mine[:-1] for name, cpus in allowed.items() if name != "router"), allowed
    # The bench took its own CPUs back after that run: the next one's processes may run anywhere.
    assert shared["placement"]["placement"] == "shared"
    assert shared["placement"]["allowed_cpus"]
    assert all(cpus == mine for cpus in shared["placement"]["allowed_cpus"].values()), shared["placement"]
    for run in (own, shared):
        assert run["delivered"] == run["sent"] == 100, run
        assert run["duplicated"] == 0
        assert {name: pid for name, pid in run["pids"].items() if alive(pid)} == {}


@pytest.mark.redis
@pytest.mark.skipif(
    shutil.which("node") is None or not (PEER_DIR / "node_modules").is_dir(),
    reason="the Socket.IO peer needs Node.js and `npm ci` in bench/peers/socketio (scripts/setup.sh does it)",
)
def test_socketio_peer_runs_the_same_workload_and_is_measured_the_same_way(tmp_path: Path) -> None:
    """The peer of the reference table, on the same box: Node socket.io gateways with the Redis adapter
    and a Node sender entry point, driven by the same receivers and senders as a Beeline run."""
    _proc, report = run_bench(
        tmp_path,
        *("--nodes", "2", "--users", "40", "--messages", "300", "--rate", "1000", "--warmup", "20"),
        *("--mode", "routed,socketio"),
    )
    routed, peer = report["runs"]
    assert (routed["mode"], peer["mode"]) == ("routed", "socketio")
    assert set(RUN_FIELDS) <= set(peer)
    assert peer["delivered"] == peer["sent"] == 300, peer
    assert peer["duplicated"] == 0
    assert peer["misrouted"] == 0
    assert {"router", "gw1", "gw2"} <= set(peer["cpu"]["per_process_s"])
    assert peer["cpu"]["gateways_s"] > 0
    # The adapter publishes each message once, and Redis sends it to both gateways; Beeline appends it
    # to the one node stream its receiver is on.
    assert peer["redis"]["calls_per_msg"].get("publish", 0) == pytest.approx(1.0)
    assert peer["redis"]["bytes_out_per_msg"] > routed["redis"]["bytes_out_per_msg"]
    assert set(peer["stop_exit_codes"].values()) == {0}, peer["stop_exit_codes"]
    assert {name: pid for name, pid in peer["pids"].items() if alive(pid)} == {}


def test_mode_lists_expand_both_and_refuse_what_the_peer_cannot_run() -> None:
    opts = parse_args(["--mode", "both,socketio"])
    assert [s.mode for s in opts.specs] == ["routed", "broadcast", "socketio"]
    for extra in (["--form", "batch"], ["--subprotocol", "msgpack"], ["--ack-every", "5"], ["--redis-url", "x"]):
        with pytest.raises(SystemExit):
            parse_args(["--mode", "socketio", *extra])
    with pytest.raises(SystemExit):
        parse_args(["--mode", "pubsub"])


@pytest.mark.redis
def test_idle_connections_report(tmp_path: Path) -> None:
    proc, report = run_bench(tmp_path, "--idle-connections", "200")
    idle = report["idle"]
    assert set(IDLE_FIELDS) <= set(idle), f"missing {set(IDLE_FIELDS) - set(idle)}"
    assert idle["connected"] == 200
    assert idle["failed"] == 0
    assert idle["presence_online"] == 200
    assert idle["all_registered_s"] is not None
    assert idle["rss_per_connection_kb"] is not None
    assert "KB per connection" in proc.stdout
    assert {name: pid for name, pid in idle["pids"].items() if alive(pid)} == {}


# -- the accounting, on made-up data -------------------------------------------------------------------


def test_count_deliveries_finds_lost_duplicated_and_misrouted() -> None:
    expected = {0: [1], 1: [2], 2: [3], 3: [1, 2]}
    receipts = [
        Receipt(0, 1, 1, 5.0),
        Receipt(0, 1, 1, 6.0),  # the same message again: duplicate
        Receipt(1, 2, 1, 7.0),
        Receipt(3, 1, 1, 9.0),  # a second message with a seq user 1 already had: duplicate
        Receipt(3, 2, 2, 8.0),
        Receipt(2, 4, 1, 1.0),  # not sent to user 4
    ]
    counts = count_deliveries(expected, receipts)
    assert counts.expected == 5
    assert counts.delivered == 3  # (0,1), (1,2), (3,2)
    assert counts.lost == 2  # (2,3) never arrived; (3,1) only as a duplicate seq
    assert counts.duplicated == 2
    assert counts.misrouted == 1
    assert sorted(counts.latencies_ms) == [5.0, 7.0, 8.0]


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([], 50) is None
    summary = latency_summary([3.0, 1.0, 2.0])
    assert summary == {"p50": 2.0, "p90": 3.0, "p99": 3.0, "max": 3.0, "mean": 2.0}


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_commit_is_dirty_for_code_changes_but_not_for_the_benchmarks_own_outputs(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    for name in ("router.py", "bench/results/matrix.json", "docs/bench_cpu.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("before\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = git_commit(tmp_path)
    assert clean and not clean.endswith("+dirty")
    (tmp_path / "bench/results/matrix.json").write_text("after\n")
    (tmp_path / "docs/bench_cpu.png").write_text("after\n")
    assert git_commit(tmp_path) == clean
    (tmp_path / "router.py").write_text("after\n")
    assert git_commit(tmp_path) == f"{clean}+dirty"


def test_redis_delta_leaves_out_the_bench_own_info_calls() -> None:
    def info(net_in: int, net_out: int, commands: int, info_calls: int, xadd: int) -> bytes:
        return (
            f"# Stats\r\ntotal_net_input_bytes:{net_in}\r\ntotal_net_output_bytes:{net_out}\r\n"
            f"total_commands_processed:{commands}\r\n# CPU\r\nused_cpu_sys:1.5\r\nused_cpu_user:2.0\r\n"
            f"# Commandstats\r\ncmdstat_info:calls={info_calls},usec=1\r\ncmdstat_xadd:calls={xadd},usec=9\r\n"
        ).encode()

    first = info(1000, 5000, 10, 1, 0)
    before = RedisSnapshot.from_reply(first)
    # Between the two: the first INFO's reply went out, 100 messages' traffic, then the second INFO came in.
    request = resp_command_bytes(INFO_COMMAND)
    after = RedisSnapshot.from_reply(
        info(1000 + 700 + request, 5000 + resp_bulk_bytes(first) + 300, 10 + 1 + 50, 2, 20)
    )
    delta = before.delta(after)
    assert delta.bytes_in == 700
    assert delta.bytes_out == 300
    assert delta.commands == 50
    assert delta.calls == {"xadd": 20}
    assert resp_command_bytes(["INFO", "stats"]) == len(b"*2\r\n$4\r\nINFO\r\n$5\r\nstats\r\n")


def test_plans_cover_every_message_in_each_form() -> None:
    base = parse_args(["--users", "10", "--messages", "25", "--batch", "4"]).specs[0]
    for form, requests_expected in (("single", 25), ("batch", 7), ("multi", 7)):
        spec = dataclasses.replace(base, form=form, batch=1 if form == "single" else 4)
        plan = plan_requests(spec, random.Random(1), 25, 0, 1)
        assert len(plan) == requests_expected
        deliveries = sum(len(users) for request in plan for _id, users in request)
        assert deliveries == 25
    table = format_table([])
    assert "p99" in table


@pytest.mark.parametrize("size", [20, 95, 300])
@pytest.mark.parametrize("to", ["user-7", ["u1", 'u"2']])
def test_message_json_is_compact_json_of_the_asked_size(to: str | list[str], size: int) -> None:
    text = message_json(to, 42, 1764201234.123456, size)
    body = json.loads(text)
    assert body["to"] == to and body["channel"] == "bench"
    assert (body["payload"]["i"], body["payload"]["t"]) == (42, 1764201234.123456)
    assert text == json.dumps(body, separators=(",", ":"))
    reachable = len(message_json(to, 42, 1764201234.123456, 0))
    assert len(text) == max(size, reachable)
    path, batch = request_body("batch", [[1, ["a"]], [2, ["b"]]], 1.5, size)
    assert path == b"/v1/messages/batch" and [m["to"] for m in json.loads(batch)["messages"]] == ["a", "b"]


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close


ANSWERS = [
    (b"HTTP/1.1 202 Accepted\r\nContent-Length: 5\r\n\r\nhello", 202, False),
    (b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n", 400, False),
    (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", 503, True),
]


@pytest.fixture
def idle_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop that never runs: the sender's HTTP client only reads its clock."""
    with contextlib.closing(asyncio.new_event_loop()) as loop:
        yield loop


@pytest.mark.parametrize(("answer", "status", "closes"), ANSWERS)
def test_the_sender_reads_an_answer_split_anywhere(
    answer: bytes, status: int, closes: bool, idle_loop: asyncio.AbstractEventLoop
) -> None:
    """The load generator's HTTP client reports each answer once, however the bytes arrive, and keeps
    reading the next answer on the same connection (or drops it on ``Connection: close``)."""
    loop = idle_loop
    for split in range(1, len(answer)):
        connection = HttpConnection(loop, "127.0.0.1", 1, "Bearer k")
        transport = _Transport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        seen: list[tuple[int | None, str | None]] = []
        connection.post(b"/v1/messages", b"{}", lambda s, e, seen=seen: seen.append((s, e)))
        assert transport.written[0].startswith(b"POST /v1/messages HTTP/1.1\r\n")
        connection.data_received(answer[:split])
        assert seen == []
        connection.data_received(answer[split:])
        assert seen == [(status, None)] and transport.closed == closes and not connection.busy
        if not closes:
            connection.post(b"/v1/messages", b"{}", lambda s, e, seen=seen: seen.append((s, e)))
            connection.data_received(ANSWERS[0][0])
            assert seen[-1] == (202, None)


def test_the_sender_reports_a_lost_or_garbled_answer_as_an_error(idle_loop: asyncio.AbstractEventLoop) -> None:
    connection = HttpConnection(idle_loop, "127.0.0.1", 1, "Bearer k")
    seen: list[tuple[int | None, str | None]] = []
    connection.connection_made(_Transport())  # type: ignore[arg-type]
    connection.post(b"/v1/messages", b"{}", lambda s, e: seen.append((s, e)))
    connection.data_received(b"garbage\r\n\r\n")
    connection.connection_made(_Transport())  # type: ignore[arg-type]
    connection.post(b"/v1/messages", b"{}", lambda s, e: seen.append((s, e)))
    connection.connection_lost(None)
    assert seen == [(None, "HttpError"), (None, "ConnectionResetError")]


def _server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    length = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if length < 126:
        return head + bytes([length]) + payload
    return head + bytes([126]) + length.to_bytes(2, "big") + payload


def _unmask(frame: bytes) -> tuple[int, bytes]:
    """(opcode, payload) of one masked client frame."""
    assert frame[1] & 0x80, "a client frame must be masked"
    length, start = frame[1] & 0x7F, 2
    mask = frame[start : start + 4]
    return frame[0] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(frame[start + 4 : start + 4 + length]))


def test_the_receivers_websocket_client_reads_frames_split_anywhere() -> None:
    """The load generator's WebSocket client checks the upgrade's accept key, reads the welcome and
    then every message (text, continued, 16-bit length) however the bytes arrive, answers a ping with
    a masked pong and a close with a close."""

    async def scenario() -> None:
        for split in (1, 2, 3, 7, 50, 10_000):
            got: list[bytes] = []
            ws = WsConnection(lambda _ws, data, got=got: got.append(data))
            transport = _Transport()
            ws.connection_made(transport)  # type: ignore[arg-type]
            ws.handshake("127.0.0.1", 1, "/ws", "beeline.v1.json", "token")
            key = transport.written[0].split(b"Sec-WebSocket-Key: ")[1].split(b"\r\n")[0]
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID.encode()).digest())
            big = b'{"type":"message","p":"' + b"x" * 300 + b'"}'
            stream = (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                + b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                + _server_frame(0x1, b'{"type":"welcome"}')
                + _server_frame(0x1, b'{"a":', fin=False) + _server_frame(0x0, b"1}")
                + _server_frame(0x9, b"hi")
                + _server_frame(0x1, big)
                + _server_frame(0x8, (1000).to_bytes(2, "big"))
            )  # fmt: skip
            for i in range(0, len(stream), split):
                ws.data_received(stream[i : i + split])
            assert ws.welcome.result() == b'{"type":"welcome"}'
            assert got == [b'{"a":1}', big]
            frames = [_unmask(frame) for frame in transport.written[1:]]
            assert frames == [(0xA, b"hi"), (0x8, (1000).to_bytes(2, "big"))] and transport.closed

        ws = WsConnection(lambda _ws, data: None)
        ws.connection_made(_Transport())  # type: ignore[arg-type]
        ws.handshake("127.0.0.1", 1, "/ws", "beeline.v1.json", "token")
        ws.data_received(b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: wrong\r\n\r\n")
        with pytest.raises(WsError, match="Sec-WebSocket-Accept"):
            ws.welcome.result()

    asyncio.run(scenario())


def test_the_receivers_speak_socketio_to_the_peer() -> None:
    """In the peer's dialect a receiver connects without subprotocol or token, joins the main namespace
    after Engine.IO's open packet, answers pings, and records ``message`` events like Beeline frames."""
    client_frames: list[bytes] = []
    request: list[bytes] = []

    async def read_client_frame(reader: asyncio.StreamReader) -> bytes:
        head = await reader.readexactly(2)
        mask = await reader.readexactly(4)
        payload = await reader.readexactly(head[1] & 0x7F)
        return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        finally:
            writer.close()
            await writer.wait_closed()
            peer_done.set()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request.append(head)
        key = head.split(b"Sec-WebSocket-Key: ")[1].split(b"\r\n")[0]
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID.encode()).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        writer.write(_server_frame(0x1, b'0{"sid":"e","pingInterval":25000,"pingTimeout":20000}'))
        client_frames.append(await read_client_frame(reader))  # the namespace CONNECT
        writer.write(_server_frame(0x1, b'40{"sid":"s"}') + _server_frame(0x1, b"2"))
        client_frames.append(await read_client_frame(reader))  # the pong
        event = [
            "message",
            {"type": "message", "seq": 5, "channel": "bench", "payload": {"i": 9, "t": time.time(), "p": "x"}},
        ]
        writer.write(_server_frame(0x1, b"42" + json.dumps(event).encode()) + _server_frame(0x1, b'42["other"]'))
        await writer.drain()
        await reader.read()  # until the client closes

    peer_done = asyncio.Event()

    async def scenario() -> dict[str, Any]:
        server = await asyncio.start_server(peer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        receivers = Receivers({"users": [], "dialect": "socketio"})
        try:
            url = f"http://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket&user=u7"
            ws = await asyncio.wait_for(receivers._connect(7, url, ""), timeout=10)
            assert ws is not None
            # The second event arrives after the first.
            await eventually(lambda: receivers.state.unexpected >= 1, timeout=10, what="the events")
            ws.close()
            await asyncio.wait_for(peer_done.wait(), timeout=10)
        finally:
            server.close()
            await server.wait_closed()
        return {"receipts": receivers.state.receipts, "unexpected": receivers.state.unexpected}

    state = asyncio.run(scenario())
    [head] = request
    assert head.startswith(b"GET /socket.io/?EIO=4&transport=websocket&user=u7 HTTP/1.1\r\n")
    assert b"Sec-WebSocket-Protocol" not in head and b"Authorization" not in head
    assert client_frames == [b"40", b"3"]
    [(msg_id, user, seq, latency_ms)] = state["receipts"]
    assert (msg_id, user, seq) == (9, 7, 5) and latency_ms >= 0
    assert state["unexpected"] == 1  # an event that is not a message is counted, not recorded
