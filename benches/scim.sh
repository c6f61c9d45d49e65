#!/usr/bin/env bash
# SCIM provisioning to queued commands: a group of N people with enrolled devices pushed over
# SCIM in batches, and 1-member PATCHes, each timed until the commands of the policy that
# targets the group are queued on the devices. The broker runs inside the load generator, on
# SQLite and on PostgreSQL (TCP, and the Unix socket when there is one). Prints Markdown lines
# (docs/benchmarks.md, "SCIM provisioning", keeps the latest figures).
#
#   bash benches/scim.sh [users, default 10000] [batch, default 1000]
#
# Needs PostgreSQL on 127.0.0.1:5432 (trust auth) as on the project's machines, or
# BENCH_PG_ADMIN=postgres://...
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
USERS=${1:-10000}
BATCH=${2:-1000}
PG_ADMIN=${BENCH_PG_ADMIN:-postgres://postgres@127.0.0.1:5432/test}
PG_DB=trustbroker_scim_bench
PG_SOCKET=${BENCH_PG_SOCKET:-/var/run/postgresql}

# Built once: every run measures the same build, even if the tree changes meanwhile.
BIN=$(cargo bench --locked --bench scim_load --no-run 2>&1 | tee /dev/stderr |
  sed -n 's/^ *Executable .*(\(.*\))$/\1/p')
[[ -x $BIN ]] || { echo "scim_load did not build" >&2; exit 1; }

drop_db() { psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null; }
trap drop_db EXIT

run() { # label, database URL or empty
  local args=(--users "$USERS" --batch "$BATCH" --label "$1")
  if [[ -n $2 ]]; then
    drop_db
    psql "$PG_ADMIN" -qc "CREATE DATABASE $PG_DB" >/dev/null
    args+=(--database-url "$2")
  fi
  "$BIN" "${args[@]}"
}

run "SQLite" ""
run "PostgreSQL" "${PG_ADMIN%/*}/$PG_DB"
if [[ -S $PG_SOCKET/.s.PGSQL.5432 ]]; then
  run "PostgreSQL, Unix socket" "postgres://postgres@localhost/$PG_DB?host=$PG_SOCKET"
fi
