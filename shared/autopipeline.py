"""The hot-path Redis connection: every command issued in one event-loop turn goes out as one write.

Each send costs two dependent round trips (the mailbox script, then the node-stream XADDs). Through
redis-py each is a pool checkout, a pipeline object and a write/read pair of its own, which was the
largest share of the router's own CPU in the profile. :class:`AutoPipeline` keeps one connection and
queues every command it is given; a callback scheduled for the end of the current loop turn writes the
whole queue at once, and replies come back in order, so a hundred concurrent sends share a handful of
syscalls and Redis parses one batch (the coalescing behind ``docs/benchmarks.md``'s rates).

Used for standalone Redis only (a cluster routes per slot; there redis-py's cluster client stays). The
failure contract matches the command client's: no retries (a mailbox append is not idempotent), a
command that gets no reply within the command timeout aborts the connection and fails every command in
flight with ``TimeoutError``, a lost connection fails them with ``ConnectionError`` (both become
:class:`~shared.errors.StoreUnavailable`), and the next command reconnects.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import hiredis
from redis import exceptions as redis_exceptions
from redis.asyncio.connection import parse_url

Command = Sequence[bytes | str | int | float | memoryview]

# Error replies that mean "not usable right now": raised as the redis-py classes that callers already
# translate into StoreUnavailable.
_UNAVAILABLE_PREFIXES: dict[str, type[redis_exceptions.RedisError]] = {
    "LOADING": redis_exceptions.BusyLoadingError,
    "READONLY": redis_exceptions.ReadOnlyError,
    "MASTERDOWN": redis_exceptions.MasterDownError,
    "TRYAGAIN": redis_exceptions.TryAgainError,
    "CLUSTERDOWN": redis_exceptions.ClusterDownError,
}


def _error(reply: hiredis.ReplyError) -> redis_exceptions.RedisError:
    message = str(reply)
    prefix = message.split(" ", 1)[0]
    return _UNAVAILABLE_PREFIXES.get(prefix, redis_exceptions.ResponseError)(message)


class _Waiter(Protocol):
    """What waits for one reply: a future, or a repeated command (:class:`_Repeat`)."""

    def done(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...

    def exception(self) -> BaseException | None: ...


class _RespProtocol(asyncio.Protocol):
    """One connection: replies are matched to waiters in the order the commands were written."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Kept: asyncio.get_running_loop() costs a getpid() syscall per call on Python 3.11.
        self.loop = loop
        self.reader = hiredis.Reader()
        self.waiters: deque[_Waiter] = deque()
        self.transport: asyncio.Transport | None = None
        self.answered = 0
        self.closed = False
        self.queue: list[bytes] = []  # packed commands of this loop turn, written by the next flush
        self.flush_scheduled = False
        # (written at, replies expected by then) per flush still waiting for replies, oldest first.
        self.in_flight: deque[tuple[float, int]] = deque()
        self.watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiters = self.waiters
        while (reply := self.reader.gets()) is not False:
            self.answered += 1
            waiter = waiters.popleft()
            if not waiter.done():  # a caller that was cancelled still owns its slot in the reply order
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(redis_exceptions.ConnectionError(f"connection to redis lost: {exc or 'closed by server'}"))

    def fail(self, error: Exception) -> None:
        self.closed = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
                # A caller awaiting several replies stops at the first failure; mark the rest as seen so
                # a lost connection is not also logged once per command as "exception never retrieved".
                waiter.exception()

    def abort(self, error: Exception) -> None:
        self.fail(error)
        if self.watchdog is not None:
            self.watchdog.cancel()
        if self.transport is not None:
            self.transport.abort()


class _Repeat:
    """The waiter of a repeated command: each reply is handed to ``on_reply`` and the command is then
    written again, from the protocol's callback, with no future or task wake-up per reply.

    ``depth`` copies are written at the start, and once half of them or fewer are left in flight the
    rest are written again in one write: with ``depth`` 3 a blocking read is always waiting in Redis and
    the next ones go out every second reply, not after each one.

    ``ended`` completes with the first error reply or connection failure (or is cancelled by the
    caller); from then on a reply that still arrives is dropped and nothing more is written.
    """

    __slots__ = ("depth", "ended", "in_flight", "on_reply", "packed", "pipeline", "protocol")

    def __init__(
        self,
        pipeline: AutoPipeline,
        protocol: _RespProtocol,
        packed: bytes,
        on_reply: Callable[[Any], None],
        depth: int,
    ) -> None:
        self.pipeline = pipeline
        self.protocol = protocol
        self.packed = packed
        self.on_reply = on_reply
        self.depth = depth
        self.in_flight = 0
        self.ended: asyncio.Future[None] = protocol.loop.create_future()

    def refill(self) -> None:
        """Writes the copies that bring the commands in flight back to ``depth``."""
        missing = self.depth - self.in_flight
        self.in_flight = self.depth
        self.pipeline._write_now(self.protocol, self.packed * missing, self, missing)

    # The waiter interface of _RespProtocol (that of a future).
    def done(self) -> bool:
        return self.ended.done()

    def set_result(self, reply: Any) -> None:
        self.in_flight -= 1
        if isinstance(reply, hiredis.ReplyError):
            self.ended.set_exception(_error(reply))
            return
        try:
            self.on_reply(reply)
        except Exception as e:  # a bug in the handler ends the repeat like a failed read would
            self.ended.set_exception(e)
            return
        # Written only once the reply was handled, so that a handler's failure ends the repeat before
        # more reads go out (what a read that consumes, XREADGROUP with NOACK, returns after the end is
        # dropped with it).
        if not self.ended.done() and self.in_flight <= self.depth // 2:
            self.refill()

    def set_exception(self, error: BaseException) -> None:
        if not self.ended.done():
            self.ended.set_exception(error)

    def exception(self) -> BaseException | None:
        return self.ended.exception() if self.ended.done() and not self.ended.cancelled() else None


