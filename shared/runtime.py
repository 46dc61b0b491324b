"""Process runtime of a service: which asyncio event loop it runs on, how the GC is tuned, and how it
stops (bounded, whatever a task or a cleanup step does).

uvloop (libuv) cuts the loop's own cost and the cost of socket writes, which together were about
45 % of the router's CPU under load in the py-spy profile (docs/benchmarks.md has the before/after
figures). It is a dependency on Linux and macOS; ``auto`` falls back to the standard loop where it is
not installed, and ``asyncio`` opts out (to rule it out while debugging).
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

from aiohttp import web

from shared.config import CommonConfig
from shared.errors import ConfigError
from shared.logs import get_logger

log = get_logger("beeline.runtime")

STOP_GRACE_S: Final = 2.0
"""How far past its shutdown timeout a stop may run before the process reports what is stuck and exits."""
TASK_STOP_TIMEOUT_S: Final = 2.0
"""How long :func:`stop_task` waits for an owned task to end."""
RECANCEL_S: Final = 0.25
"""How often :func:`stop_task` repeats its cancel while the task runs on."""


async def stop_task(task: asyncio.Task[Any] | None, timeout_s: float = TASK_STOP_TIMEOUT_S) -> None:
    """Cancels an owned task and waits for it to end, never longer than ``timeout_s``.

    The cancel is repeated every ``RECANCEL_S`` until the task ends (level-triggered, as in Trio and
    anyio), because one cancel can be lost: on Python 3.11, ``asyncio.wait_for``, which redis-py wraps
    around each socket write, returns the result instead of raising when the cancel lands as the call it
    waits for completes (CPython gh-86296), and a loop over Redis calls then runs on. A lost cancel left
    the router waiting for its node-registry refresher forever at one stop in 130 benchmark runs. The
    task's own cleanup gets ``RECANCEL_S`` before the next cancel interrupts it.
    """
    if task is None or task.done():
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.warning("task_did_not_stop", task=task.get_name(), timeout_s=timeout_s)
            return
        task.cancel()
        await asyncio.wait({task}, timeout=min(RECANCEL_S, remaining))
    if not task.cancelled() and task.exception() is not None:
        log.warning("task_failed_on_stop", task=task.get_name(), error=repr(task.exception()))


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


class Front(Protocol):
    """A protocol factory in front of aiohttp's: each connection starts on it and may be handed over."""

    def __call__(self) -> asyncio.BaseProtocol: ...

    async def close(self, timeout_s: float) -> None:
        """Lets requests in progress finish (bounded), then closes the connections it still holds."""
        ...


FrontFactory = Callable[[Callable[[], asyncio.BaseProtocol]], Front]
"""Builds a :class:`Front` around aiohttp's protocol factory (its fallback)."""


class _FrontedSite(web.TCPSite):
    """aiohttp's TCP site, except that connections start on a :class:`Front`."""

    __slots__ = ("_close_timeout_s", "_front", "_make_front")

    def __init__(self, runner: web.AppRunner, host: str, port: int, make_front: FrontFactory, timeout_s: float):
        super().__init__(runner, host, port)
        self._make_front = make_front
        self._front: Front | None = None
        self._close_timeout_s = timeout_s

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        fallback = self._runner.server
        assert fallback is not None  # the runner is set up before any site exists
        self._front = self._make_front(fallback)
        self._server = await asyncio.get_running_loop().create_server(
            self._front, self._host, self._port, backlog=self._backlog, reuse_address=self._reuse_address
        )

    async def stop(self) -> None:
        await super().stop()
        if self._front is not None:
            await self._front.close(self._close_timeout_s)


KEEPALIVE_TIMEOUT_S: Final = 75.0
"""What ``web.run_app`` gives aiohttp's connections (a bare ``AppRunner`` would keep them an hour)."""


