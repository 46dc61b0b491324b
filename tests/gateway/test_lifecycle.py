"""How the services stop the tasks they own (``shared.runtime.stop_task``): bounded, whatever a task does
in its cleanup."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from shared.runtime import stop_task


async def started_task(cleanup: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
    """A task waiting inside its ``try`` (a task cancelled before it starts has no cleanup to run),
    whose ``finally`` awaits ``cleanup``."""
    started = asyncio.Event()

    async def body() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            await cleanup()

    task = asyncio.create_task(body())
    await started.wait()
    return task


async def test_cancelling_a_task_stuck_in_its_cleanup_is_bounded() -> None:
    """A task whose cleanup waits on something that never comes (as a client library's close racing a
    read can) must not hold the stop: ``stop_task`` gives up after its bound and leaves it behind."""
    never = asyncio.Event()

    async def wait_for_never() -> None:
        await asyncio.shield(never.wait())

    task = await started_task(wait_for_never)
    await asyncio.wait_for(stop_task(task, timeout_s=0.2), timeout=5)
    assert not task.done(), "the stuck task was left behind, not awaited forever"
    never.set()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancelling_a_well_behaved_task_waits_for_it() -> None:
    """A task whose cleanup finishes is cancelled and awaited to the end of that cleanup."""
    cleaned = asyncio.Event()

    async def clean() -> None:
        cleaned.set()

    task = await started_task(clean)
    await stop_task(task)
    assert task.cancelled() and cleaned.is_set()
