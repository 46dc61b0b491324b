"""The Redis-backed components both services build from one config: mailbox, presence directory,
node registry and delivery transport, on one command client (plus the durable-write primaries when
``BEELINE_DURABLE_REPLICAS`` is set). Built in :meth:`Store.open`, closed by :meth:`Store.aclose`."""

from __future__ import annotations

from dataclasses import dataclass

from shared.autopipeline import AutoPipeline
from shared.config import CommonConfig
from shared.delivery import Delivery, NodeStreamDelivery, create_delivery
from shared.durability import DurableWriter
from shared.keys import Keys
from shared.mailbox import Mailbox
from shared.metrics import Metrics
from shared.nodes import NodeRegistry
from shared.presence import RedisPresenceDirectory
from shared.redis import RedisClient, create_autopipeline, create_redis


@dataclass(frozen=True, slots=True)
class Store:
    """Everything a service reads and writes in Redis, sharing one client and one metrics guard."""

    redis: RedisClient
    mailbox: Mailbox
    presence: RedisPresenceDirectory
    nodes: NodeRegistry
    delivery: Delivery
    durable: DurableWriter | None
    fast: AutoPipeline | None

    @classmethod
    def open(cls, cfg: CommonConfig, keys: Keys, metrics: Metrics, *, dedup_ttl_s: int = 0) -> Store:
        """Builds the components; no I/O happens until they are used. ``dedup_ttl_s``: how long an
        idempotent send's per-receiver markers live (the router's idempotency window)."""
        guard = metrics.redis_op
        redis = create_redis(cfg)
        # The send path's own coalescing connection (standalone Redis; a cluster routes per slot).
        fast = create_autopipeline(cfg)
        durable = (
            DurableWriter(redis, cfg, replicas=cfg.durable_replicas, timeout_ms=cfg.durable_timeout_ms)
            if cfg.durable_replicas
            else None
        )
        return cls(
            redis=redis,
            mailbox=Mailbox(
                redis,
                keys,
                max_len=cfg.mailbox_max,
                ttl_s=cfg.mailbox_ttl_s,
                guard=guard,
                observe=metrics.observe_mailbox,
                durable=durable,
                dedup_ttl_s=dedup_ttl_s,
                fast=fast,
                stream_maxlen=cfg.stream_maxlen,
            ),
            presence=RedisPresenceDirectory(redis, keys, guard=guard),
            nodes=NodeRegistry(
                redis, keys, dead_after_s=cfg.node_dead_after_s, key_ttl_s=cfg.node_key_ttl_s, guard=guard
            ),
            delivery=create_delivery(cfg.routing, redis, keys, stream_maxlen=cfg.stream_maxlen, guard=guard, fast=fast),
            durable=durable,
            fast=fast,
        )

    @property
    def push_in_append(self) -> bool:
        """Whether routed sends push in the mailbox append itself (see :attr:`Mailbox.can_push`)."""
        return self.delivery.mode == NodeStreamDelivery.mode and self.mailbox.can_push

    async def aclose(self) -> None:
        if self.fast is not None:
            await self.fast.aclose()
        if self.durable is not None:
            await self.durable.aclose()
        await self.redis.aclose()
