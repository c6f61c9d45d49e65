#!/usr/bin/env bash
# Apple MDM benchmark: signed Idle connects/s (wrk, pre-signed bodies) and command round
# trips/s, with p50/p99 and the broker's RSS, at 1,000 and 10,000 enrolled devices, on SQLite
# and PostgreSQL. Prints a Markdown table (docs/benchmarks.md keeps the latest figures).
#
#   bash benches/mdm.sh [device counts, default "1000 10000"]
#
# Environment: BENCH_BIN and BENCH_LOAD name a prebuilt broker and mdm_load (to compare two
# builds back to back without rebuilding); BENCH_ARGS is passed to mdm_load (e.g.
# "--connections 32,128,512 --no-round-trips"); BENCH_DBS is "sqlite postgres" by default;
# BENCH_FLEET=1 writes the devices straight into the database instead of enrolling them over
# SCEP (for 100,000 devices: memory with every per-node cache full), Idle runs only.
#
# BENCH_CALLGRIND=SECONDS instead counts the broker's instructions per signed Idle: the broker
# runs under `valgrind --tool=callgrind` on SQLite with a written fleet (BENCH_FLEET) of the
# first device count, one wrk warm-up run (8 connections, 20 s) fills the caches, then the
# counters are zeroed, wrk replays the same bodies for SECONDS, and the dump is divided by the
# requests answered (repeatable within ~1% under load; `callgrind_annotate` on the kept file
# gives the split).
#
# Needs PostgreSQL on 127.0.0.1:5432 (trust auth) as on the project's machines, or
# BENCH_PG_ADMIN=postgres://...; installs wrk if missing.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=tests/peers/common.sh
. tests/peers/common.sh
COUNTS=${1:-1000 10000}
PG_ADMIN=${BENCH_PG_ADMIN:-postgres://postgres@127.0.0.1:5432/test}
PG_DB=trustbroker_mdm_bench
WORK=$(mktemp -d)
PORT=9480
command -v wrk >/dev/null || apt_install wrk

if [[ -z ${BENCH_BIN:-} ]]; then
  cargo build --release --locked --bin trustbroker
  cargo bench --locked --bench mdm_load --no-run
fi
BIN=${BENCH_BIN:-target/release/trustbroker}
DBS=${BENCH_DBS:-sqlite postgres}
load() {
  if [[ -n ${BENCH_LOAD:-} ]]; then "$BENCH_LOAD" "$@"; else cargo bench --locked --bench mdm_load -- "$@"; fi
}

broker_pid=
cleanup() {
  if [[ -n $broker_pid ]]; then kill "$broker_pid" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

run() { # label, device count, database URL or empty
  local data=$WORK/data-$RANDOM
  local args=(--data-dir "$data" --listen 127.0.0.1:0 --http-listen "127.0.0.1:$PORT" --log-level warn)
  if [[ -n $3 ]]; then
    psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $PG_DB" -c "CREATE DATABASE $PG_DB" >/dev/null
    args+=(--database-url "$3")
  fi
  "$BIN" migrate "${args[@]}" >/dev/null
  local key
  key=$("$BIN" admin-key create --name bench --scope scep:challenge --scope commands:write "${args[@]}" | tail -n 1)
  "$BIN" serve "${args[@]}" >"$WORK/broker.log" 2>&1 &
  broker_pid=$!
  for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  local fleet=()
  if [[ -n ${BENCH_FLEET:-} ]]; then fleet=(--fleet-database "${3:-sqlite:$data/trustbroker.db}"); fi
  # shellcheck disable=SC2086
  load --url "http://127.0.0.1:$PORT" --admin-key "$key" "${fleet[@]}" \
    --devices "$2" --server-pid "$broker_pid" --label "$1" ${BENCH_ARGS:-} | tail -n +"${SKIP_HEADER:-1}"
  kill "$broker_pid"
  wait "$broker_pid" 2>/dev/null || true
  broker_pid=
  SKIP_HEADER=3
}

if [[ -n ${BENCH_CALLGRIND:-} ]]; then
  command -v valgrind >/dev/null || apt_install valgrind
  n=${COUNTS%% *}
  data=$WORK/data
  args=(--data-dir "$data" --listen 127.0.0.1:0 --http-listen "127.0.0.1:$PORT" --log-level warn)
  "$BIN" migrate "${args[@]}" >/dev/null
  key=$("$BIN" admin-key create --name bench --scope scep:challenge --scope commands:write "${args[@]}" | tail -n 1)
  out=${BENCH_CALLGRIND_OUT:-callgrind.mdm.out}
  valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" "$BIN" serve "${args[@]}" >"$WORK/broker.log" 2>&1 &
  broker_pid=$!
  for _ in $(seq 600); do
    curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
    sleep 0.2
  done
  load --url "http://127.0.0.1:$PORT" --admin-key "$key" --fleet-database "sqlite:$data/trustbroker.db" \
    --devices "$n" --connections 8 --duration 20 --no-round-trips --keep-script "$WORK/script" \
    >/dev/null 2>"$WORK/load.log" || { cat "$WORK/load.log"; exit 1; }
  callgrind_control -z "$broker_pid" >/dev/null 2>&1
  wrk -t1 -c8 -d"${BENCH_CALLGRIND}s" -s "$WORK/script/idle.lua" "http://127.0.0.1:$PORT" >"$WORK/wrk.txt"
  callgrind_control -d "$broker_pid" >/dev/null 2>&1
  kill "$broker_pid"
  wait "$broker_pid" 2>/dev/null || true
  broker_pid=
  cp "$WORK/cg.out.1" "$out"
  requests=$(awk '/ requests in /{print $1}' "$WORK/wrk.txt")
  instructions=$(awk '/^summary:/{print $2}' "$out")
  non2xx=$(awk -F: '/Non-2xx/{print $2}' "$WORK/wrk.txt")
  echo "$n devices: $requests signed Idles (non-2xx: ${non2xx:-0}), $instructions instructions," \
    "$((instructions / requests)) per Idle; profile in $out"
  exit 0
fi

for n in $COUNTS; do
  for db in $DBS; do
    case $db in
      sqlite) run "trustbroker (SQLite)" "$n" "" ;;
      postgres) run "trustbroker (PostgreSQL)" "$n" "${PG_ADMIN%/*}/$PG_DB" ;;
    esac
  done
done
