#!/usr/bin/env bash
# SCEP issuance benchmark, side by side in one run: trustbroker on SQLite, trustbroker on
# PostgreSQL, and micromdm's scepserver (Debian `scep`), each at concurrency 1, 8 and 32, all
# on loopback, with the server's CPU time per issuance (from /proc). Prints a Markdown table
# (docs/benchmarks.md keeps the latest figures).
#
#   bash benches/scep.sh [requests per level, default 1000]
#
# Environment (all optional), for before/after pairs and profiles:
#   BENCH_BIN=path          a trustbroker binary to measure instead of building this tree's
#                           (e.g. a release build of the parent commit in another worktree)
#   BENCH_LOAD=path         a built scep_load (skips `cargo bench --no-run`)
#   BENCH_ONLY="sqlite postgres scepserver"   which servers to run (default: all three)
#   BENCH_CONCURRENCY=1,8,32                  concurrency levels
#   BENCH_PERF=DIR          record `perf record -g` of each trustbroker run into DIR
#                           (perf-sqlite.data, perf-postgres.data; `perf report -i ...`)
#   BENCH_TIMELINE=DIR      write each trustbroker request's start and latency to
#                           DIR/sqlite-32.csv etc. (when the slow ones happened)
#   BENCH_CA_KEY=ecdsa-p256 trustbroker creates a P-256 CA with an RSA-2048 RA
#                           (--ca-key-algorithm ecdsa-p256 --scep-ra true): the RA decrypts and
#                           signs CertReps, the CA signs certificates with ECDSA. Default `rsa`:
#                           one RSA-2048 CA, no RA. scep_load encrypts to the RA either way.
#
# scepserver runs in a network namespace with only `lo` up and the load generator runs inside
# it too, connecting directly: no relay process between them (the socat relay of the test peers
# forks and enters the namespace for every connection, which capped scepserver's figures, not
# its own speed). Both CAs have RSA-2048 keys (and trustbroker's RA, with
# BENCH_CA_KEY=ecdsa-p256).
#
# Needs PostgreSQL on 127.0.0.1:5432 (trust auth) as on the project's machines, or
# BENCH_PG_ADMIN=postgres://... ; installs scep (scepserver) if missing; root for `ip netns`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
REQUESTS=${1:-1000}
PG_ADMIN=${BENCH_PG_ADMIN:-postgres://postgres@127.0.0.1:5432/test}
PG_DB=trustbroker_bench
WORK=$(mktemp -d)
PORT=9380
NETNS=tbscepbench

ONLY=${BENCH_ONLY:-sqlite postgres scepserver}
CA_KEY=${BENCH_CA_KEY:-rsa}
case $CA_KEY in
  rsa) CA_ARGS=() CA_LABEL="" ;;
  ecdsa-p256) CA_ARGS=(--ca-key-algorithm ecdsa-p256 --scep-ra true) CA_LABEL=", P-256 CA + RSA RA" ;;
  *) echo "BENCH_CA_KEY must be rsa or ecdsa-p256 (got $CA_KEY)" >&2; exit 2 ;;
esac
LEVELS=${BENCH_CONCURRENCY:-1,8,32}
if [[ -n ${BENCH_BIN:-} ]]; then
  BIN=$BENCH_BIN
else
  cargo build --release --locked --bin trustbroker
  BIN=target/release/trustbroker
fi
LOAD=${BENCH_LOAD:-$(cargo bench --locked --bench scep_load --no-run --message-format=json |
  grep -o '"executable":"[^"]*"' | tail -n 1 | cut -d'"' -f4)}
[[ -x $LOAD ]] || { echo "scep_load was not built" >&2; exit 1; }
[[ -x $BIN ]] || { echo "no trustbroker binary at $BIN" >&2; exit 1; }
runs() { [[ " $ONLY " == *" $1 "* ]]; }
header=1
# Prints the table header once, however many servers run.
table() { if ((header)); then header=0; cat; else tail -n +3; fi; }

