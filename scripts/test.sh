#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs what it needs
# (redis-server from Debian when missing, the Python packages into .venv),
# then checks the stubs, lints, type-checks and runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -m soak).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    echo "installing redis-server (Debian package)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

# Headless Chromium + chromedriver for the dashboard's browser test.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver (Debian packages)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
# The Node.js client's packages (its interop test skips when node is absent).
if command -v npm >/dev/null 2>&1 && [ ! -d clients/node/node_modules ]; then
    (cd clients/node && npm ci --no-audit --no-fund --loglevel=error)
fi
# The Baileys bridge (engines/baileys): its node --test suite and the engine's
# end-to-end tests skip when node is absent.
if command -v npm >/dev/null 2>&1 && [ ! -d engines/baileys/node_modules ]; then
    (cd engines/baileys && npm ci --no-audit --no-fund --loglevel=error)
fi
# The benchmark's Node peer (Express + ws; scripts/bench/node/http_relay.js).
if command -v npm >/dev/null 2>&1 && [ ! -d scripts/bench/node_modules ]; then
    (cd scripts/bench && npm ci --no-audit --no-fund --loglevel=error)
fi

.venv/bin/python scripts/gen_proto.py --check
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
