"""Which asyncio event loop a service runs on.

uvloop (libuv) cuts the loop's own cost and the cost of socket writes, which together were about
45 % of the router's CPU under load in the py-spy profile (docs/benchmarks.md has the before/after
figures). It is a dependency on Linux and macOS; ``auto`` falls back to the standard loop where it is
not installed, and ``asyncio`` opts out (to rule it out while debugging).
"""

from __future__ import annotations

import asyncio
import importlib

from shared.errors import ConfigError


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A new event loop of the configured kind (``auto``, ``uvloop`` or ``asyncio``)."""
    if kind == "asyncio":
        return asyncio.new_event_loop()
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if kind == "uvloop":
            raise ConfigError("BEELINE_EVENT_LOOP=uvloop but uvloop is not installed") from None
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
