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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

from redis.commands.core import AsyncScript

from shared.autopipeline import AutoPipeline
from shared.durability import DurableWriter
from shared.envelope import STREAM_FIELD
from shared.keys import Keys
from shared.redis import OpGuard, RedisClient, is_cluster, is_unavailable, lua_source, unavailable, untimed

MailboxObserver = Callable[[int, int, int], None]
"""Called with ``(length, trimmed, cap)`` after each append (metrics: fill ratio and trims)."""


class Append(NamedTuple):
    """One message for one user. With a ``dedup_id`` (idempotent sends), appending it again within the
    dedup window returns the first seq instead of a second copy."""

    envelope: bytes
    user_id: str
    dedup_id: str | None = None
    push: bool = False
    """Also push the message to the user's live nodes in the same call (a mailbox that
    :attr:`Mailbox.can_push`; see ``lua/mailbox_append.lua``), except ``local_node``."""
    local_node: str | None = None


class Appended(NamedTuple):
    """Result of one append: the assigned seq and epoch, node_id -> connections of the receiver, and
    the mailbox's length after it with how many old entries the cap trimmed. ``pushed`` (None: no push
    was made) has each live node of the user's but the sender's own: whether the entry reached its
    stream. Nodes in ``presence`` but not in it were dead when Redis ran the append."""

    user_id: str
    seq: int
    epoch: str
    presence: dict[str, int]
    length: int = 0
    trimmed: int = 0
    pushed: dict[str, bool] | None = None


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
        stream_maxlen: int = 0,
    ) -> None:
        self._redis = redis
        self._fast = fast
        self._stream_maxlen = stream_maxlen
        # The push's fixed keys and arguments (KEYS[5], ARGV[7..8] of mailbox_append), built once.
        self._push_registry = keys.node_registry()
        self._push_stream_affixes = keys.node_stream_affixes()
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

    @property
    def can_push(self) -> bool:
        """Whether an append can also push (:attr:`Append.push`): only on one standalone Redis (the
        script touches node streams outside the user's slot) without durable writes."""
        return self.isolates_appends and self._stream_maxlen > 0

    async def append(self, envelope: bytes, user_ids: Sequence[str]) -> list[Appended]:
        """Appends one envelope to each user's mailbox in one pipelined round trip."""
        return await self.append_each([Append(envelope, u) for u in user_ids])

    async def append_each(self, items: Sequence[Append]) -> list[Appended]:
        """Appends many messages (each to one user) in one round trip (see :meth:`_run_script`)."""
        calls = [self._append_call(i) for i in items]
        with self._guard("mailbox_append"):
            if self._durable is not None:
                # Each call gets the client to run on (a primary's pipeline); the user meta key routes it.
                raws = await self._durable.run([(keys[0], partial(self._append, keys, args)) for keys, args in calls])
            else:
                raws = await self._run_script(self._append, calls)
        return [self._result(item, raw) for item, raw in zip(items, raws, strict=True)]

    @property
    def isolates_appends(self) -> bool:
        """Whether :meth:`append_separately` works: one standalone Redis connection without durable
        writes, where every script call gets a reply of its own."""
        return self._fast is not None and self._durable is None

    async def append_separately(self, items: Sequence[Append]) -> list[Appended | Exception]:
        """:meth:`append_each` for independent appends in one round trip: an error reply for one (a
        user's key of the wrong type, Redis out of memory) is returned in its place, as
        :class:`~shared.errors.StoreUnavailable` when it means "not available now", and the others
        stand. A lost or stuck connection raises StoreUnavailable for all, as for one."""
        fast = self._fast
        if fast is None or not self.isolates_appends:
            raise RuntimeError("append_separately needs isolates_appends")
        calls = [self._append_call(i) for i in items]
        with self._guard("mailbox_append"):
            raws = await fast.evalsha(self._append.sha, self._append.script, calls, each=True)
        return [self._outcome(item, raw) for item, raw in zip(items, raws, strict=True)]

    def _outcome(self, item: Append, raw: Any) -> Appended | Exception:
        if not isinstance(raw, Exception):
            return self._result(item, raw)
        return unavailable(raw) if is_unavailable(raw) else raw

    def _result(self, item: Append, raw: Sequence[Any]) -> Appended:
        """One append's reply as :class:`Appended`, observed (fill ratio, trims)."""
        result = self._appended(item.user_id, raw)
        if self._observe is not None:
            self._observe(result.length, result.trimmed, self._max_len)
        return result

    def _append_call(self, item: Append) -> tuple[list[str], list[Any]]:
        k, user_id = self._keys, item.user_id
        dedup = k.user_dedup(user_id, item.dedup_id or "-")
        keys = [k.user_meta(user_id), k.mailbox(user_id), k.user_presence(user_id), dedup]
        args: list[Any] = [item.envelope, self._max_len, self._ttl_s, self._dedup_ttl_s if item.dedup_id else 0]
        if item.push and self.can_push:
            keys.append(self._push_registry)
            args.extend((user_id, self._stream_maxlen, *self._push_stream_affixes, item.local_node or ""))
        return keys, args

    async def _run_script(self, script: AsyncScript, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
        """Runs ``script`` once per ``(keys, args)`` in one round trip: on the coalescing connection when
        there is one (standalone Redis), else in a pipeline. A Redis Cluster client cannot pipeline
        scripts (redis-py refuses EVALSHA in a cluster pipeline), so there the calls run concurrently:
        still one round trip of latency per slot owner."""
        if self._fast is not None:
            return await self._fast.evalsha(script.sha, script.script, calls)
        if len(calls) == 1 or is_cluster(self._redis):
            return list(await asyncio.gather(*(script(keys=keys, args=args) for keys, args in calls)))
        pipeline: Any = self._redis.pipeline(transaction=False)  # redis-py types `client` as a client only
        async with pipeline as pipe:
            for keys, args in calls:
                await script(keys=keys, args=args, client=pipe)
            return list(await pipe.execute())

    @staticmethod
    def _appended(user_id: str, raw: Sequence[Any]) -> Appended:
        return Appended(
            user_id=user_id,
            seq=int(raw[0]),
            epoch=_text(raw[1]),
            presence=_pairs_to_counts(raw[2]),
            length=int(raw[3]),
            trimmed=int(raw[4]),
            pushed={_text(raw[5][i]): bool(raw[5][i + 1]) for i in range(0, len(raw[5]), 2)} if len(raw) > 5 else None,
        )

    async def open(self, user_id: str) -> SequenceState:
        """The user's sequence state, creating the epoch if the user has none yet."""
        return (await self.open_many([user_id]))[user_id]

    async def open_many(self, user_ids: Sequence[str]) -> dict[str, SequenceState]:
        """:meth:`open` for many users in one round trip (a node resyncing all its users)."""
        k = self._keys
        calls = [([k.user_meta(u), k.mailbox(u)], [self._ttl_s]) for u in user_ids]
        with self._guard("mailbox_open"):
            raws = await self._run_script(self._open, calls)
        return {
            u: SequenceState(epoch=_text(raw[0]), last_seq=int(raw[1]), acked=int(raw[2]))
            for u, raw in zip(user_ids, raws, strict=True)
        }

    async def read(self, user_id: str, after_seq: int, *, count: int) -> list[StoredMessage]:
        """Up to ``count`` stored messages with seq > ``after_seq``, in seq order."""
        with self._guard("mailbox_read"):
            entries = await self._redis.xrange(self._keys.mailbox(user_id), min=f"({after_seq}-0", max="+", count=count)
        return [_stored(entry_id, fields) for entry_id, fields in entries or ()]

    async def ack(self, user_id: str, epoch: str, seq: int) -> int:
        """Moves the read cursor to ``seq`` (cumulative); returns the cursor, or -1 if the epoch is gone."""
        with self._guard("mailbox_ack"):
            return int(await self._ack(keys=[self._keys.user_meta(user_id)], args=[epoch, seq]))