class AutoPipeline:
    """A standalone Redis connection that coalesces the commands of one event-loop turn into one write.

    ``execute`` and ``execute_many`` return replies as values; error replies are raised as redis-py
    exceptions (``ResponseError``, or the unavailability classes). :meth:`evalsha` loads a script on
    ``NOSCRIPT`` (a restarted Redis) and runs it again, once.
    """

    def __init__(self, url: str, *, timeout_s: float, connect_timeout_s: float) -> None:
        options = parse_url(url)
        self._host: str = options.get("host", "127.0.0.1")
        self._port: int = int(options.get("port", 6379))
        self._unix_path: str | None = options.get("path")
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if url.startswith("rediss://") else None
        self._setup: list[Command] = []
        if options.get("password") is not None:
            username = options.get("username")
            self._setup.append(("AUTH", username, options["password"]) if username else ("AUTH", options["password"]))
        if int(options.get("db", 0) or 0):
            self._setup.append(("SELECT", int(options["db"])))
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._protocol: _RespProtocol | None = None
        self._connecting = asyncio.Lock()
        self._closed = False

    async def execute(self, *args: bytes | str | int | float) -> Any:
        """One command (a gateway's stream read is one per wake-up: no list of futures for it)."""
        [future] = self._send(self._open_protocol() or await self._connect(), [args])
        reply = await future
        if isinstance(reply, hiredis.ReplyError):
            raise _error(reply)
        return reply

    async def execute_many(self, commands: Sequence[Command]) -> list[Any]:
        """Sends the commands in order (in the current turn's batch); replies in the same order.

        Every reply is awaited before the first error reply, if any, is raised.
        """
        futures = self._send(self._open_protocol() or await self._connect(), commands)
        replies = [await f for f in futures]
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise _error(reply)
        return replies

    async def repeat(self, command: Command, on_reply: Callable[[Any], None], *, depth: int = 1) -> None:
        """Runs ``command`` again and again, each time its reply arrives, handing every reply to
        ``on_reply`` inside the connection's read callback; returns only by raising: the first error
        reply (as the redis-py exception), a lost or stuck connection, or cancellation.

        For a gateway's blocking stream read, one per delivery at low rates: the next read goes out in
        the same callback, so a delivery costs one loop wake-up and no future, task step or second
        loop iteration. With ``depth`` > 1, that many are kept in flight (Redis runs them one after
        the other) and written again in batches (see :class:`_Repeat`): fewer writes, and no gap
        between one read's reply and the next read. The connection's timeout must then cover
        ``depth`` blocking reads in a row. Use it on a connection of its own (its BLOCK holds the
        connection).

        When the repeat ends with commands still in flight (cancelled, an error reply with copies
        behind it), the connection is closed, so that Redis drops the ones it has not run yet instead
        of running them (a consuming read) for nobody. The next command reconnects.
        """
        if depth < 1:
            raise ValueError("depth must be >= 1")
        protocol = self._open_protocol() or await self._connect()
        # hiredis's stub types the argument as a 1-tuple; any tuple of these types is accepted.
        packed = hiredis.pack_command(tuple(command))  # type: ignore[arg-type]
        repeat = _Repeat(self, protocol, packed, on_reply, depth)
        repeat.refill()
        try:
            # Cancelling the caller cancels ``ended``: nothing more is written.
            await repeat.ended
        finally:
            if repeat.in_flight > 0 and not protocol.closed:
                protocol.abort(redis_exceptions.ConnectionError("a repeated command ended with copies in flight"))

    async def evalsha(
        self,
        sha: str,
        source: bytes | str | memoryview,
        calls: Sequence[tuple[Sequence[bytes | str], Sequence[bytes | str | int]]],
        *,
        each: bool = False,
    ) -> list[Any]:
        """Runs one script once per ``(keys, args)`` call; replies in order. An error reply is raised,
        or with ``each`` returned in its call's place (as the redis-py exception) so that the other
        calls' replies are not lost with it. A lost or stuck connection fails every call either way."""
        commands: list[Command] = [("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]
        futures = self._send(self._open_protocol() or await self._connect(), commands)
        replies = [await f for f in futures]
        errors = [i for i, r in enumerate(replies) if isinstance(r, hiredis.ReplyError)]
        if not errors:
            return replies
        missing = [i for i in errors if str(replies[i]).startswith("NOSCRIPT")]
        if missing:
            # EVAL runs the script and caches it under the same sha for the next EVALSHA.
            retry = [("EVAL", source, *commands[i][2:]) for i in missing]
            retried = self._send(self._open_protocol() or await self._connect(), retry)
            for index, future in zip(missing, retried, strict=True):
                replies[index] = await future
        if each:
            return [_error(r) if isinstance(r, hiredis.ReplyError) else r for r in replies]
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise _error(reply)
        return replies

    async def aclose(self) -> None:
        self._closed = True
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.abort(redis_exceptions.ConnectionError("client closed"))

    # -- internals -----------------------------------------------------------------------------------
    def _open_protocol(self) -> _RespProtocol | None:
        """The connection when it is open (checked without a coroutine: this is on every command)."""
        protocol = self._protocol
        return protocol if protocol is not None and not protocol.closed else None

    def _send(self, protocol: _RespProtocol, commands: Sequence[Command]) -> list[asyncio.Future[Any]]:
        loop = protocol.loop
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in commands]
        protocol.waiters.extend(futures)
        # hiredis's stub types the argument as a 1-tuple; any tuple of these types is accepted.
        protocol.queue.extend(hiredis.pack_command(tuple(c)) for c in commands)  # type: ignore[arg-type]
        if not protocol.flush_scheduled:
            protocol.flush_scheduled = True
            loop.call_soon(self._flush, protocol)
        return futures

    def _write_now(self, protocol: _RespProtocol, packed: bytes, waiter: _Repeat, commands: int) -> None:
        """Writes ``commands`` packed commands now, after whatever this turn queued before them
        (replies come in order), all answered to ``waiter``."""
        if protocol.closed:
            waiter.set_exception(redis_exceptions.ConnectionError("connection to redis lost"))
            return
        protocol.waiters.extend([waiter] * commands)
        protocol.queue.append(packed)
        self._flush(protocol)

    def _flush(self, protocol: _RespProtocol) -> None:
        protocol.flush_scheduled = False
        queue, protocol.queue = protocol.queue, []
        if not queue or protocol.closed or protocol.transport is None:
            return  # written already (by _write_now), or its waiters were failed when it closed
        protocol.transport.write(b"".join(queue))
        loop = protocol.loop
        protocol.in_flight.append((loop.time(), protocol.answered + len(protocol.waiters)))
        if protocol.watchdog is None:
            protocol.watchdog = loop.call_later(self._timeout_s, self._watch, protocol)

    def _watch(self, protocol: _RespProtocol) -> None:
        # One timer per connection, not per command or batch: if a batch written more than the command
        # timeout ago still lacks replies, the connection (or Redis) is stuck, so it is aborted like a
        # timed-out redis-py connection and every waiter fails at once.
        protocol.watchdog = None
        if protocol.closed:
            return
        in_flight = protocol.in_flight
        while in_flight and in_flight[0][1] <= protocol.answered:
            in_flight.popleft()
        if not in_flight:
            return
        loop = protocol.loop
        overdue = loop.time() - in_flight[0][0] - self._timeout_s
        if overdue >= 0:
            protocol.abort(redis_exceptions.TimeoutError(f"no reply from redis within {self._timeout_s} s"))
            return
        protocol.watchdog = loop.call_later(-overdue, self._watch, protocol)

    async def _connect(self) -> _RespProtocol:
        async with self._connecting:
            if self._closed:
                raise redis_exceptions.ConnectionError("client closed")
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol
            loop = asyncio.get_running_loop()
            protocol = _RespProtocol(loop)
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    if self._unix_path:
                        await loop.create_unix_connection(lambda: protocol, self._unix_path)
                    else:
                        await loop.create_connection(lambda: protocol, self._host, self._port, ssl=self._ssl)
            except (OSError, TimeoutError) as e:
                raise redis_exceptions.ConnectionError(f"cannot connect to redis: {e}") from e
            try:
                replies = [await f for f in self._send(protocol, self._setup)]
            except BaseException:
                # Cancelled (or timed out) before the setup answered: this socket would never be used
                # nor closed.
                protocol.abort(redis_exceptions.ConnectionError("connection setup did not finish"))
                raise
            for reply in replies:
                if isinstance(reply, hiredis.ReplyError):
                    # A wrong password or database is a configuration error that no retry fixes, but
                    # like redis-py it surfaces as a connection failure: the caller answers 503 and
                    # /readyz stays red, and the log says why.
                    error = redis_exceptions.AuthenticationError(f"redis refused the connection setup: {reply}")
                    protocol.abort(error)
                    raise error
            self._protocol = protocol
            return protocol
