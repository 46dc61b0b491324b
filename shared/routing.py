"""Routing: what happens to an accepted message, decided from the receiver's presence.

Pure decisions (:func:`classify`, :func:`plan`) are separate from the :class:`Sender` that runs them,
and neither imports redis: the mailbox, node registry and delivery transport are injected.

A send is: pack the envelope once -> one mailbox append per receiver (seq assigned, presence returned,
one pipelined round trip) -> receivers on the sender's own node are handed over in-process -> one push
per remote live node, carrying every receiver that node holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol

from shared.delivery import Delivery, Outgoing
from shared.envelope import Envelope, Recipient
from shared.errors import InvalidRequest, StoreUnavailable
from shared.logs import get_logger
from shared.mailbox import Append, Appended
from shared.protocol import ErrorCode

log = get_logger("beeline.routing")
_debug_gate = logging.getLogger("beeline.routing")  # the level check, without structlog's wrapper

LOCAL: Final = "local"
ROUTED: Final = "routed"
STORED: Final = "stored"


class SendResult(NamedTuple):
    """Per-receiver outcome of a send."""

    to: str
    seq: int
    epoch: str
    status: str
    nodes: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {"to": self.to, "seq": self.seq, "epoch": self.epoch, "status": self.status, "nodes": list(self.nodes)}


def classify(live_nodes: Sequence[str], local_node: str | None) -> str:
    """``local`` when every live connection is on the sender's node, ``routed`` when at least one is
    elsewhere, ``stored`` when the receiver is offline."""
    if not live_nodes:
        return STORED
    if local_node is not None and all(n == local_node for n in live_nodes):
        return LOCAL
    return ROUTED


class MailboxStore(Protocol):
    async def append_each(self, items: Sequence[Append]) -> list[Appended]: ...

    async def append_separately(self, items: Sequence[Append]) -> list[Appended | Exception]: ...

    @property
    def isolates_appends(self) -> bool: ...


class LiveFilter(Protocol):
    async def live_subset(self, presence: Mapping[str, int]) -> dict[str, int]: ...


class SendCounter(Protocol):
    """What the Sender reports to metrics (``shared.metrics.Metrics`` implements it)."""

    def sent(self, statuses: Iterable[str]) -> None: ...

    def send_failed(self, receivers: int) -> None: ...


LocalHandoff = Callable[[Envelope, bytes, Sequence[Recipient]], None]
"""Delivers to connections on the sender's own node without the Redis stream hop."""


@dataclass(frozen=True, slots=True)
class Message:
    """One message to send: an envelope and its receivers. ``idempotent`` messages (sent under an
    Idempotency-Key, with a msg id derived from it) are appended at most once per receiver, so a retry
    after a partial failure completes the send instead of doubling it."""

    envelope: Envelope
    to: tuple[str, ...]
    idempotent: bool = False


