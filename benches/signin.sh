#!/usr/bin/env bash
# Sign-in to profile: latency per protocol (LDAP, OpenID Connect, SAML 2.0) from "Sign in" to
# holding the enrollment profile, and profiles per second for signed-in people, against the
# test IdPs of tests/run.sh and the broker configured by docs/examples/test-idps.toml.
# Prints Markdown tables (docs/benchmarks.md keeps the latest figures).
#
#   bash benches/signin.sh [sign-ins per protocol, default 30]
#
#   BENCH_PROFILE=dev   use debug builds (a quick check that the benchmark works)
#   BENCH_BIN=path      a trustbroker binary to measure (e.g. another commit's, back to back)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SIGNINS=${1:-30}
PROFILE=${BENCH_PROFILE:-release}
WORK=$(mktemp -d)
PUBLIC=http://127.0.0.1:8080

# The test IdPs (reused when already running); they know the broker as $PUBLIC.
TRUSTBROKER_PEERS_ONLY=1 TRUSTBROKER_KEEP_PEERS=1 TRUSTBROKER_SKIP_LINT=1 bash tests/run.sh >/dev/null

if [[ -n ${BENCH_BIN:-} ]]; then
  BIN=$BENCH_BIN
elif [[ $PROFILE == release ]]; then
  cargo build --release --locked --bin trustbroker
  BIN=target/release/trustbroker
else
  cargo build --locked --bin trustbroker
  BIN=target/debug/trustbroker
fi
cargo bench --locked --profile "$PROFILE" --bench signin_load --no-run

broker_pid=
cleanup() {
  if [[ -n $broker_pid ]]; then kill "$broker_pid" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# A stand-in push certificate: profiles need a topic (its subject's UID).
topic=com.apple.mgmt.External.$(cat /proc/sys/kernel/random/uuid)
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -keyout "$WORK/push.key" -out "$WORK/push.pem" \
  -subj "/UID=$topic/CN=APSP" 2>/dev/null
# The test IdPs' configuration, with room for the profiles this downloads: a person may hold at
# most 1,000 unused ones per window (the default is 5 per hour).
cp docs/examples/test-idps.toml "$WORK/broker.toml"
printf '\n[enroll]\nmax_unredeemed_profiles = 1000\nunredeemed_window_secs = 3600\n' >>"$WORK/broker.toml"
args=(--config "$WORK/broker.toml" --data-dir "$WORK/data" --listen 127.0.0.1:0
  --log-level warn)
"$BIN" push-cert import --cert "$WORK/push.pem" --key "$WORK/push.key" "${args[@]}" >/dev/null
"$BIN" serve "${args[@]}" >"$WORK/broker.log" 2>&1 &
broker_pid=$!
for _ in $(seq 100); do
  curl -fsS "$PUBLIC/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
cargo bench --locked --profile "$PROFILE" --bench signin_load -- --url "$PUBLIC" \
  --public-url "$PUBLIC" --signins "$SIGNINS"
