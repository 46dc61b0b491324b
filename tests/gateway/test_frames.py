"""The gateway's direct frame writer encodes exactly what aiohttp's WebSocket writer would, and a frame
that cannot be encoded is skipped without harm."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import WSMsgType
from aiohttp.http_websocket import WebSocketWriter
from prometheus_client import CollectorRegistry

from gateway.connection import Connection, WebSocketOutlet, ws_frame
from shared.envelope import Envelope, Recipient
from shared.mailbox import SequenceState
from shared.metrics import Metrics
from shared.protocol import JsonCodec
from tests.support import eventually


class RecordingTransport:
    """Keeps what aiohttp's writer wrote: the reference encoding, no socket involved."""

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 70_000])
@pytest.mark.parametrize("opcode", [WSMsgType.TEXT, WSMsgType.BINARY])
async def test_direct_frames_equal_aiohttps(length: int, opcode: WSMsgType) -> None:
    """Every length class of RFC 6455 (7-bit, 16-bit, 64-bit), text and binary, unmasked."""
    transport: Any = RecordingTransport()
    # The protocol is only used to wait for a drain, which a limit this high never needs.
    writer = WebSocketWriter(protocol=None, transport=transport, limit=1 << 30)  # type: ignore[arg-type]
    data = bytes(i % 251 for i in range(length))
    await writer.send_frame(data, opcode)
    assert ws_frame(data, int(opcode)) == bytes(transport.written)


class OpenWebSocket:
    closed = False

    async def close(self, *, code: int, message: bytes) -> None:
        self.closed = True


class WritableTransport(RecordingTransport):
    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        pass


async def no_mailbox(_user_id: str, _after_seq: int, _count: int) -> list[Any]:
    raise AssertionError("this test never reads the mailbox")


@pytest.mark.parametrize("catching_up", [False, True])
async def test_a_message_the_subprotocol_cannot_carry_is_skipped_and_the_next_is_written(catching_up: bool) -> None:
    """Defence in depth behind input validation: a payload with no form in this connection's
    subprotocol is logged and skipped, live or while catching up; the connection stays open and the
    next message is written (it used to raise out of the node's stream read, stopping delivery for
    everyone on the node, or close the connection at every catch-up)."""
    transport = WritableTransport()
    conn = Connection(
        conn_id="c1",
        user_id="alice",
        outlet=WebSocketOutlet(OpenWebSocket(), transport, binary=False),  # type: ignore[arg-type]
        codec=JsonCodec(),
        metrics=Metrics(CollectorRegistry(), service="gateway", node="g1"),
        read_mailbox=no_mailbox,
        max_frames=16,
        max_bytes=1 << 20,
    )
    try:
        if not catching_up:  # else both items are parked until begin() has caught up, then emitted
            conn.begin(SequenceState(epoch="e1", last_seq=0, acked=0), 0)
            [sync] = [t for t in asyncio.all_tasks() if t.get_name() == "ws-sync-c1"]
            await asyncio.wait_for(sync, timeout=5)  # caught up (nothing to read): items now go out live
        unencodable = Envelope.create(sender="bob", channel="c", payload={"x": object()})
        conn.offer(unencodable, Recipient("alice", 1, "e1"), "routed")
        conn.offer(Envelope.create(sender="bob", channel="c", payload={"n": 2}), Recipient("alice", 2, "e1"), "routed")
        if catching_up:
            conn.begin(SequenceState(epoch="e1", last_seq=0, acked=0), 0)
        await eventually(lambda: bool(transport.written), timeout=5, what="the second message written")
        assert conn.close_code is None and conn.last_seq == 2
        written = bytes(transport.written)
        header = 2 if written[1] < 126 else 4  # one unmasked text frame: a 7- or 16-bit length
        frame = json.loads(written[header:])
        assert frame["seq"] == 2 and frame["payload"] == {"n": 2}
    finally:
        conn.close(1000)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.wait(tasks, timeout=5)
