#!/usr/bin/env bash
# Runs the whole suite (scripts/test.sh, same arguments) against the newest versions that pyproject.toml's
# ranges allow today, in a separate virtualenv (.venv-latest), so that an upstream release that breaks
# Beeline is seen before the lock files move. The committed lock (requirements/) is left as it is: when
# this is green, `scripts/lock.sh` moves the lock to the same versions.
set -euo pipefail
cd "$(dirname "$0")/.."
BEELINE_SETUP_TESTS=1 bash scripts/setup.sh  # the locked venv brings uv
mkdir -p build
latest=build/latest-requirements.txt
.venv/bin/uv pip compile --quiet --no-config --upgrade --generate-hashes --index-url https://pypi.org/simple \
  --python .venv/bin/python --no-header --output-file "$latest" pyproject.toml --extra test --extra demo --extra bench
pins() { grep -E '^[A-Za-z0-9_.-]+==' "$1" | sed 's/ .*//' | sort -u; }
echo "test-latest: versions newer than the lock (requirements/test.txt):"
comm -13 <(pins requirements/test.txt) <(pins "$latest") | sed 's/^/  /'
BEELINE_VENV=.venv-latest BEELINE_LOCK="$latest" exec bash scripts/test.sh "$@"
