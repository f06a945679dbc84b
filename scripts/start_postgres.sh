#!/usr/bin/env bash
# Start a throwaway PostgreSQL server for bonescreen's service (tests, try-outs) and print its URL.
#
#   scripts/start_postgres.sh [DIR] [PORT]      default DIR=$(mktemp -d), PORT=55432
#   scripts/start_postgres.sh --stop DIR
#
# Needs Debian's `postgresql` package (initdb/pg_ctl under /usr/lib/postgresql/<v>/bin).
# As root the server runs as the `postgres` user (PostgreSQL refuses to run as root).
# Trust authentication on 127.0.0.1 only, fsync off: for tests, never for patient data.
# The pytest fixtures do the same from Python (tests/_service_support.py: postgres_cluster).
set -euo pipefail

bin_dir() {
  if command -v pg_ctl >/dev/null 2>&1; then dirname "$(readlink -f "$(command -v pg_ctl)")"; return; fi
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$d" ] || { echo "PostgreSQL server not installed: apt-get install -y postgresql" >&2; exit 1; }
  echo "$d"
}
BIN=$(bin_dir)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if [ "${1:-}" = "--stop" ]; then
  as_pg "$BIN/pg_ctl" -D "$2/db" -m fast -w stop
  exit 0
fi

DIR=${1:-$(mktemp -d -t bonescreen-pg-XXXXXX)}
PORT=${2:-55432}
mkdir -p "$DIR"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$DIR"
if [ ! -f "$DIR/db/PG_VERSION" ]; then
  as_pg "$BIN/initdb" -D "$DIR/db" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
fi
as_pg "$BIN/pg_ctl" -D "$DIR/db" -l "$DIR/postgres.log" -w -t 60 \
  -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off" start >/dev/null
echo "postgresql://postgres@127.0.0.1:$PORT/postgres"
