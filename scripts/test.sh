#!/usr/bin/env bash
# Set up (see setup.sh), then run the whole test suite: lint, types, and every pytest test against real
# redis-server processes that the suite starts on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
BEELINE_SETUP_TESTS=1 bash scripts/setup.sh
bin=${BEELINE_VENV:-.venv}/bin
"$bin/ruff" check .
"$bin/ruff" format --check .
"$bin/mypy"
exec "$bin/pytest" "$@"
