#!/usr/bin/env bash
# SCEP issuance benchmark, side by side: trustbroker on SQLite, trustbroker on PostgreSQL, and
# micromdm's scepserver (Debian `scep`), each at concurrency 1, 8 and 32, all on loopback.
# Prints a Markdown table (docs/benchmarks.md keeps the latest figures).
#
#   bash benches/scep.sh [requests per level, default 1000]
#
# Needs PostgreSQL on 127.0.0.1:5432 (trust auth) as on the project's machines, or
# BENCH_PG=postgres://... ; installs scep (scepserver) if missing.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
REQUESTS=${1:-1000}
PG_ADMIN=${BENCH_PG_ADMIN:-postgres://postgres@127.0.0.1:5432/test}
PG_DB=trustbroker_bench
WORK=$(mktemp -d)
PORT=9380

cargo build --release --locked --bin trustbroker
cargo bench --locked --bench scep_load --no-run
BENCH=(cargo bench --locked --bench scep_load --)
BIN=target/release/trustbroker

broker_pid=
cleanup() {
  [[ -n $broker_pid ]] && kill "$broker_pid" 2>/dev/null && wait "$broker_pid" 2>/dev/null
  bash tests/peers/scep.sh stop-server >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Starts the broker on a fresh data directory and database ($1: a database URL or empty).
start_broker() {
  local data=$WORK/data-$RANDOM db=$1
  local args=(--data-dir "$data" --listen 127.0.0.1:0 --http-listen "127.0.0.1:$PORT" --log-level warn)
  [[ -n $db ]] && args+=(--database-url "$db")
  "$BIN" migrate "${args[@]}" >/dev/null
  KEY=$("$BIN" admin-key create --name bench --scope scep:challenge "${args[@]}" | tail -n 1)
  "$BIN" serve "${args[@]}" >"$WORK/broker.log" 2>&1 &
  broker_pid=$!
  for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  cat "$WORK/broker.log" >&2
  return 1
}

stop_broker() {
  kill "$broker_pid"
  wait "$broker_pid" 2>/dev/null || true
  broker_pid=
}

echo "trustbroker, SQLite, one-time challenges" >&2
start_broker ""
"${BENCH[@]}" --url "http://127.0.0.1:$PORT/scep" --admin-key "$KEY" \
  --requests "$REQUESTS" --label "trustbroker (SQLite)"
stop_broker

echo "trustbroker, PostgreSQL, one-time challenges" >&2
psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $PG_DB" -c "CREATE DATABASE $PG_DB" >/dev/null
start_broker "${PG_ADMIN%/*}/$PG_DB"
"${BENCH[@]}" --url "http://127.0.0.1:$PORT/scep" --admin-key "$KEY" \
  --requests "$REQUESTS" --label "trustbroker (PostgreSQL)" | tail -n +3
stop_broker

# scepserver's depot degrades under concurrency, so each level gets a fresh server.
for c in 1 8 32; do
  echo "scepserver 2.1.0, static challenge, concurrency $c" >&2
  bash tests/peers/scep.sh start-server >/dev/null
  "${BENCH[@]}" --url http://127.0.0.1:2016/scep --challenge secret --cipher des3 \
    --concurrency "$c" --requests "$REQUESTS" --label "scepserver 2.1.0" | tail -n +3
  bash tests/peers/scep.sh stop-server >/dev/null
done
