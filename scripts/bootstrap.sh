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
  # System packages the tests drive for real: Chromium (report and worklist pages),
  # PostgreSQL (the store), Orthanc (a real PACS for C-STORE / STOW-RS forwarding).
  need=()
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
  command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
  dpkg -s orthanc-dicomweb >/dev/null 2>&1 || need+=(orthanc-dicomweb)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing ${need[*]} for the tests..." >&2
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null) \
        || echo "warning: could not install ${need[*]}; the tests that need them will fail" >&2
    else
      echo "warning: ${need[*]} missing and not root; the tests that need them will fail" >&2
    fi
  fi
else
  .venv/bin/python -m pip install -q -e .
fi
