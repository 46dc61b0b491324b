"""A service's stop is bounded even when one of its steps is not: ``serve`` reports the tasks still
pending, with the chain of awaits each is stuck in, and exits with status 1 instead of waiting for an
orchestrator's SIGKILL (run in a real process, on a free loopback port, stopped with SIGTERM as
Kubernetes would); and ``stop_task``, with which both services stop the tasks they own, ends a task
whose first cancel is lost and gives up on one that never ends."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from shared.runtime import STOP_GRACE_S, await_chain, new_event_loop, stop_task
from tests.support import free_port, http_ok, wait_until

SHUTDOWN_TIMEOUT_S = 1.0

SERVICE = textwrap.dedent(
    """
    import asyncio, sys
    from aiohttp import web
    from shared.config import RouterConfig
    from shared.logs import configure_logging
    from shared.runtime import serve

    async def never_done():
        await asyncio.Event().wait()

    async def stuck_cleanup(app):
        yield
        if sys.argv[2] == "stuck":
            await never_done()  # a cleanup step with no deadline of its own

    async def ready(request):
        return web.Response(text="ok")

    configure_logging("info", "json", service="probe")
    app = web.Application()
    app.router.add_get("/readyz", ready)
    app.cleanup_ctx.append(stuck_cleanup)
    cfg = RouterConfig(host="127.0.0.1", port=int(sys.argv[1]))
    sys.exit(serve("probe", app, cfg, shutdown_timeout_s=float(sys.argv[3])))
    """
)


def start_service(tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    script = tmp_path / "service.py"
    script.write_text(SERVICE)
    port = free_port()
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port), mode, str(SHUTDOWN_TIMEOUT_S)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ready = f"http://127.0.0.1:{port}/readyz"
    wait_until(lambda: http_ok(ready) or proc.poll() is not None, timeout=20, what="the service answers")
    assert proc.poll() is None, proc.communicate()[0]
    return proc


def stop(proc: subprocess.Popen[str]) -> tuple[int, str, float]:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=SHUTDOWN_TIMEOUT_S + STOP_GRACE_S + 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, output, time.monotonic() - started


def test_a_clean_stop_exits_zero_and_reports_nothing(tmp_path: Path) -> None:
    proc = start_service(tmp_path, "clean")
    code, output, _took = stop(proc)
    assert code == 0, output
    assert "stop_overran" not in output


def test_a_stuck_stop_reports_where_it_is_stuck_and_exits(tmp_path: Path) -> None:
    proc = start_service(tmp_path, "stuck")
    code, output, took = stop(proc)
    assert code == 1, output
    # Not before the shutdown timeout and the grace after it; well before a SIGKILL would have come.
    assert took >= SHUTDOWN_TIMEOUT_S + STOP_GRACE_S, (took, output)
    [line] = [line for line in output.splitlines() if "stop_overran" in line]
    assert '"service": "probe"' in line or '"service":"probe"' in line, line
    # The pending task's chain of awaits names the step that hung, down to the innermost coroutine.
    assert "stuck_cleanup" in line and "never_done" in line, line
    assert "Thread" in output  # faulthandler's dump of every thread, before the exit


def test_await_chain_walks_from_the_task_to_the_innermost_await() -> None:
    async def inner(event: asyncio.Event) -> None:
        await event.wait()

    async def outer(event: asyncio.Event) -> None:
        await inner(event)

    async def main() -> list[str]:
        event = asyncio.Event()
        task = asyncio.create_task(outer(event))
        await asyncio.sleep(0)
        chain = await_chain(task.get_coro())
        event.set()
        await task
        return chain

    chain = asyncio.run(main())
    assert [c.split(" ")[0] for c in chain] == ["outer", "inner", "wait"]
    assert await_chain(None) == []


# -- stop_task: an owned task ends even when a cancel is lost ------------------------------------------


async def _loop_over_wait_for(calls: asyncio.Queue[asyncio.Future[None]]) -> None:
    # A background loop over Redis calls, as the router's node-registry refresher is: redis-py wraps
    # each socket write in wait_for. Each "call" is a future the test completes.
    loop = asyncio.get_running_loop()
    while True:
        call: asyncio.Future[None] = loop.create_future()
        calls.put_nowait(call)
        await asyncio.wait_for(call, 5)
        await asyncio.sleep(0.01)


async def _cancel_as_a_call_completes(
    stop: Callable[[asyncio.Task[None]], Awaitable[None]],
) -> tuple[asyncio.Task[None], asyncio.Queue[asyncio.Future[None]]]:
    """Starts the loop, completes its call and cancels it in the same loop turn: the race that makes
    Python 3.11's wait_for return the call's result instead of raising (CPython gh-86296)."""
    calls: asyncio.Queue[asyncio.Future[None]] = asyncio.Queue()
    task = asyncio.create_task(_loop_over_wait_for(calls), name="refresher")
    call = await calls.get()
    await asyncio.sleep(0)  # the task now waits inside wait_for
    call.set_result(None)
    await stop(task)
    return task, calls


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for keeps a cancel from Python 3.12 on")
def test_a_single_cancel_is_lost_when_it_lands_as_the_call_completes() -> None:
    async def cancel_once(task: asyncio.Task[None]) -> None:
        task.cancel()

    async def main() -> bool:
        task, calls = await _cancel_as_a_call_completes(cancel_once)
        # It survived the cancel: it went on to its next call.
        await asyncio.wait_for(calls.get(), timeout=5)
        survived = not task.done()
        await stop_task(task)
        return survived

    assert asyncio.run(main()), "the premise of stop_task's repeated cancel no longer holds"


def test_stop_task_ends_a_loop_whose_first_cancel_is_lost() -> None:
    async def main() -> asyncio.Task[None]:
        task, _calls = await _cancel_as_a_call_completes(stop_task)
        return task

    for make_loop in (asyncio.new_event_loop, lambda: new_event_loop("auto")):
        loop = make_loop()
        try:
            task = loop.run_until_complete(main())
        finally:
            loop.close()
        assert task.done() and task.cancelled()


async def test_cancelling_a_task_stuck_in_its_cleanup_is_bounded() -> None:
    """A task whose cleanup waits on something that never comes (as a client library's close racing a
    read can) must not hold the stop: ``stop_task`` gives up after its bound and leaves it behind."""
    never = asyncio.Event()
    started = asyncio.Event()

    async def body() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.shield(never.wait())

    task = asyncio.create_task(body())
    await started.wait()  # a task cancelled before it starts has no cleanup to run
    await asyncio.wait_for(stop_task(task, timeout_s=0.2), timeout=5)
    assert not task.done(), "the stuck task was left behind, not awaited forever"
    never.set()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_stop_task_gives_up_on_a_task_that_ignores_cancel_and_lets_a_cleanup_finish() -> None:
    async def main() -> None:
        release = asyncio.Event()
        cleaned = asyncio.Event()

        async def stubborn() -> None:
            while not release.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(1)

        async def tidy() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                await asyncio.sleep(0.05)  # a short cleanup after the cancel: within RECANCEL_S
                cleaned.set()

        loop = asyncio.get_running_loop()
        task = asyncio.create_task(stubborn(), name="stubborn")
        await asyncio.sleep(0)  # running, inside its loop
        started = loop.time()
        await asyncio.wait_for(stop_task(task, timeout_s=0.5), timeout=10)
        assert not task.done()  # bounded: it returned although the task runs on
        assert loop.time() - started >= 0.5  # after trying for its whole timeout
        release.set()
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        assert task.done()

        tidy_task = asyncio.create_task(tidy())
        await asyncio.sleep(0)
        await stop_task(tidy_task, timeout_s=2.0)
        assert cleaned.is_set() and tidy_task.cancelled()

    asyncio.run(main())
