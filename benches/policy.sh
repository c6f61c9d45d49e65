#!/usr/bin/env bash
# Group-driven policy at fleet scale: a policy comes into force for a group of N enrolled
# devices (generated in the database) — time until every command is queued and every push
# reached the APNs stand-in; a second full pass with nothing to do; one person's group change
# until their device's commands are queued. The broker runs inside the load generator, on
# SQLite and on PostgreSQL. Prints a Markdown table (docs/benchmarks.md keeps the latest
# figures); the progress and the reconciler's pass logs go to stderr.
#
#   bash benches/policy.sh [device counts, default "10000 100000"]
#
# Needs PostgreSQL on 127.0.0.1:5432 (trust auth) as on the project's machines, or
# BENCH_PG_ADMIN=postgres://... When the server's Unix socket is in BENCH_PG_SOCKET (default
# /var/run/postgresql), PostgreSQL is measured over it as well: sqlx 0.9.0 leaves Nagle's
# algorithm on for TCP, and the difference is what that costs (docs/benchmarks.md).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
COUNTS=${1:-10000 100000}
PG_ADMIN=${BENCH_PG_ADMIN:-postgres://postgres@127.0.0.1:5432/test}
PG_DB=trustbroker_policy_bench
PG_SOCKET=${BENCH_PG_SOCKET:-/var/run/postgresql}

# Built once: every row measures the same build, even if the tree changes meanwhile.
BIN=$(cargo bench --locked --bench policy_load --no-run 2>&1 | tee /dev/stderr |
  sed -n 's/^ *Executable .*(\(.*\))$/\1/p')
[[ -x $BIN ]] || { echo "policy_load did not build" >&2; exit 1; }

drop_db() { psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null; }
trap drop_db EXIT

run() { # label, device count, database URL or empty
  local args=(--devices "$2" --label "$1")
  if [[ -n $3 ]]; then
    drop_db
    psql "$PG_ADMIN" -qc "CREATE DATABASE $PG_DB" >/dev/null
    args+=(--database-url "$3")
  fi
  "$BIN" "${args[@]}" | tail -n +"${SKIP_HEADER:-1}"
  SKIP_HEADER=3
}

for n in $COUNTS; do
  run "trustbroker (SQLite)" "$n" ""
  run "trustbroker (PostgreSQL)" "$n" "${PG_ADMIN%/*}/$PG_DB"
  if [[ -S $PG_SOCKET/.s.PGSQL.5432 ]]; then
    run "trustbroker (PostgreSQL, Unix socket)" "$n" \
      "postgres://postgres@localhost/$PG_DB?host=$PG_SOCKET"
  fi
done
