"""A service's stop is bounded even when one of its steps is not: ``serve`` reports the tasks still
pending, with the chain of awaits each is stuck in, and exits with status 1 instead of waiting for an
orchestrator's SIGKILL. Runs ``serve`` in a real process, on a free loopback port, and stops it with
SIGTERM as Kubernetes would."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

from shared.runtime import STOP_GRACE_S, await_chain
from tests.support import free_port, wait_until

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
    sys.exit(serve("probe", app, cfg, shutdown_timeout_s=SHUTDOWN_TIMEOUT_S))
    """
).replace("SHUTDOWN_TIMEOUT_S", repr(SHUTDOWN_TIMEOUT_S))


def start_service(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], int]:
    script = tmp_path / "service.py"
    script.write_text(SERVICE)
    port = free_port()
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port), mode],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    wait_until(lambda: answers() or proc.poll() is not None, timeout=20, what="the service answers")
    assert proc.poll() is None, proc.communicate()[0]
    return proc, port


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
    proc, _port = start_service(tmp_path, "clean")
    code, output, _took = stop(proc)
    assert code == 0, output
    assert "stop_overran" not in output


def test_a_stuck_stop_reports_where_it_is_stuck_and_exits(tmp_path: Path) -> None:
    proc, _port = start_service(tmp_path, "stuck")
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
