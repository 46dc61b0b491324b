"""The Redis key schema: every key and channel name Beeline uses is built here and nowhere else.

Format: ``<prefix>:{<tag>}:<name>`` with ``:`` as the only separator.

* Per-user keys carry the hash tag ``{u:<user_id>}`` so that the sequence counter, the mailbox and the
  user's presence hash live in one Redis Cluster slot and one Lua script can touch them atomically.
* Per-node keys carry ``{n:<node_id>}`` so a node's stream, info hash and member set share a slot.
* The node registry (a sorted set of heartbeat deadlines) is a single key with its own tag.

Lifetimes, decided here so they are not scattered:

* ``user_meta`` / ``mailbox``: expire ``mailbox_ttl_s`` after the last append (refreshed on append and
  on connect).
* ``user_presence``: no TTL; entries are removed on clean disconnect, and the reaper removes a dead
  node's entries using the node's ``node_members`` set.
* ``node_stream`` / ``node_info`` / ``node_members``: refreshed by every heartbeat with a TTL of
  ``node_key_ttl_s``; a node that dies stops refreshing them, so they disappear by themselves even if no
  reaper runs. The reaper deletes them earlier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

DEFAULT_PREFIX: Final = "beeline"


@dataclass(frozen=True, slots=True)
class Keys:
    """Builds Redis key names under one configurable prefix (tests use a unique prefix each)."""

    prefix: str = DEFAULT_PREFIX

    def _user(self, user_id: str, name: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}:{name}"

    def _node(self, node_id: str, name: str) -> str:
        return f"{self.prefix}:{{n:{node_id}}}:{name}"

    # -- per user (one slot) ------------------------------------------------------------------
    def user_meta(self, user_id: str) -> str:
        """Hash {seq, epoch, acked}: the user's sequence counter, its epoch and the read cursor."""
        return self._user(user_id, "meta")

    def mailbox(self, user_id: str) -> str:
        """Capped stream whose entry ids are ``<seq>-0``: the source of truth for delivery."""
        return self._user(user_id, "mbox")

    def user_dedup(self, user_id: str, msg_id: str) -> str:
        """Marker ``msg_id -> seq`` of an idempotent send, so a retry is not appended twice."""
        return self._user(user_id, f"dedup:{msg_id}")

    def user_presence(self, user_id: str) -> str:
        """Hash node_id -> number of the user's connections on that node."""
        return self._user(user_id, "conns")

    # -- per node (one slot) ------------------------------------------------------------------
    def node_stream(self, node_id: str) -> str:
        """The node's inbound stream: routed messages and control commands for its connections."""
        return self._node(node_id, "stream")

    def node_stream_affixes(self) -> tuple[str, str]:
        """``(before, after)`` with ``before + node_id + after == node_stream(node_id)``, for the one
        script that builds node stream names itself (``lua/mailbox_append.lua``)."""
        before, after = self.node_stream("\0").split("\0")
        return before, after

    def node_info(self, node_id: str) -> str:
        """Hash {connections, draining, stream_lag, started_ms} refreshed by the heartbeat."""
        return self._node(node_id, "info")

    def node_members(self, node_id: str) -> str:
        """Set of user ids with a connection on the node, so the reaper can clean a dead node."""
        return self._node(node_id, "users")

    def node_reap_lock(self, node_id: str) -> str:
        """Short lock so only one gateway reaps a given dead node."""
        return self._node(node_id, "reaping")

    # -- global --------------------------------------------------------------------------------
    def node_registry(self) -> str:
        """Sorted set node_id -> deadline (Redis time, ms) after which the node counts as dead."""
        return f"{self.prefix}:{{nodes}}:registry"

    def broadcast_channel(self) -> str:
        """Pub/sub channel of the ``broadcast`` routing mode (every node subscribes)."""
        return f"{self.prefix}:broadcast"

    def idempotency(self, scope: str, key: str) -> str:
        """Stored result of a send made with an ``Idempotency-Key`` (scoped by API key digest)."""
        return f"{self.prefix}:{{i:{scope}}}:{key}"


STREAM_GROUP: Final = "gateway"
"""Consumer group every node uses on its own stream (one consumer, NOACK: the group is the cursor)."""