broker_pid=
perf_pid=
cleanup() {
  [[ -n $perf_pid ]] && kill -INT "$perf_pid" 2>/dev/null && wait "$perf_pid" 2>/dev/null
  [[ -n $broker_pid ]] && kill "$broker_pid" 2>/dev/null && wait "$broker_pid" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

# Starts the broker on a fresh data directory and database ($1: a database URL or empty).
start_broker() {
  local data=$WORK/data-$RANDOM db=$1
  local args=(--data-dir "$data" --listen 127.0.0.1:0 --http-listen "127.0.0.1:$PORT" --log-level warn
    ${CA_ARGS[@]+"${CA_ARGS[@]}"})
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

# Measures the running broker ($1: label, $2: name of the perf file, $3: the database server's
# command name, whose CPU per issuance is reported too).
measure_broker() {
  if [[ -n ${BENCH_PERF:-} ]]; then
    mkdir -p "$BENCH_PERF"
    perf record -g -o "$BENCH_PERF/perf-$2.data" -p "$broker_pid" 2>/dev/null &
    perf_pid=$!
    sleep 0.5
  fi
  "$LOAD" --url "http://127.0.0.1:$PORT/scep" --admin-key "$KEY" --server-pid "$broker_pid" \
    --concurrency "$LEVELS" --requests "$REQUESTS" --label "$1" \
    ${3:+--database-process "$3"} \
    ${BENCH_TIMELINE:+--timeline "$BENCH_TIMELINE/$2"} >"$WORK/rows"
  table <"$WORK/rows"
  if [[ -n $perf_pid ]]; then
    kill -INT "$perf_pid"
    wait "$perf_pid" 2>/dev/null || true
    perf_pid=
  fi
}

# What this machine's cores do: issuance needs three RSA-2048 private-key operations (decrypt
# the envelope, sign the certificate, sign the CertRep), so their rate bounds the issuance rate
# whatever the server does around them. Printed before and after, as VMs vary.
rsa_floor() {
  local per_core
  per_core=$(openssl speed -seconds 2 rsa2048 2>/dev/null | awk '/^rsa 2048/ {print int($6)}')
  [[ -n $per_core ]] || return 0
  echo "RSA-2048 signatures/s per core (openssl speed): $per_core; three per issuance on" \
    "$(nproc) cores bound issuance at $((per_core * $(nproc) / 3))/s" >&2
}
echo "load: $(uptime)" >&2
rsa_floor
echo "binary: $BIN" >&2
echo "trustbroker CA key: $CA_KEY" >&2
if runs sqlite; then
  echo "trustbroker, SQLite, one-time challenges" >&2
  start_broker ""
  measure_broker "trustbroker (SQLite$CA_LABEL)" sqlite
  stop_broker
fi

if runs postgres; then
  echo "trustbroker, PostgreSQL, one-time challenges" >&2
  psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $PG_DB" -c "CREATE DATABASE $PG_DB" >/dev/null
  start_broker "${PG_ADMIN%/*}/$PG_DB"
  measure_broker "trustbroker (PostgreSQL$CA_LABEL)" postgres postgres
  stop_broker
fi

# scepserver listens on every interface and has no address flag: it runs in a network namespace
# of its own with only `lo` up, and the load generator joins that namespace and talks to it on
# its loopback. Its CA gets a 2048-bit key like trustbroker's (`scepserver ca -init` defaults
# to 4096, which costs about seven times as much per private-key operation). Its depot degrades
# under concurrency, so each level gets a fresh server.
if ! runs scepserver; then
  rsa_floor
  echo "load: $(uptime)" >&2
  exit 0
fi
command -v scepserver >/dev/null || bash tests/peers/scep.sh install
scep_pid=
stop_scepserver() {
  if [[ -n $scep_pid ]]; then
    kill "$scep_pid" 2>/dev/null || true
    wait "$scep_pid" 2>/dev/null || true
  fi
  scep_pid=
  ip netns del "$NETNS" 2>/dev/null || true
}
trap 'stop_scepserver; cleanup' EXIT
for c in ${LEVELS//,/ }; do
  echo "scepserver 2.1.0 (RSA-2048 CA), static challenge, concurrency $c" >&2
  depot=$WORK/depot-$c
  scepserver ca -init -keySize 2048 -depot "$depot" >/dev/null 2>&1
  ip netns add "$NETNS"
  ip netns exec "$NETNS" ip link set lo up
  ip netns exec "$NETNS" scepserver -depot "$depot" -port 2016 -challenge secret \
    -allowrenew 0 >"$WORK/scepserver.log" 2>&1 &
  scep_pid=$!
  for _ in $(seq 100); do
    ip netns exec "$NETNS" curl -fsS "http://127.0.0.1:2016/scep?operation=GetCACaps" \
      >/dev/null 2>&1 && break
    sleep 0.1
  done
  ip netns exec "$NETNS" "$LOAD" --url http://127.0.0.1:2016/scep --challenge secret \
    --cipher des3 --concurrency "$c" --requests "$REQUESTS" --server-pid "$scep_pid" \
    --label "scepserver 2.1.0" >"$WORK/rows"
  table <"$WORK/rows"
  stop_scepserver
done
rsa_floor
echo "load: $(uptime)" >&2
