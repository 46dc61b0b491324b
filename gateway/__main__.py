"""``beeline gateway``: load config, configure logs, run the app."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from aiohttp import web

from gateway.app import create_app
from shared.config import GatewayConfig, load_cli
from shared.logs import configure_logging
from shared.runtime import new_event_loop, tune_gc


def main(argv: Sequence[str] | None = None) -> int:
    cfg = load_cli(GatewayConfig, argv, os.environ)
    if cfg is None:
        return 2
    configure_logging(cfg.log_level, cfg.log_format, service="gateway", node_id=cfg.node_id)
    tune_gc()
    web.run_app(
        create_app(cfg),
        host=cfg.host,
        port=cfg.port,
        access_log=None,
        print=None,
        shutdown_timeout=cfg.shutdown_timeout_s,
        handle_signals=True,
        loop=new_event_loop(cfg.event_loop),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
