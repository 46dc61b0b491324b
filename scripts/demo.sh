#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole system on this machine: Redis, two gateways, a router and a chat page.
set -euo pipefail
cd "$(dirname "$0")/.."
# --stomp also runs the Spring STOMP example behind nginx: setup then brings nginx and its npm libraries.
case " $* " in *" --stomp "*) export BEELINE_SETUP_STOMP=1 ;; esac
bash scripts/setup.sh
exec .venv/bin/beeline demo "$@"
