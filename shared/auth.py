"""Authentication: client JWTs for the gateway, API keys for the router.

Tokens are standard JWTs: ``sub`` is the user id and ``exp`` is enforced (required). HS256 with a shared
secret by default; RS256 with a PEM public key when one is configured. Any token signed with the secret is
accepted, not only those :func:`mint_token` makes.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jwt

from shared.errors import AuthError
from shared.protocol import MAX_ID_LEN

LEEWAY_S = 5
"""Clock skew tolerated on ``exp``/``nbf`` between the token issuer and the gateway."""


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    expires_at: float


class TokenVerifier:
    """Verifies client tokens; never logs them."""

    def __init__(self, *, secret: str = "", public_key: str = "", audience: str = "") -> None:
        if public_key.startswith("@"):
            public_key = Path(public_key[1:]).read_text(encoding="utf-8")
        self._keys: list[tuple[str | bytes, str]] = []
        if public_key:
            self._keys.append((public_key, "RS256"))
        if secret:
            self._keys.append((secret, "HS256"))
        if not self._keys:
            raise AuthError("no token secret or public key configured")
        # Without a configured audience, any token signed with our key is accepted whatever its `aud`
        # (SPEC: "any HS256 token signed with the secret"); with one, `aud` must name it.
        self._audience = audience or None

    def verify(self, token: str) -> Identity:
        last: Exception | None = None
        for key, algorithm in self._keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[algorithm],
                    audience=self._audience,
                    options={"require": ["sub", "exp"], "verify_aud": self._audience is not None},
                    leeway=LEEWAY_S,
                )
            except jwt.ExpiredSignatureError as e:
                raise AuthError("token expired") from e
            except jwt.InvalidTokenError as e:
                last = e
                continue
            sub = claims.get("sub")
            if not isinstance(sub, str) or not sub or len(sub) > MAX_ID_LEN:
                raise AuthError("token sub must be a non-empty string")
            return Identity(user_id=sub, expires_at=float(claims["exp"]))
        raise AuthError(f"invalid token: {type(last).__name__}")


def mint_token(secret: str, user_id: str, *, ttl_s: int = 24 * 3600) -> str:
    """A development HS256 token for ``user_id``."""
    now = int(time.time())
    return jwt.encode({"sub": user_id, "iat": now, "exp": now + ttl_s}, secret, algorithm="HS256")


class ApiKeys:
    """The router's bearer keys, compared in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def check(self, presented: str) -> str:
        """Returns a short, non-secret scope id for the key (used to scope idempotency keys)."""
        digest = hashlib.sha256(presented.encode()).digest()
        for known in self._digests:
            if hmac.compare_digest(digest, known):
                return known[:8].hex()
        raise AuthError("unknown API key")


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
