"""``beeline router``: load config, configure logs, run the app."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence

from router.app import ROUTER_KEY, create_app
from router.fastpath import FastPathFront
from shared.config import RouterConfig, load_cli
from shared.logs import configure_logging
from shared.runtime import serve


def main(argv: Sequence[str] | None = None) -> int:
    cfg = load_cli(RouterConfig, argv, os.environ)
    if cfg is None:
        return 2
    configure_logging(cfg.log_level, cfg.log_format, service="router", node_id=socket.gethostname())
    app = create_app(cfg)
    router = app[ROUTER_KEY]
    front = (lambda fallback: FastPathFront(router, fallback)) if cfg.http_front == "lean" else None
    return serve("router", app, cfg, shutdown_timeout_s=5, front=front)


if __name__ == "__main__":
    sys.exit(main())
