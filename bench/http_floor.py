"""The CPU floor of an HTTP request on this machine: why the router has its own front for sends.

Starts two throw-away servers on 127.0.0.1, each answering ``POST /v1/messages`` with a fixed 202 JSON
body (no Redis, no validation): aiohttp (the router's framework) and a plain asyncio protocol (what
``router/fastpath.py`` builds on), both on uvloop. Drives each with the same kind of client as
``beeline bench`` (aiohttp, 64 connections, a ~95-byte JSON body, a fixed rate) and reports the
server's CPU per request from /proc. The two run interleaved, ``--rounds`` times, so that machine noise
hits both.

    .venv/bin/python bench/http_floor.py --rate 1000 --requests 8000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

BODY = b'{"to": "bob", "channel": "chat", "payload": {"text": "' + b"x" * 40 + b'"}}'
ANSWER = b'{"id": "0123456789abcdef0123456789abcdef", "results": [{"to": "bob", "seq": 1, "status": "routed"}]}'

AIOHTTP_SERVER = f"""
import sys, uvloop
from aiohttp import web
async def send(request):
    await request.read()
    return web.Response(body={ANSWER!r}, status=202, content_type="application/json")
app = web.Application()
app.router.add_post("/v1/messages", send)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None, loop=uvloop.new_event_loop())
"""

PROTOCOL_SERVER = f"""
import asyncio, sys, uvloop
ANSWER = {ANSWER!r}
HEAD = b"HTTP/1.1 202 Accepted\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n"
RESPONSE = HEAD % len(ANSWER) + ANSWER
class Plain(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, bytearray()
    def data_received(self, data):
        self.buffer += data
        while (end := self.buffer.find(b"\\r\\n\\r\\n")) >= 0:
            length = 0
            for line in bytes(self.buffer[:end]).split(b"\\r\\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[: end + 4 + length]
            self.transport.write(RESPONSE)
async def main():
    await asyncio.get_running_loop().create_server(Plain, "127.0.0.1", int(sys.argv[1]))
    await asyncio.Event().wait()
uvloop.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(port: int, rate: float, requests: int) -> None:
    url = f"http://127.0.0.1:{port}/v1/messages"
    headers = {"Authorization": "Bearer bench", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:

        async def one() -> None:
            async with session.post(url, data=BODY, headers=headers) as response:
                await response.read()

        start = time.perf_counter()
        tasks = []
        async with asyncio.timeout(60 + requests / rate):
            for i in range(requests):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one()))
            await asyncio.gather(*tasks)


async def wait_listening(port: int) -> None:
    async with asyncio.timeout(10):
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            await asyncio.sleep(0.05)


async def measure_running(port: int, pid: int, rate: float, requests: int) -> float:
    await wait_listening(port)
    await drive(port, rate, min(200, requests))  # warm-up: connections, caches
    before = cpu_s(pid)
    await drive(port, rate, requests)
    return (cpu_s(pid) - before) * 1000 / requests


def measure(source: str, rate: float, requests: int) -> float:
    """Server CPU ms per request of one fresh server process."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", source, str(port)])
    try:
        return asyncio.run(measure_running(port, server.pid, rate, requests))
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rate", type=float, default=1000, help="requests per second (1000)")
    parser.add_argument("--requests", type=int, default=8000, help="requests per measurement (8000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    args = parser.parse_args()
    results: dict[str, list[float]] = {"aiohttp": [], "asyncio protocol": []}
    for _ in range(args.rounds):
        results["aiohttp"].append(measure(AIOHTTP_SERVER, args.rate, args.requests))
        results["asyncio protocol"].append(measure(PROTOCOL_SERVER, args.rate, args.requests))
    print(f"server CPU ms per request at {args.rate:g} requests/s ({args.requests} requests, {args.rounds} rounds)")
    for name, values in results.items():
        median = sorted(values)[len(values) // 2]
        print(f"  {name:17} " + "  ".join(f"{v:.3f}" for v in values) + f"   median {median:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
