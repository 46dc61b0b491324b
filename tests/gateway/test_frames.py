"""The gateway's direct frame writer encodes exactly what aiohttp's WebSocket writer would."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import WSMsgType
from aiohttp.http_websocket import WebSocketWriter

from gateway.connection import ws_frame


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