class Sender:
    """Accepts messages: mailbox first (the source of truth), then live pushes."""

    def __init__(
        self,
        mailbox: MailboxStore,
        nodes: LiveFilter,
        delivery: Delivery,
        *,
        max_payload_bytes: int,
        local_node: str | None = None,
        local_handoff: LocalHandoff | None = None,
        metrics: SendCounter | None = None,
        push_in_append: bool = False,
    ) -> None:
        self._metrics = metrics
        self._push_in_append = push_in_append
        self._mailbox = mailbox
        self._nodes = nodes
        self._delivery = delivery
        self._max_payload_bytes = max_payload_bytes
        self._local_node = local_node
        self._local_handoff = local_handoff

    def pack(self, envelope: Envelope) -> bytes:
        try:
            packed = envelope.pack()
        except (OverflowError, ValueError) as e:  # msgpack: an integer beyond 64 bits, nesting too deep
            raise InvalidRequest(ErrorCode.INVALID_FIELD, f"payload cannot be stored: {e}") from None
        if len(packed) > self._max_payload_bytes:
            raise InvalidRequest(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"message is {len(packed)} bytes packed; the limit is {self._max_payload_bytes}",
            )
        return packed

    @property
    def isolates_sends(self) -> bool:
        """Whether :meth:`send_separately` can gather independent sends into one pass."""
        return self._mailbox.isolates_appends

    async def send(
        self, messages: Sequence[Message], *, packed: Sequence[bytes] | None = None
    ) -> list[list[SendResult]]:
        """Sends many messages in one pipelined pass; results per message, per receiver, in order.

        ``packed``: the envelopes, already packed (and so validated) one by one with :meth:`pack`.

        Raises :class:`~shared.errors.StoreUnavailable` when the mailbox append fails (nothing was
        stored), and when the push after it fails: then the message is stored, and a retry with the same
        Idempotency-Key finds its dedup marker, keeps its seq and completes the push (the gateway drops
        a seq it has already delivered). A retry without a key appends it again.
        """
        if packed is None:
            packed = [self.pack(m.envelope) for m in messages]
        items = self._appends(messages, packed, lone=len(messages) == 1)
        try:
            appended = await self._mailbox.append_each(items)
        except StoreUnavailable:
            self._failed(messages)
            raise
        return await self._deliver(messages, packed, appended)

    async def send_separately(
        self, messages: Sequence[Message], packed: Sequence[bytes]
    ) -> list[list[SendResult] | Exception]:
        """Independent sends gathered into one pass (the router's front, from concurrent requests):
        each is appended and pushed as it would be alone, and gets its own outcome, so an error reply
        for one message's append fails that message only. A lost or stuck Redis connection still
        raises StoreUnavailable for all. Needs :attr:`isolates_sends`."""
        try:
            outcomes = await self._mailbox.append_separately(self._appends(messages, packed, lone=True))
        except StoreUnavailable:
            self._failed(messages)
            raise
        results: list[list[SendResult] | Exception] = []
        sent: list[tuple[int, Message, bytes]] = []
        appended: list[Appended] = []
        cursor = 0
        for message, envelope_bytes in zip(messages, packed, strict=True):
            mine = outcomes[cursor : cursor + len(message.to)]
            cursor += len(message.to)
            error = next((o for o in mine if isinstance(o, Exception)), None)
            if error is None:
                sent.append((len(results), message, envelope_bytes))
                appended.extend(o for o in mine if not isinstance(o, Exception))
            elif isinstance(error, StoreUnavailable):
                self._failed([message])
            results.append(error if error is not None else [])
        delivered = await self._deliver([m for _, m, _ in sent], [p for _, _, p in sent], appended) if sent else []
        for (index, _message, _packed), per_message in zip(sent, delivered, strict=True):
            results[index] = per_message
        return results

    def _appends(self, messages: Sequence[Message], packed: Sequence[bytes], *, lone: bool) -> list[Append]:
        # A lone one-receiver message is pushed by its append to the receiver's live nodes: one round
        # trip instead of two. A many-receiver message keeps one entry per node for all its receivers
        # there, and a batch keeps its pushes in one burst after the appends, which each gateway then
        # reads at once (pushed from the appends, they would trickle in between the scripts and wake the
        # gateways for a few entries each: measured 2.5x the reads).
        push = self._push_in_append and lone
        return [
            Append(p, u, m.envelope.msg_id if m.idempotent else None, push and len(m.to) == 1, self._local_node)
            for p, m in zip(packed, messages, strict=True)
            for u in m.to
        ]

    def _failed(self, messages: Sequence[Message]) -> None:
        if self._metrics is not None:
            self._metrics.send_failed(sum(len(m.to) for m in messages))

    async def _deliver(
        self, messages: Sequence[Message], packed: Sequence[bytes], appended: Sequence[Appended]
    ) -> list[list[SendResult]]:
        """Pushes appended messages to their receivers' live nodes; results per message, per receiver."""
        # Where each receiver is live: judged by Redis in the append when it pushed, else by the
        # registry view (the only await, and only then).
        live: list[dict[str, int]] = []
        for item in appended:
            pushed = item.pushed
            if pushed is None:
                live.append(await self._nodes.live_subset(item.presence))
            else:  # Redis judged every node but ours in the append, and pushed to the live ones
                live.append({n: c for n, c in item.presence.items() if n in pushed or n == self._local_node})
        outgoing: list[Outgoing] = []
        statuses: list[list[tuple[Appended, str, tuple[str, ...]]]] = []
        cursor = 0
        for message, envelope_bytes in zip(messages, packed, strict=True):
            end = cursor + len(message.to)
            out, rows = self._plan(message.envelope, envelope_bytes, appended[cursor:end], live[cursor:end])
            cursor = end
            outgoing.append(out)
            statuses.append(rows)
        unreached = await self._delivery.push(outgoing)
        results: list[list[SendResult]] = []
        for rows, missing in zip(statuses, unreached, strict=True):
            per_message = []
            for item, status, nodes in rows:
                reached = nodes
                pushed = item.pushed
                if missing or (pushed and not all(pushed.values())):
                    reached = tuple([n for n in nodes if n not in missing and (pushed is None or pushed.get(n, True))])
                per_message.append(
                    SendResult(item.user_id, item.seq, item.epoch, status if reached else STORED, reached)
                )
            results.append(per_message)
        self._account(messages, results)
        return results

    def _account(self, messages: Sequence[Message], results: list[list[SendResult]]) -> None:
        # One metrics update and, at debug level only, one log line per message: never per receiver
        # at info, and never the payload.
        if self._metrics is not None:
            self._metrics.sent(r.status for per_message in results for r in per_message)
        if _debug_gate.isEnabledFor(logging.DEBUG):
            for message, per_message in zip(messages, results, strict=True):
                log.debug(
                    "message_accepted",
                    msg_id=message.envelope.msg_id,
                    receivers=len(per_message),
                    statuses=sorted({r.status for r in per_message}),
                )

    def _plan(
        self,
        envelope: Envelope,
        envelope_bytes: bytes,
        appended: Sequence[Appended],
        live: Sequence[Mapping[str, int]],
    ) -> tuple[Outgoing, list[tuple[Appended, str, tuple[str, ...]]]]:
        targets: dict[str, list[Recipient]] = {}
        local: list[Recipient] = []
        rows = []
        recipients = tuple(Recipient(a.user_id, a.seq, a.epoch) for a in appended)
        for item, live_nodes, recipient in zip(appended, live, recipients, strict=True):
            nodes = tuple(sorted(live_nodes))
            for node_id in nodes:
                if node_id == self._local_node:
                    local.append(recipient)
                elif item.pushed is None:
                    targets.setdefault(node_id, []).append(recipient)
            rows.append((item, classify(nodes, self._local_node), nodes))
        if local and self._local_handoff is not None:
            self._local_handoff(envelope, envelope_bytes, local)
        return Outgoing(envelope=envelope_bytes, recipients=recipients, targets=targets), rows
