"""One small error hierarchy. HTTP statuses are chosen only at the router boundary; WebSocket close
codes and error-frame codes are the named constants in :mod:`shared.protocol`."""

from __future__ import annotations


class BeelineError(Exception):
    """Base of every error Beeline raises on purpose."""


class ConfigError(BeelineError):
    """A setting is missing or violates an invariant; raised at load time, never later."""


class EnvelopeDecodeError(BeelineError):
    """Bytes from Redis or a client frame could not be decoded into the expected structure."""


class InvalidRequest(BeelineError):
    """Input that is well-formed but not acceptable (wrong field type, too large, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AuthError(BeelineError):
    """A token or API key is missing, malformed, badly signed or expired."""


class RoutingError(BeelineError):
    """Base of delivery-path failures."""


class StoreUnavailable(RoutingError):
    """Redis did not answer in time or refused the connection; the caller may retry later."""