def serve(
    service: str,
    app: web.Application,
    cfg: CommonConfig,
    *,
    shutdown_timeout_s: float,
    front: FrontFactory | None = None,
) -> int:
    """Runs a service's app until SIGTERM/SIGINT on the configured loop; the process exit code.

    The sequence is ``web.run_app``'s, written out so that connections can start on ``front`` (the
    router's fast path) instead of on aiohttp's protocol.
    """
    try:
        loop = new_event_loop(cfg.event_loop)
    except ConfigError as e:
        print(f"beeline {service}: {e}", file=sys.stderr)
        return 2
    tune_gc()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_run(app, cfg, front, shutdown_timeout_s))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        watchdog = StopWatchdog(service, loop, shutdown_timeout_s + STOP_GRACE_S)
        if not main.done():
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(main)
        # Whatever the app's own stop left running (aiohttp's handler tasks, a task nobody owned).
        pending = asyncio.all_tasks(loop)
        loop.run_until_complete(asyncio.gather(*(stop_task(task) for task in pending)))
        loop.run_until_complete(loop.shutdown_asyncgens())
        watchdog.disarm()
        loop.close()
        asyncio.set_event_loop(None)
    return 0


class StopWatchdog:
    """Bounds a service's stop: past ``limit_s`` it logs each task still pending with the chain of
    awaits it is stuck in (``stop_overran``), and a second later the process exits with status 1.

    Each step of the stop has its own timeout; this is for a step that ignores it (a task that does not
    end when cancelled, an await with no deadline), which would otherwise hang until an orchestrator's
    SIGKILL and leave nothing to say which step it was. The exit comes from faulthandler's timer thread,
    so it also fires when the event loop itself is blocked; it dumps every thread's stack to stderr first.
    """

    def __init__(self, service: str, loop: asyncio.AbstractEventLoop, limit_s: float) -> None:
        self._service = service
        self._loop = loop
        self._timer = loop.call_later(limit_s, self._report)
        faulthandler.dump_traceback_later(limit_s + 1.0, exit=True)

    def _report(self) -> None:
        pending = [task for task in asyncio.all_tasks(self._loop) if not task.done()]
        log.error(
            "stop_overran",
            service=self._service,
            pending=[f"{task.get_name()}: {' -> '.join(await_chain(task.get_coro()))}" for task in pending],
        )

    def disarm(self) -> None:
        self._timer.cancel()
        faulthandler.cancel_dump_traceback_later()


def await_chain(coro: object) -> list[str]:
    """Where a suspended coroutine waits: each coroutine (or async generator) in its chain of awaits,
    outermost first."""
    chain = []
    while coro is not None:
        frame = _frame(coro)
        if frame is None:
            break
        chain.append(f"{frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})")
        awaited = (
            getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None) or getattr(coro, "ag_await", None)
        )
        if awaited is not None and _frame(awaited) is None:
            # An async generator's ``asend`` hides its generator; contextlib's async context managers
            # (aiohttp's cleanup_ctx, every service lifecycle) await one, and keep it as ``self.gen``.
            generator = getattr(frame.f_locals.get("self"), "gen", None)
            awaited = generator if generator is not None and _frame(generator) is not None else awaited
        coro = awaited
    return chain


def _frame(awaitable: Any) -> Any:
    for name in ("cr_frame", "gi_frame", "ag_frame"):
        frame = getattr(awaitable, name, None)
        if frame is not None:
            return frame
    return None


async def _run(app: web.Application, cfg: CommonConfig, front: FrontFactory | None, shutdown_timeout_s: float) -> None:
    # With a front, on stop its requests and then aiohttp's may each take half of the shutdown timeout,
    # so the whole stop stays within it.
    share = shutdown_timeout_s if front is None else shutdown_timeout_s / 2
    runner = web.AppRunner(
        app, access_log=None, handle_signals=True, shutdown_timeout=share, keepalive_timeout=KEEPALIVE_TIMEOUT_S
    )
    await runner.setup()
    try:
        site = (
            web.TCPSite(runner, cfg.host, cfg.port)
            if front is None
            else _FrontedSite(runner, cfg.host, cfg.port, front, share)
        )
        await site.start()
        await asyncio.Event().wait()  # until a signal raises GracefulExit
    finally:
        await runner.cleanup()
