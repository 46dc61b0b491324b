"""The message envelope and the node-stream entry, with their msgpack codecs.

An :class:`Envelope` is what a sender said; it is immutable and packed once at accept time. The same
bytes are stored in the user's mailbox and carried on node streams, so delivery never re-encodes.
Per-receiver facts (``seq``, ``epoch``) are not in the envelope: they are assigned by Redis per user
and travel next to it as :class:`Recipient` items.

Short msgpack keys keep Redis traffic small: ``v`` version, ``i`` msg id, ``f`` from, ``c`` channel,
``p`` payload, ``t`` accept time (unix seconds, float).

These records, like the other small ones on the send and delivery paths, are NamedTuples: as immutable
as a frozen dataclass at half its construction cost (a frozen dataclass sets each field through
``object.__setattr__``), and each service builds several per message.
"""

from __future__ import annotations

import random
import time
from typing import Any, Final, NamedTuple

import msgpack

from shared.errors import EnvelopeDecodeError

ENVELOPE_VERSION: Final = 1


def new_msg_id() -> str:
    """A 128-bit random id in hex; unique enough to be an idempotency token end to end.

    From the process's Mersenne Twister (seeded from the OS, and reseeded in a forked child), not
    ``os.urandom``: a syscall per message showed in the send path's profile. An id names a message;
    it grants nothing, so it needs to be unique, not unguessable (a keyed send derives its id from
    the Idempotency-Key instead)."""
    return f"{random.getrandbits(128):032x}"


class Envelope(NamedTuple):
    """What was sent: stamped sender, channel, JSON-compatible payload and the accept timestamp."""

    msg_id: str
    sender: str
    channel: str
    payload: Any
    ts: float
    v: int = ENVELOPE_VERSION

    @classmethod
    def create(cls, *, sender: str, channel: str, payload: Any, msg_id: str | None = None) -> Envelope:
        """A new envelope stamped now; ``msg_id`` is given only when it must be reproducible (retries)."""
        return cls(msg_id=msg_id or new_msg_id(), sender=sender, channel=channel, payload=payload, ts=time.time())

    def pack(self) -> bytes:
        packed: bytes = msgpack.packb(
            {"v": self.v, "i": self.msg_id, "f": self.sender, "c": self.channel, "p": self.payload, "t": self.ts},
            use_bin_type=True,
        )
        return packed

    @classmethod
    def unpack(cls, data: bytes) -> Envelope:
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
            return cls(msg_id=raw["i"], sender=raw["f"], channel=raw["c"], payload=raw["p"], ts=raw["t"], v=raw["v"])
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
            raise EnvelopeDecodeError(f"bad envelope: {e}") from e


class Recipient(NamedTuple):
    """One receiver of an envelope: the user and the ``seq`` Redis assigned in that user's ``epoch``."""

    user_id: str
    seq: int
    epoch: str


class StreamEntry(NamedTuple):
    """One node-stream entry: an envelope for one or more receivers on that node, or a control command.

    A send to many receivers held by the same node is a single entry (one XADD per node, not per user).
    """

    envelope: bytes | None
    recipients: tuple[Recipient, ...] = ()
    disconnect_user: str | None = None

    def pack(self) -> bytes:
        body: dict[str, Any] = {"v": ENVELOPE_VERSION}
        if self.envelope is not None:
            body["e"] = self.envelope
            body["r"] = [[d.user_id, d.seq, d.epoch] for d in self.recipients]
        if self.disconnect_user is not None:
            body["k"] = self.disconnect_user
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        return packed

    @classmethod
    def unpack(cls, data: bytes) -> StreamEntry:
        try:
            raw = msgpack.unpackb(data, raw=False)
            recipients = tuple(Recipient(str(u), int(s), str(e)) for u, s, e in raw.get("r", ()))
            return cls(envelope=raw.get("e"), recipients=recipients, disconnect_user=raw.get("k"))
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
            raise EnvelopeDecodeError(f"bad stream entry: {e}") from e


STREAM_FIELD: Final = b"d"
"""The single field of node-stream and mailbox entries holding packed bytes."""
