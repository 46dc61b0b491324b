"""The node-local directory of connections (user -> sockets) and the entry point of every delivery.

Whatever the path (node stream, broadcast pub/sub, or a sender on this node), items end here and are
offered to each connection of the receiver; each connection enforces its own order and dedup.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from gateway.connection import Connection
from shared.envelope import Envelope, Recipient, StreamEntry
from shared.errors import EnvelopeDecodeError
from shared.logs import get_logger
from shared.metrics import Metrics
from shared.protocol import CloseCode

log = get_logger("beeline.gateway.hub")


class ConnectionHub:
    """User id -> open connections on this node."""

    def __init__(self, metrics: Metrics) -> None:
        self._by_user: dict[str, set[Connection]] = {}
        self._metrics = metrics
        self._node = metrics.node
        self._count = 0
        self._by_protocol: dict[str, int] = {}

    def __len__(self) -> int:
        return self._count

    @property
    def user_count(self) -> int:
        return len(self._by_user)

    def add(self, conn: Connection) -> None:
        self._by_user.setdefault(conn.user_id, set()).add(conn)
        self._count += 1
        self._count_protocol(conn.protocol, 1)
        self._metrics.presence_users.labels(self._node).set(len(self._by_user))

    def remove(self, conn: Connection) -> None:
        conns = self._by_user.get(conn.user_id)
        if conns is None or conn not in conns:
            return
        conns.discard(conn)
        if not conns:
            del self._by_user[conn.user_id]
        self._count -= 1
        self._count_protocol(conn.protocol, -1)
        self._metrics.presence_users.labels(self._node).set(len(self._by_user))

    def _count_protocol(self, protocol: str, change: int) -> None:
        count = self._by_protocol[protocol] = self._by_protocol.get(protocol, 0) + change
        self._metrics.connections.labels(self._node, protocol).set(count)

    def connections(self) -> Iterator[Connection]:
        for conns in list(self._by_user.values()):
            yield from list(conns)

    def connections_of(self, user_id: str) -> tuple[Connection, ...]:
        return tuple(self._by_user.get(user_id, ()))

    def counts(self) -> dict[str, int]:
        """User id -> number of connections here (to re-register after Redis lost presence)."""
        return {user_id: len(conns) for user_id, conns in self._by_user.items()}

    def deliver_entry(self, entry: StreamEntry, path: str) -> None:
        """Handles one node-stream / broadcast entry: a message for some users, or a disconnect."""
        if entry.disconnect_user is not None:
            self.disconnect_user(entry.disconnect_user)
        if entry.envelope is None:
            return
        held = [r for r in entry.recipients if r.user_id in self._by_user]
        if len(held) < len(entry.recipients):
            # broadcast mode: this node does not hold them; routed mode: they left since the lookup.
            self._metrics.messages.labels("gateway", "dropped").inc(len(entry.recipients) - len(held))
        if not held:
            return
        try:
            envelope = Envelope.unpack(entry.envelope)
        except EnvelopeDecodeError:
            log.error("entry_undecodable", path=path)
            return
        self.offer(envelope, held, path)

    def offer(self, envelope: Envelope, recipients: Sequence[Recipient], path: str) -> None:
        for recipient in recipients:
            for conn in tuple(self._by_user.get(recipient.user_id, ())):
                conn.offer(envelope, recipient, path)

    def handoff(self, envelope: Envelope, _packed: bytes, recipients: Sequence[Recipient]) -> None:
        """The local path: a sender on this node serves receivers here without the stream hop."""
        self.offer(envelope, recipients, "local")

    def disconnect_user(self, user_id: str) -> int:
        conns = tuple(self._by_user.get(user_id, ()))
        for conn in conns:
            conn.close(CloseCode.DISCONNECTED_BY_ADMIN, "disconnected by admin")
        if conns:
            log.info("user_disconnected_by_admin", user_id=user_id, connections=len(conns))
        return len(conns)
