"""The per-user mailbox: the source of truth for delivery.

Each user has a sequence (meta hash ``{seq, epoch, acked}``) and a capped stream whose entry ids are
``<seq>-0``. Appending assigns the next ``seq`` and stores the envelope in one Lua call on the user's
slot, which also returns the user's presence, so a send costs one round trip before its pushes.

Invariants:

* ``seq`` is 1, 2, 3, ... without gaps within an ``epoch``; the epoch changes only when the counter
  was lost (then the old mailbox is dropped with it).
* ``acked`` only moves forward and never past ``seq``; "unread" means ``seq > acked``.
* The stream keeps the last ``mailbox_max`` entries and expires ``mailbox_ttl_s`` after the last append.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from shared.autopipeline import AutoPipeline
from shared.durability import DurableWriter
from shared.envelope import STREAM_FIELD
from shared.keys import Keys
from shared.redis import OpGuard, RedisClient, is_cluster, lua_source, untimed

MailboxObserver = Callable[[int, int, int], None]
"""Called with ``(length, trimmed, cap)`` after each append (metrics: fill ratio and trims)."""


@dataclass(frozen=True, slots=True)
class Append:
    """One message for one user. With a ``dedup_id`` (idempotent sends), appending it again within the
    dedup window returns the first seq instead of a second copy."""

    envelope: bytes
    user_id: str
    dedup_id: str | None = None


@dataclass(frozen=True, slots=True)
class Appended:
    """Result of one append: the assigned seq and epoch, node_id -> connections of the receiver, and
    the mailbox's length after it with how many old entries the cap trimmed."""

    user_id: str
    seq: int
    epoch: str
    presence: dict[str, int]
    length: int = 0
    trimmed: int = 0


@dataclass(frozen=True, slots=True)
class SequenceState:
    """Where a user's sequence stands: its epoch, the last seq assigned and the read cursor."""

    epoch: str
    last_seq: int
    acked: int


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    envelope: bytes


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pairs_to_counts(flat: Sequence[Any]) -> dict[str, int]:
    return {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


def _stored(entry_id: Any, fields: Any) -> StoredMessage:
    return StoredMessage(seq=int(_text(entry_id).split("-", 1)[0]), envelope=bytes(fields[STREAM_FIELD]))


class Mailbox:
    """Redis-backed per-user sequences and mailboxes (see module docstring for the invariants)."""

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        *,
        max_len: int,
        ttl_s: int,
        guard: OpGuard = untimed,
        observe: MailboxObserver | None = None,
        durable: DurableWriter | None = None,
        dedup_ttl_s: int = 0,
        fast: AutoPipeline | None = None,
    ) -> None:
        self._redis = redis
        self._fast = fast
        self._dedup_ttl_s = dedup_ttl_s
        self._durable = durable
        self._observe = observe
        self._guard = guard
        self._keys = keys
        self._max_len = max_len
        self._ttl_s = ttl_s
        self._append = redis.register_script(lua_source("mailbox_append"))
        self._open = redis.register_script(lua_source("mailbox_open"))
        self._ack = redis.register_script(lua_source("mailbox_ack"))

    async def append(self, envelope: bytes, user_ids: Sequence[str]) -> list[Appended]:
        """Appends one envelope to each user's mailbox in one pipelined round trip."""
        return await self.append_each([Append(envelope, u) for u in user_ids])

    async def append_each(self, items: Sequence[Append]) -> list[Appended]:
        """Appends many messages (each to one user) in one pipelined round trip.

        Redis Cluster clients cannot pipeline scripts (redis-py refuses EVALSHA in a cluster pipeline),
        so there the appends run concurrently instead: still one round trip of latency per slot owner.
        """
        k = self._keys

        def keys_args(item: Append) -> tuple[list[str], list[bytes | int]]:
            user_id = item.user_id
            dedup_key = k.user_dedup(user_id, item.dedup_id or "-")
            return (
                [k.user_meta(user_id), k.mailbox(user_id), k.user_presence(user_id), dedup_key],
                [item.envelope, self._max_len, self._ttl_s, self._dedup_ttl_s if item.dedup_id else 0],
            )

        def call(item: Append, client: Any = None) -> Awaitable[Any]:
            keys, args = keys_args(item)
            return self._append(keys=keys, args=args, client=client)

        async with self._guard("mailbox_append"):
            if self._fast is not None and self._durable is None:
                raws = await self._fast.evalsha(self._append.sha, self._append.script, [keys_args(i) for i in items])
            elif self._durable is not None:
                raws = await self._durable.run([(k.user_meta(i.user_id), partial(call, i)) for i in items])
            elif len(items) == 1 or is_cluster(self._redis):
                raws = await asyncio.gather(*(call(item) for item in items))
            else:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for item in items:
                        await call(item, pipe)
                    raws = await pipe.execute()
        appended = [self._appended(i.user_id, raw) for i, raw in zip(items, raws, strict=True)]
        if self._observe is not None:
            for result in appended:
                self._observe(result.length, result.trimmed, self._max_len)
        return appended

    @staticmethod
    def _appended(user_id: str, raw: Sequence[Any]) -> Appended:
        return Appended(
            user_id=user_id,
            seq=int(raw[0]),
            epoch=_text(raw[1]),
            presence=_pairs_to_counts(raw[2]),
            length=int(raw[3]),
            trimmed=int(raw[4]),
        )

    async def open(self, user_id: str) -> SequenceState:
        """The user's sequence state, creating the epoch if the user has none yet."""
        k = self._keys
        async with self._guard("mailbox_open"):
            raw = await self._open(keys=[k.user_meta(user_id), k.mailbox(user_id)], args=[self._ttl_s])
        return SequenceState(epoch=_text(raw[0]), last_seq=int(raw[1]), acked=int(raw[2]))

    async def open_many(self, user_ids: Sequence[str]) -> dict[str, SequenceState]:
        """:meth:`open` for many users in one pipelined round trip (a node resyncing all its users)."""
        k = self._keys

        def call(user_id: str, client: Any = None) -> Awaitable[Any]:
            return self._open(keys=[k.user_meta(user_id), k.mailbox(user_id)], args=[self._ttl_s], client=client)

        async with self._guard("mailbox_open"):
            if is_cluster(self._redis):
                raws = await asyncio.gather(*(call(u) for u in user_ids))
            else:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for user_id in user_ids:
                        await call(user_id, pipe)
                    raws = await pipe.execute()
        return {
            u: SequenceState(epoch=_text(raw[0]), last_seq=int(raw[1]), acked=int(raw[2]))
            for u, raw in zip(user_ids, raws, strict=True)
        }

    async def read(self, user_id: str, after_seq: int, *, count: int) -> list[StoredMessage]:
        """Up to ``count`` stored messages with seq > ``after_seq``, in seq order."""
        async with self._guard("mailbox_read"):
            entries = await self._redis.xrange(self._keys.mailbox(user_id), min=f"({after_seq}-0", max="+", count=count)
        return [_stored(entry_id, fields) for entry_id, fields in entries or ()]

    async def ack(self, user_id: str, epoch: str, seq: int) -> int:
        """Moves the read cursor to ``seq`` (cumulative); returns the cursor, or -1 if the epoch is gone."""
        async with self._guard("mailbox_ack"):
            return int(await self._ack(keys=[self._keys.user_meta(user_id)], args=[epoch, seq]))
