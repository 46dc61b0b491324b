#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole system on this machine: Redis, two gateways, a router and a chat page.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/beeline demo "$@"
