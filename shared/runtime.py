"""Process runtime of a service: which asyncio event loop it runs on, and how the GC is tuned.

uvloop (libuv) cuts the loop's own cost and the cost of socket writes, which together were about
45 % of the router's CPU under load in the py-spy profile (docs/benchmarks.md has the before/after
figures). It is a dependency on Linux and macOS; ``auto`` falls back to the standard loop where it is
not installed, and ``asyncio`` opts out (to rule it out while debugging).
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import sys

from aiohttp import web

from shared.config import CommonConfig
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


GC_GEN0_THRESHOLD = 20_000
"""Allocations between young-generation collections (CPython's default is 700)."""


def tune_gc() -> None:
    """Fewer, cheaper cyclic-GC passes for a long-running server.

    Everything allocated at start (modules, config, the app) is frozen out of the collector's view, and
    the young generation is collected every 20,000 allocations instead of 700: a send allocates a few
    hundred short-lived objects that reference counting frees anyway, so the default threshold ran a
    collection every couple of messages. Cyclic garbage is still collected, only in larger batches.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def serve(service: str, app: web.Application, cfg: CommonConfig, *, shutdown_timeout_s: float) -> int:
    """Runs a service's app until SIGTERM/SIGINT on the configured loop; the process exit code."""
    try:
        loop = new_event_loop(cfg.event_loop)
    except ConfigError as e:
        print(f"beeline {service}: {e}", file=sys.stderr)
        return 2
    tune_gc()
    web.run_app(
        app,
        host=cfg.host,
        port=cfg.port,
        access_log=None,
        print=None,
        shutdown_timeout=shutdown_timeout_s,
        handle_signals=True,
        loop=loop,
    )
    return 0
