"""``beeline gateway``: load config, configure logs, run the app."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from gateway.app import create_app
from shared.config import GatewayConfig, load_cli
from shared.logs import configure_logging
from shared.runtime import serve


def main(argv: Sequence[str] | None = None) -> int:
    cfg = load_cli(GatewayConfig, argv, os.environ)
    if cfg is None:
        return 2
    configure_logging(cfg.log_level, cfg.log_format, service="gateway", node_id=cfg.node_id)
    return serve("gateway", create_app(cfg), cfg, shutdown_timeout_s=cfg.shutdown_timeout_s)


if __name__ == "__main__":
    sys.exit(main())
