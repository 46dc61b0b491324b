"""``beeline``: one console script for every role.

beeline gateway [flags]    a gateway node (flags mirror BEELINE_* variables)
beeline router [flags]     the HTTP API
beeline token <user>       a development token signed with BEELINE_JWT_SECRET
beeline demo               Redis + two gateways + a router + a chat page, on this machine
beeline bench [flags]      the load generator behind docs/benchmarks.md
beeline --version
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from shared import __version__

USAGE = __doc__ or ""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE.strip())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command in ("--version", "-V", "version"):
        print(f"beeline {__version__}")
        return 0
    if command == "gateway":
        from gateway.__main__ import main as gateway_main  # noqa: PLC0415 - load only the chosen service

        return gateway_main(rest)
    if command == "router":
        from router.__main__ import main as router_main  # noqa: PLC0415

        return router_main(rest)
    if command == "token":
        return _token(rest)
    if command == "demo":
        from beeline.demo import main as demo_main  # noqa: PLC0415

        return demo_main(rest)
    if command == "bench":
        from beeline.bench import main as bench_main  # noqa: PLC0415

        return bench_main(rest)
    print(f"beeline: unknown command {command!r}\n\n{USAGE.strip()}", file=sys.stderr)
    return 2


def _token(rest: list[str]) -> int:
    import argparse  # noqa: PLC0415

    from shared.auth import mint_token  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="beeline token", description="Mint a development client token (HS256).")
    parser.add_argument("user")
    parser.add_argument("--ttl", type=int, default=24 * 3600, help="lifetime in seconds")
    parser.add_argument("--secret", default=None, help="HS256 secret [BEELINE_JWT_SECRET]")
    ns = parser.parse_args(rest)
    secret = ns.secret or os.environ.get("BEELINE_JWT_SECRET")
    if not secret:
        print("beeline token: set BEELINE_JWT_SECRET (or --secret)", file=sys.stderr)
        return 2
    print(mint_token(secret, ns.user, ttl_s=ns.ttl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
