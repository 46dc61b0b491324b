"""The client protocol: subprotocol codecs, frame validation, error codes and close codes.

Frames are objects with a ``type``. ``beeline.v1.json`` carries them as JSON text frames (the default),
``beeline.v1.msgpack`` as msgpack binary frames. Every code below is part of the public contract and is
listed in the README; never renumber one.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgpack
import orjson

from shared.envelope import Envelope, Recipient
from shared.errors import InvalidRequest

SUBPROTOCOL_JSON: Final = "beeline.v1.json"
SUBPROTOCOL_MSGPACK: Final = "beeline.v1.msgpack"
SUBPROTOCOLS: Final = (SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK)


class ErrorCode:
    """Stable ``code`` values of ``error`` frames (and of router JSON errors where they overlap)."""

    BAD_FRAME: Final = "bad_frame"  # not JSON / msgpack, or not an object
    WRONG_FRAME_KIND: Final = "wrong_frame_kind"  # binary frame on the JSON subprotocol or vice versa
    UNKNOWN_TYPE: Final = "unknown_type"  # "type" missing or not one we know
    INVALID_FIELD: Final = "invalid_field"  # a field is missing or has the wrong type / range
    PAYLOAD_TOO_LARGE: Final = "payload_too_large"  # the packed payload is over the configured limit
    TOO_MANY_RECEIVERS: Final = "too_many_receivers"  # "to" lists more users than allowed
    RATE_LIMITED: Final = "rate_limited"  # over the per-connection frame rate; the frame was dropped
    UNAVAILABLE: Final = "unavailable"  # Redis is unreachable; nothing was stored, retry later
    INTERNAL: Final = "internal"  # a bug; logged with the frame's ref


class CloseCode:
    """WebSocket close codes the gateway uses (RFC 6455 range and the 4000-4999 private range)."""

    NORMAL: Final = 1000
    PROTOCOL_ERROR: Final = 1002  # STOMP: a malformed or refused frame (after an ERROR frame)
    POLICY_VIOLATION: Final = 1008  # STOMP: no valid token at CONNECT, or over the rate limit (after ERROR)
    MESSAGE_TOO_BIG: Final = 1009  # a frame over max_frame_bytes (closed by aiohttp)
    INTERNAL_ERROR: Final = 1011
    SERVICE_RESTART: Final = 1012  # the node is draining (SIGTERM): reconnect elsewhere
    TRY_AGAIN_LATER: Final = 1013  # registration failed because Redis is unavailable
    DISCONNECTED_BY_ADMIN: Final = 4000  # DELETE /v1/users/{user}/connections
    TOKEN_EXPIRED: Final = 4001  # the token's exp passed while connected
    HEARTBEAT_MISSED: Final = 4002  # STOMP: nothing from the client within its negotiated heart-beat
    SLOW_CONSUMER: Final = 4008  # outbound buffer over its bound; missed messages wait in the mailbox


class FrameCodec(Protocol):
    """Encodes and decodes client frames for one subprotocol."""

    name: str
    binary: bool

    def encode(self, frame: dict[str, Any]) -> bytes:
        """The frame's bytes: a text frame's UTF-8 when not :attr:`binary`."""
        ...

    def decode(self, data: str | bytes) -> dict[str, Any]: ...


def _json_default(value: object) -> object:
    # msgpack clients may send binary payloads and timestamps; JSON clients see them as base64 and as
    # RFC 3339 strings.
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, msgpack.Timestamp):
        return value.to_datetime().isoformat().replace("+00:00", "Z")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps_json(value: Any) -> bytes:
    """Compact UTF-8 JSON (orjson: about 12x faster than ``json`` on a message frame, which every
    delivery encodes). Binary values, which msgpack clients may send, become base64 strings; map keys
    that are not strings (msgpack allows them) become strings, as ``json`` would make them.

    Parsing stays with Python's ``json``: orjson reads an integer beyond 64 bits as a float, which
    would change a payload silently."""
    return orjson.dumps(value, default=_json_default, option=orjson.OPT_NON_STR_KEYS)


class JsonCodec:
    """``beeline.v1.json``: UTF-8 JSON objects in text frames."""

    name = SUBPROTOCOL_JSON
    binary = False

    def encode(self, frame: dict[str, Any]) -> bytes:
        return dumps_json(frame)

    def decode(self, data: str | bytes) -> dict[str, Any]:
        if not isinstance(data, str):
            raise InvalidRequest(ErrorCode.WRONG_FRAME_KIND, "binary frame on the JSON subprotocol")
        try:
            frame = json.loads(data)
        except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python recurses
            raise InvalidRequest(ErrorCode.BAD_FRAME, "frame is not valid JSON") from e
        return _require_object(frame)


class MsgpackCodec:
    """``beeline.v1.msgpack``: msgpack maps in binary frames."""

    name = SUBPROTOCOL_MSGPACK
    binary = True

    def encode(self, frame: dict[str, Any]) -> bytes:
        packed: bytes = msgpack.packb(frame, use_bin_type=True)
        return packed

    def decode(self, data: str | bytes) -> dict[str, Any]:
        if isinstance(data, str):
            raise InvalidRequest(ErrorCode.WRONG_FRAME_KIND, "text frame on the msgpack subprotocol")
        try:
            frame = msgpack.unpackb(data, raw=False, ext_hook=_refuse_extension)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise InvalidRequest(ErrorCode.BAD_FRAME, "frame is not valid msgpack") from e
        return _require_object(frame)


def _refuse_extension(code: int, _data: bytes) -> object:
    # An application's own extension type means nothing to the other clients (a JSON receiver has no
    # form for it): refused at the door. Timestamps (type -1) are decoded by msgpack, not here.
    raise InvalidRequest(ErrorCode.INVALID_FIELD, f"msgpack extension type {code} is not supported")


def _require_object(frame: object) -> dict[str, Any]:
    if not isinstance(frame, dict):
        raise InvalidRequest(ErrorCode.BAD_FRAME, "frame must be an object")
    return frame


def codec_for(subprotocol: str | None) -> FrameCodec:
    """The codec for a negotiated subprotocol; JSON when the client asked for none."""
    if subprotocol == SUBPROTOCOL_MSGPACK:
        return MsgpackCodec()
    return JsonCodec()


def message_frame(envelope: Envelope, recipient: Recipient) -> dict[str, Any]:
    """The ``message`` frame a client receives (``ts`` is the router accept time in unix ms)."""
    return {
        "type": "message",
        "seq": recipient.seq,
        "epoch": recipient.epoch,
        "id": envelope.msg_id,
        "from": envelope.sender,
        "channel": envelope.channel,
        "payload": envelope.payload,
        "ts": int(envelope.ts * 1000),
    }


def error_frame(code: str, message: str, ref: object = None) -> dict[str, Any]:
    return {"type": "error", "ref": ref, "code": code, "message": message}


# -- validation shared by the gateway's `send` frame and the router's JSON bodies ---------------------

MAX_ID_LEN: Final = 256
MAX_CHANNEL_LEN: Final = 128


@dataclass(frozen=True, slots=True)
class SendRequest:
    """A validated send: receivers (deduplicated, order kept), channel and payload."""

    to: tuple[str, ...]
    channel: str
    payload: Any


def valid_user_id(value: object, field: str = "to") -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LEN:
        raise InvalidRequest(ErrorCode.INVALID_FIELD, f"{field} must be a non-empty string of at most {MAX_ID_LEN}")
    return value


def parse_send(body: dict[str, Any], *, max_receivers: int) -> SendRequest:
    """Validates ``{to, channel, payload}``; ``to`` is a user id or a non-empty list of them."""
    to = body.get("to")
    receivers: list[str]
    if isinstance(to, list):
        if not to:
            raise InvalidRequest(ErrorCode.INVALID_FIELD, "to must not be empty")
        receivers = [valid_user_id(u) for u in to]
    else:
        receivers = [valid_user_id(to)]
    unique = tuple(dict.fromkeys(receivers))
    if len(unique) > max_receivers:
        raise InvalidRequest(ErrorCode.TOO_MANY_RECEIVERS, f"at most {max_receivers} receivers per send")
    channel = body.get("channel")
    if not isinstance(channel, str) or not channel or len(channel) > MAX_CHANNEL_LEN:
        raise InvalidRequest(
            ErrorCode.INVALID_FIELD, f"channel must be a non-empty string of at most {MAX_CHANNEL_LEN}"
        )
    if "payload" not in body:
        raise InvalidRequest(ErrorCode.INVALID_FIELD, "payload is required")
    return SendRequest(to=unique, channel=channel, payload=body["payload"])
