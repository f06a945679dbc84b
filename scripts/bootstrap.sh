#!/usr/bin/env bash
# Create ./.venv and install bonescreen into it (idempotent).
#   bash scripts/bootstrap.sh          # the package (demo, CLI)
#   bash scripts/bootstrap.sh --test   # + test extras and the system packages tests use (chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing chromium (headless report rendering tests)..." >&2
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "warning: chromium could not be installed; report screenshot tests will fail" >&2
    else
      echo "warning: chromium missing and not root; report screenshot tests will fail" >&2
    fi
  fi
else
  .venv/bin/python -m pip install -q -e .
fi
