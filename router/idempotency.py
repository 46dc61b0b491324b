"""``Idempotency-Key`` support: a retried send (same key, same body) delivers once and gets the first
answer back, for ``idempotency_window_s`` after the first attempt.

The first request claims the key with ``SET NX`` (value ``pending:<body digest>``), sends, and stores
the response. A retry racing the original waits (bounded) for the stored response. A retry after a
failed first attempt (503) finds no key and sends again. Reusing a key with a different body is a 422.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

from shared.errors import InvalidRequest, StoreUnavailable
from shared.keys import Keys
from shared.logs import get_logger
from shared.metrics import Metrics
from shared.redis import RedisClient

log = get_logger("beeline.router.idempotency")

PENDING: Final = b"pending:"
PENDING_TTL_S: Final = 60
"""How long a claim lives before the result is stored: if storing the result fails after a successful
send, the claim expires and a later retry sends again (at-least-once), instead of a 409 for the window."""
WAIT_FOR_FIRST_S: Final = 10.0
MAX_KEY_LEN: Final = 255


class IdempotencyConflict(InvalidRequest):
    """The key is in use by a request still running (409) or was used with another body (422)."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(code, message)
        self.status = status


class IdempotencyStore:
    def __init__(self, redis: RedisClient, keys: Keys, metrics: Metrics, *, window_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._metrics = metrics
        self._window_s = window_s

    async def run_once(
        self, scope: str, key: str, body: bytes, send: Callable[[], Awaitable[dict[str, Any]]]
    ) -> tuple[dict[str, Any], bool]:
        """Runs ``send`` at most once per (scope, key); returns (response, replayed)."""
        if not key or len(key) > MAX_KEY_LEN:
            raise InvalidRequest("invalid_field", f"Idempotency-Key must be 1..{MAX_KEY_LEN} characters")
        digest = hashlib.sha256(body).hexdigest()[:32].encode()
        name = self._keys.idempotency(scope, key)
        with self._metrics.redis_op("idempotency_claim"):
            claimed = await self._redis.set(name, PENDING + digest, nx=True, ex=min(self._window_s, PENDING_TTL_S))
        if claimed:
            try:
                response = await send()
            except BaseException:
                with self._metrics.redis_op("idempotency_release"):
                    await self._redis.delete(name)
                raise
            stored = digest + b":" + json.dumps(response, separators=(",", ":")).encode()
            try:
                with self._metrics.redis_op("idempotency_store"):
                    await self._redis.set(name, stored, ex=self._window_s)
            except StoreUnavailable:
                # The message was accepted: answer with it rather than a 503 that invites a resend.
                log.warning("idempotency_store_failed", scope=scope)
            return response, False
        return await self._replay(name, digest), True

    async def _replay(self, name: str, digest: bytes) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_FOR_FIRST_S
        delay = 0.005
        while True:
            with self._metrics.redis_op("idempotency_get"):
                value = cast("bytes | None", await self._redis.get(name))  # the client returns bytes
            if value is None:
                raise IdempotencyConflict(
                    "idempotency_retry", "the first request with this key failed; retry the request", 409
                )
            if value.startswith(PENDING):
                if value[len(PENDING) :] != digest:
                    raise IdempotencyConflict("idempotency_mismatch", "key reused with a different body", 422)
                if time.monotonic() > deadline:
                    raise IdempotencyConflict("idempotency_in_progress", "the first request is still running", 409)
                await asyncio.sleep(delay)
                delay = min(0.1, delay * 2)
                continue
            stored_digest, _, payload = value.partition(b":")
            if stored_digest != digest:
                raise IdempotencyConflict("idempotency_mismatch", "key reused with a different body", 422)
            result: dict[str, Any] = json.loads(payload)
            return result
