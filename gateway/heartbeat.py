"""The node heartbeat: keeps this node alive in the registry and reaps nodes that died.

Schedule is drift-free (beat k happens at ``start + k * interval``, sleeping ``max(0, next - now)``),
so a slow beat does not push the next one late. Cost per beat is constant (see ``NodeRegistry.beat``)
whatever the number of connections.

If a beat finds this node absent from the registry (Redis restarted without persistence, or a peer reaped
it after a stall) or past its deadline (it stalled), the node re-registers every connection and resyncs
them from the mailbox.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from shared.errors import StoreUnavailable
from shared.logs import get_logger
from shared.nodes import NodeInfo, NodeRegistry
from shared.presence import RedisPresenceDirectory

log = get_logger("beeline.gateway.heartbeat")


class Heartbeat:
    """Owns the beat loop of one node; ``run()`` is the task body."""

    def __init__(
        self,
        *,
        registry: NodeRegistry,
        presence: RedisPresenceDirectory,
        node_id: str,
        interval_s: float,
        info: Callable[[], Awaitable[NodeInfo]],
        on_lost: Callable[[], Awaitable[None]],
    ) -> None:
        self._registry = registry
        self._presence = presence
        self._node_id = node_id
        self._interval = interval_s
        self._info = info
        self._on_lost = on_lost
        self._failing = False

    async def beat(self, *, initial: bool = False) -> None:
        """One beat; raises StoreUnavailable when Redis is unreachable. The ``initial`` beat registers."""
        beat = await self._registry.beat(await self._info())
        if beat.lapsed and not initial:
            # Senders treated this node as dead for a while: messages for its users went to the
            # mailbox only. Re-register and resync every connection so none of them waits for the
            # next live push to fill that gap.
            log.warning("node_registration_lapsed", node_id=self._node_id, absent=beat.was_absent)
            await self._on_lost()
        for dead in beat.dead_nodes:
            await self.reap(dead)
        await self._registry.refresh()

    async def reap(self, node_id: str) -> None:
        # The lock lasts a few beats so peers do not all reap the same node; forget_if_dead makes a
        # node that came back keep its registration (it will re-register its users itself).
        if not await self._registry.claim_reap(node_id, ttl_s=max(5.0, 3 * self._interval)):
            return
        if not await self._registry.forget_if_dead(node_id):
            return
        users = await self._presence.reap(node_id)
        log.info("node_reaped", node_id=self._node_id, dead_node=node_id, users=users)

    async def run(self) -> None:
        start = time.monotonic()
        beats = 0
        while True:
            beats += 1
            await asyncio.sleep(max(0.0, start + beats * self._interval - time.monotonic()))
            try:
                await self.beat()
            except StoreUnavailable as e:
                if not self._failing:
                    log.warning("heartbeat_failed", node_id=self._node_id, error=str(e))
                self._failing = True
                continue
            if self._failing:
                log.info("heartbeat_recovered", node_id=self._node_id)
                self._failing = False
