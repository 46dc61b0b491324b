"""The send path's coalescing connection against a real redis-server: order, errors, scripts,
coalescing, and the failure contract (lost connection, stalled server, restart)."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import signal
from functools import partial
from typing import Any

import pytest
from redis import exceptions as redis_exceptions

from shared.autopipeline import AutoPipeline
from shared.errors import StoreUnavailable
from shared.redis import store_errors
from tests.support import RedisServer, eventually

SCRIPT = "return {KEYS[1], ARGV[1]}"
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()


def pipeline(server: RedisServer, timeout_s: float = 2.0) -> AutoPipeline:
    return AutoPipeline(server.url, timeout_s=timeout_s, connect_timeout_s=1.0)


async def stat(server: RedisServer, section: str) -> dict[str, Any]:
    probe = pipeline(server)
    try:
        raw: bytes = await probe.execute("INFO", section)
    finally:
        await probe.aclose()
    lines = raw.decode().splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line and not line.startswith("#"))


async def blocked(server: RedisServer) -> int:
    """How many clients wait in a blocking command."""
    return int((await stat(server, "clients"))["blocked_clients"])


async def one_blocked(server: RedisServer) -> bool:
    """One client waits in a blocking command (the BLPOP a test holds the connection with)."""
    return await blocked(server) == 1


async def none_blocked(server: RedisServer) -> bool:
    return await blocked(server) == 0


async def test_concurrent_commands_keep_their_order_and_share_a_write(own_redis: RedisServer) -> None:
    """500 concurrent INCRs each get their own reply (1..500 in issue order), and the server reads
    them in a handful of batches, not 500 (the coalescing the send path relies on)."""
    fast = pipeline(own_redis)
    try:
        await fast.execute("PING")  # connected before the measurement
        before = int((await stat(own_redis, "stats"))["total_reads_processed"])
        replies = await asyncio.gather(*(fast.execute("INCR", "counter") for _ in range(500)))
        after = int((await stat(own_redis, "stats"))["total_reads_processed"])
        assert replies == list(range(1, 501))
        # The probe connection's own INFO costs a few reads; 500 separate writes would cost ~500.
        assert after - before < 20
    finally:
        await fast.aclose()


async def test_error_replies_raise_after_every_reply_arrived(own_redis: RedisServer) -> None:
    fast = pipeline(own_redis)
    try:
        with pytest.raises(redis_exceptions.ResponseError):
            await fast.execute_many([("SET", "k", "text"), ("INCR", "k"), ("SET", "after", 1)])
        # The command after the failing one still ran: a batch is not a transaction.
        assert await fast.execute("GET", "after") == b"1"
        assert await fast.execute("GET", "missing") is None
    finally:
        await fast.aclose()


async def command_calls(server: RedisServer, *commands: str) -> tuple[int, ...]:
    """How many times the server has run each command."""
    stats = await stat(server, "commandstats")

    def calls(command: str) -> int:
        fields = dict(f.split("=", 1) for f in stats.get(f"cmdstat_{command}", "calls=0").split(","))
        return int(fields["calls"])

    return tuple(calls(c) for c in commands)


async def script_calls(server: RedisServer) -> tuple[int, int]:
    """``(EVAL calls, EVALSHA calls)`` the server has run."""
    evals, evalshas = await command_calls(server, "eval", "evalsha")
    return evals, evalshas


async def test_scripts_load_themselves_after_a_flush(own_redis: RedisServer) -> None:
    """A restarted Redis has no scripts: NOSCRIPT is answered by EVAL once, then EVALSHA works (and
    is what runs: EVAL is not sent again)."""
    fast = pipeline(own_redis)
    try:
        calls = [(["a"], [1]), (["b"], [2])]
        assert await fast.evalsha(SHA, SCRIPT, calls) == [[b"a", b"1"], [b"b", b"2"]]
        assert await fast.execute("SCRIPT", "EXISTS", SHA) == [1]
        await fast.execute("SCRIPT", "FLUSH")
        evals, evalshas = await script_calls(own_redis)
        assert await fast.evalsha(SHA, SCRIPT, calls) == [[b"a", b"1"], [b"b", b"2"]]
        assert await script_calls(own_redis) == (evals + 2, evalshas + 2)  # both refused, both re-run by EVAL
        assert await fast.evalsha(SHA, SCRIPT, calls) == [[b"a", b"1"], [b"b", b"2"]]
        assert await script_calls(own_redis) == (evals + 2, evalshas + 4)  # cached again: EVALSHA only
    finally:
        await fast.aclose()


async def test_a_lost_connection_fails_fast_and_the_next_command_reconnects(own_redis: RedisServer) -> None:
    """Commands in flight when Redis dies fail at once (reported once, to their caller), commands while
    it is down are refused at connect (no hang), and the first command after a restart reconnects."""
    fast = pipeline(own_redis, timeout_s=10.0)
    unhandled: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        await fast.execute("SET", "k", "v")

        async def in_flight_commands_fail() -> bool:
            try:
                await fast.execute_many([("BLPOP", "never", 5), ("GET", "k"), ("GET", "k")])
            except redis_exceptions.ConnectionError:
                return True
            return False

        attempt = asyncio.ensure_future(in_flight_commands_fail())

        await eventually(partial(one_blocked, own_redis), timeout=5, what="the BLPOP to be in flight")
        own_redis.stop()
        assert await asyncio.wait_for(attempt, timeout=5)
        gc.collect()
        assert unhandled == [], "a lost connection is reported once, to its caller"
        with pytest.raises(StoreUnavailable), store_errors():  # refused at connect while Redis is down: no hang
            await fast.execute("GET", "k")
        own_redis.start()  # same port, empty dataset

        async def works() -> bool:
            try:
                return await fast.execute("GET", "k") is None
            except redis_exceptions.ConnectionError:
                return False

        await eventually(works, timeout=10, what="reconnected to the restarted redis")
    finally:
        await fast.aclose()


async def test_a_stalled_server_times_out_every_command_in_flight(own_redis: RedisServer) -> None:
    """SIGSTOP the server: the commands in flight fail with TimeoutError after the command timeout
    (never a hang), and after SIGCONT a new connection works."""
    fast = pipeline(own_redis, timeout_s=0.5)
    assert own_redis.proc is not None
    try:
        await fast.execute("PING")
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(fast.execute("PING") for _ in range(10)), return_exceptions=True), timeout=10
            )
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        assert all(isinstance(r, redis_exceptions.TimeoutError) for r in results), results
        assert await fast.execute("PING") == b"PONG"
    finally:
        await fast.aclose()


async def test_a_cancelled_caller_does_not_shift_the_replies_of_others(own_redis: RedisServer) -> None:
    """A caller cancelled while its command is in flight keeps its slot in the reply order: the
    commands after it still get their own replies."""
    fast = pipeline(own_redis, timeout_s=10.0)
    try:
        await fast.execute_many([("SET", "a", "A"), ("SET", "b", "B")])
        # One batch: a BLPOP that holds the connection, then two GETs queued behind it.
        blocker = asyncio.ensure_future(fast.execute("BLPOP", "q", 5))
        doomed = asyncio.ensure_future(fast.execute("GET", "a"))
        kept = asyncio.ensure_future(fast.execute("GET", "b"))

        await eventually(partial(one_blocked, own_redis), timeout=5, what="the batch written, the BLPOP blocked")
        doomed.cancel()
        with own_redis.client() as other:
            other.rpush("q", "go")
        assert await asyncio.wait_for(blocker, timeout=5) == [b"q", b"go"]
        assert await asyncio.wait_for(kept, timeout=5) == b"B"
        assert doomed.cancelled()
        assert await fast.execute("GET", "a") == b"A"
    finally:
        await fast.aclose()


async def test_password_and_database_from_the_url() -> None:
    """AUTH and SELECT from the URL run first on every new connection; a wrong password is a clear
    error, not a hang."""
    server = RedisServer(password="s3cret").start()
    try:
        fast = AutoPipeline(f"redis://:s3cret@127.0.0.1:{server.port}/3", timeout_s=2.0, connect_timeout_s=1.0)
        try:
            info: bytes = await fast.execute("CLIENT", "INFO")
            assert b" db=3 " in info
        finally:
            await fast.aclose()
        wrong = AutoPipeline(f"redis://:nope@127.0.0.1:{server.port}/0", timeout_s=2.0, connect_timeout_s=1.0)
        try:
            with pytest.raises(StoreUnavailable) as refused, store_errors():
                await wrong.execute("PING")
            assert "nope" not in str(refused.value), "the password never appears in an error"
        finally:
            await wrong.aclose()
    finally:
        server.cleanup()


async def test_a_repeated_command_hands_over_each_reply_and_runs_again(own_redis: RedisServer) -> None:
    """``repeat`` (the gateway's stream read): every reply reaches the handler in order, including the
    BLOCK's timeout (nil), and the command is written again once per reply, not more."""
    fast, feeder = pipeline(own_redis), pipeline(own_redis)
    replies: list[Any] = []
    reading = asyncio.ensure_future(fast.repeat(("BLPOP", "q", 1), replies.append))
    try:
        await eventually(partial(one_blocked, own_redis), timeout=5, what="the first BLPOP")
        for round_ in range(3):
            await feeder.execute("RPUSH", "q", *(f"{round_}-{i}" for i in range(50)))
        expected = [[b"q", f"{r}-{i}".encode()] for r in range(3) for i in range(50)]
        await eventually(lambda: len(replies) >= 150, timeout=5, what="150 replies")
        assert replies[:150] == expected
        await eventually(lambda: None in replies, timeout=5, what="the BLOCK to time out once")
        await eventually(partial(one_blocked, own_redis), timeout=5, what="the read after the timeout")
        [calls] = await command_calls(own_redis, "blpop")
        assert calls == len(replies) + 1  # one in flight: written again once per reply
        assert not reading.done()
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await feeder.aclose()
        await fast.aclose()


async def test_a_repeated_command_ends_at_an_error_reply_a_lost_connection_or_a_failing_handler(
    own_redis: RedisServer,
) -> None:
    fast = pipeline(own_redis, timeout_s=10.0)
    try:
        await fast.execute("SET", "text", "v")
        with pytest.raises(redis_exceptions.ResponseError):
            await asyncio.wait_for(fast.repeat(("BLPOP", "text", 1), lambda _reply: None), timeout=5)
        assert await command_calls(own_redis, "blpop") == (1,)  # not written again after the error

        def broken(_reply: Any) -> None:
            raise KeyError("bug")

        await fast.execute("RPUSH", "q", "a", "b")
        with pytest.raises(KeyError):
            await asyncio.wait_for(fast.repeat(("LPOP", "q"), broken), timeout=5)
        # Nothing is written after a reply the handler failed on: a consuming read in flight would
        # take entries that nobody handles (LLEN on the same connection, so after any such read).
        assert await fast.execute("LLEN", "q") == 1
        assert await command_calls(own_redis, "lpop") == (1,)

        reading = asyncio.ensure_future(fast.repeat(("BLPOP", "never", 5), lambda _reply: None))
        await eventually(partial(one_blocked, own_redis), timeout=5, what="the BLPOP to be in flight")
        own_redis.stop()
        with pytest.raises(redis_exceptions.ConnectionError):
            await asyncio.wait_for(reading, timeout=5)
    finally:
        await fast.aclose()


@pytest.mark.parametrize("depth", [1, 3])
async def test_a_cancelled_repeat_writes_nothing_more_and_leaves_no_read_to_consume(
    own_redis: RedisServer, depth: int
) -> None:
    """Cancelled with reads in flight (one blocked in Redis, the rest queued behind it), the repeat
    closes its connection: Redis drops them, so what arrives later stays for the next reader."""
    fast, feeder = pipeline(own_redis, timeout_s=30.0), pipeline(own_redis)
    replies: list[Any] = []
    # BLOCK 0: the read in flight never times out by itself while the test waits for it to go.
    reading = asyncio.ensure_future(fast.repeat(("BLPOP", "q", 0), replies.append, depth=depth))
    try:
        await eventually(partial(one_blocked, own_redis), timeout=5, what="the BLPOP to be in flight")
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await eventually(partial(none_blocked, own_redis), timeout=5, what="the BLPOP in flight to be dropped")
        await feeder.execute("RPUSH", "q", "late")
        assert await feeder.execute("LLEN", "q") == 1
        assert replies == []
        assert await command_calls(own_redis, "blpop") == (1,)  # the queued copies never ran
        assert await fast.execute("PING") == b"PONG"  # the next command reconnects
    finally:
        await feeder.aclose()
        await fast.aclose()


async def test_a_deep_repeat_keeps_a_read_waiting_and_writes_the_next_ones_in_batches(own_redis: RedisServer) -> None:
    """With ``depth`` 3 (the gateway's stream read) every reply still reaches the handler in order and
    Redis runs one read at a time, but the connection writes half as often as with one read in flight:
    two reads every second reply instead of one after each."""
    pushes = 20

    async def reads_processed() -> int:
        return int((await stat(own_redis, "stats"))["total_reads_processed"])

    async def feed_one_by_one(depth: int) -> int:
        """Redis's read events while ``pushes`` items are fed one at a time to a repeat of ``depth``."""
        fast, feeder = pipeline(own_redis, timeout_s=2.0 + 5 * depth), pipeline(own_redis)
        replies: list[Any] = []
        reading = asyncio.ensure_future(fast.repeat(("BLPOP", "q", 5), replies.append, depth=depth))
        try:
            await feeder.execute("PING")
            await eventually(partial(one_blocked, own_redis), timeout=5, what="the first BLPOP")
            before = await reads_processed()
            for i in range(pushes):
                await feeder.execute("RPUSH", "q", i)
                await eventually(lambda i=i: len(replies) > i, timeout=5, what=f"reply {i}")
            after = await reads_processed()
            assert replies == [[b"q", str(i).encode()] for i in range(pushes)]
            await eventually(partial(one_blocked, own_redis), timeout=5, what="the next BLPOP")
            return after - before
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            await feeder.aclose()
            await fast.aclose()

    one_in_flight = await feed_one_by_one(1)
    calls_before = await command_calls(own_redis, "blpop")
    three_in_flight = await feed_one_by_one(3)
    # Redis ran one read per reply plus the one waiting: the queued copies do not run ahead.
    assert await command_calls(own_redis, "blpop") == (calls_before[0] + pushes + 1,)
    # The same pushes and INFO probes in both runs; the repeat's own writes halve.
    assert one_in_flight - three_in_flight == pushes // 2


async def test_a_connect_cancelled_before_its_setup_answered_closes_its_socket(own_redis: RedisServer) -> None:
    """A caller cancelled while the connection's SELECT is unanswered (the server stalled) leaves no
    socket behind: once the server runs again it sees only the connections in use."""
    assert own_redis.proc is not None
    probe = pipeline(own_redis)
    db_1 = own_redis.url.rsplit("/", 1)[0] + "/1"  # a SELECT on connect
    fast = AutoPipeline(db_1, timeout_s=30.0, connect_timeout_s=5.0)
    try:
        await probe.execute("PING")
        os.kill(own_redis.proc.pid, signal.SIGSTOP)  # the kernel still accepts the TCP connection
        try:
            attempt = asyncio.ensure_future(fast.execute("PING"))
            await eventually(
                lambda: unread_by_server(own_redis.port) == 1, timeout=5, what="the SELECT to reach the server"
            )
            assert not attempt.done(), "the stalled server cannot have answered"
            attempt.cancel()
            await asyncio.gather(attempt, return_exceptions=True)
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)

        async def only_the_probe_connected() -> bool:
            return int((await stat(own_redis, "clients"))["connected_clients"]) == 2  # probe + stat's own

        await eventually(only_the_probe_connected, timeout=5, what="the abandoned socket to be closed")
        assert await fast.execute("PING") == b"PONG"  # and the next command connects afresh
    finally:
        await fast.aclose()
        await probe.aclose()


def unread_by_server(port: int) -> int:
    """Connections to ``port`` whose server side holds bytes it has not read (/proc/net/tcp: an
    ESTABLISHED socket bound to the port with a non-empty receive queue)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                rx_queue = int(fields[4].split(":")[1], 16)
                if local_port == port and fields[3] == "01" and rx_queue > 0:
                    count += 1
    return count
