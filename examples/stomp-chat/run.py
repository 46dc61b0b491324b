"""Runs the STOMP chat example whole: Redis, two gateways, a router, the example's app and nginx in front.

``python examples/stomp-chat/run.py [beeline demo options]`` is ``beeline demo --stomp``: the demo starts
Redis, the gateways and the router as it always does, then calls :func:`start_in_demo` here, which starts
``app.py`` and nginx (from ``nginx.conf.template``) as two more of its children and prints the page's
address. Ctrl-C stops everything, nginx and the app first.

:class:`NginxServer` is also what the browser test uses: nginx as a foreground process whose config, pid
file, logs and temp directories all live in one directory of its own.

Invariants: nginx and the app listen on the addresses given (loopback by default); the rendered config has
no placeholder left; every process started here is stopped by whoever started it (the demo's process
list, or :meth:`NginxServer.stop`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import aiohttp

# beeline.demo loads this file only for --stomp (by path, this directory being no package), so importing
# it here is no cycle.
from beeline.demo import Child, Credentials, DemoError, Processes
from beeline.demo import main as demo_main

HERE: Final = Path(__file__).resolve().parent
TEMPLATE: Final = HERE / "nginx.conf.template"
APP: Final = HERE / "app.py"
NGINX_PATHS: Final = ("/usr/sbin/nginx",)
START_TIMEOUT_S: Final = 15.0
POLL_INTERVAL_S: Final = 0.05


def nginx_binary() -> str | None:
    """nginx from PATH, else Debian's /usr/sbin/nginx (not on a normal user's PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    return next((p for p in NGINX_PATHS if os.access(p, os.X_OK)), None)


def render_nginx_conf(
    *, prefix: Path, listen_host: str, listen_port: int, gateways: Sequence[tuple[str, int]], app_port: int
) -> str:
    """The template with its placeholders filled; ``gateways`` are (host, port) of each gateway."""
    if not gateways:
        raise ValueError("nginx needs at least one gateway")
    servers = "\n".join(f"        server {host}:{port};" for host, port in gateways)
    values = {
        "PREFIX": str(prefix),
        "LISTEN_HOST": listen_host,
        "LISTEN_PORT": str(listen_port),
        "APP_PORT": str(app_port),
        "GATEWAY_SERVERS": servers,
    }
    text = TEMPLATE.read_text(encoding="utf-8")
    for name, value in values.items():
        text = text.replace(f"@@{name}@@", value)
    if re.search(r"@@[A-Z_]+@@", text):
        raise ValueError("nginx.conf.template has a placeholder run.py does not fill")
    return text


class NginxServer:
    """One nginx in the foreground, everything it writes under ``prefix``."""

    def __init__(
        self,
        prefix: Path,
        *,
        listen_port: int,
        gateways: Sequence[tuple[str, int]],
        app_port: int,
        listen_host: str = "127.0.0.1",
        binary: str | None = None,
    ) -> None:
        self.prefix = prefix
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.gateways = tuple(gateways)
        self.app_port = app_port
        self.binary = binary or nginx_binary() or "nginx"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def conf_path(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def error_log_path(self) -> Path:
        return self.prefix / "error.log"

    @property
    def url(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"http://{host}:{self.listen_port}"

    def prepare(self) -> list[str]:
        """Writes the config and returns nginx's command line."""
        self.prefix.mkdir(parents=True, exist_ok=True)
        # Started as root, nginx runs its worker as an unprivileged user, which must reach the temp
        # directories nginx creates (and chowns) in here; started as anyone else, this changes nothing.
        self.prefix.chmod(0o755)
        conf = render_nginx_conf(
            prefix=self.prefix,
            listen_host=self.listen_host,
            listen_port=self.listen_port,
            gateways=self.gateways,
            app_port=self.app_port,
        )
        self.conf_path.write_text(conf, encoding="utf-8")
        # -e: the startup error log too, which otherwise goes to the compiled-in /var/log/nginx path.
        return [self.binary, "-p", str(self.prefix), "-c", str(self.conf_path), "-e", str(self.error_log_path)]

    def error_log(self) -> str:
        try:
            return self.error_log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self, timeout_s: float = START_TIMEOUT_S) -> NginxServer:
        """Starts nginx and waits until it accepts connections; raises with its error log if it exits."""
        argv = self.prepare()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout_s
        while not listening(self.listen_host, self.listen_port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.error_log()[-4000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not listen on {self.listen_port} within {timeout_s:g}s")
            time.sleep(POLL_INTERVAL_S)
        return self

    def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown), then SIGKILL after a deadline."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def app_command(*, port: int, router_url: str, host: str = "127.0.0.1") -> list[str]:
    """The example app's command line (its secrets come from the environment: see app.py)."""
    return [sys.executable, str(APP), "--host", host, "--port", str(port), "--router-url", router_url]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing_libraries() -> list[str]:
    """The page's npm files not installed yet (app.py's list, loaded by path: this directory is no package)."""
    spec = importlib.util.spec_from_file_location("stomp_chat_app", APP)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {APP}")
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return list(module.missing_libraries())


async def wait_http_ok(url: str, timeout_s: float, children: Sequence[Child]) -> None:
    """Until GET ``url`` answers 200; fails at once if one of ``children`` exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
        while True:
            for child in children:
                if child.returncode is not None:
                    code = child.returncode
                    raise DemoError(f"{child.name} exited with code {code} while starting\n{child.output()}")
            try:
                async with session.get(url, allow_redirects=False) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise DemoError(f"{url} did not answer 200 within {timeout_s:g}s")
            await asyncio.sleep(POLL_INTERVAL_S)


async def start_in_demo(
    processes: Processes,
    workdir: Path,
    *,
    listen_host: str,
    url_host: str,
    listen_port: int,
    gateways: Sequence[tuple[str, int]],
    router_url: str,
    creds: Credentials,
    env: Mapping[str, str],
    echo: bool,
    ready_timeout_s: float,
) -> str:
    """``beeline demo --stomp``: starts the app and nginx as demo children; returns the page's URL.

    ``url_host`` is how nginx is reached (loopback for a wildcard ``listen_host``), gateways included."""
    binary = nginx_binary()
    if binary is None:
        raise DemoError("--stomp needs nginx (apt-get install nginx)")
    if missing := missing_libraries():
        raise DemoError(f"--stomp needs the page's libraries ({', '.join(missing)}): npm ci --prefix {HERE}")
    app_port = free_port()
    app_env = {**env, "BEELINE_JWT_SECRET": creds.jwt_secret, "BEELINE_API_KEYS": creds.api_key}
    app = Child("stomp-app", app_command(port=app_port, router_url=router_url), app_env, str(HERE), echo=echo, tier=2)
    await processes.spawn(app)
    nginx = NginxServer(
        workdir / "nginx", listen_host=listen_host, listen_port=listen_port, gateways=gateways, app_port=app_port
    )
    argv = nginx.prepare()
    proxy = Child("nginx", argv, dict(env), str(workdir), echo=echo, tier=2, log_file=nginx.error_log_path)
    await processes.spawn(proxy)
    # Through nginx: the login page (the app) and SockJS's info (a gateway) answer, so the page works.
    await wait_http_ok(f"http://127.0.0.1:{app_port}/login", ready_timeout_s, [app])
    url = f"http://{url_host}:{listen_port}"
    await wait_http_ok(f"{url}/login", ready_timeout_s, [app, proxy])
    await wait_http_ok(f"{url}/chat-websocket/info", ready_timeout_s, [app, proxy])
    return f"{url}/"


def main(argv: Sequence[str]) -> int:
    return demo_main(["--stomp", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
