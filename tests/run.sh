#!/usr/bin/env bash
# The test command: installs what is missing, starts the real peers on loopback (PostgreSQL,
# slapd, the OpenID provider, SimpleSAMLphp; scep's client and server binaries; headless
# Chromium), runs fmt, clippy and the whole suite, and stops every peer it started.
#
#   bash tests/run.sh [cargo test arguments...]
#
#   TRUSTBROKER_SKIP_LINT=1    skip cargo fmt and clippy
#   TRUSTBROKER_PEERS_ONLY=1   start the peers and print their environment, then stop
#   TRUSTBROKER_KEEP_PEERS=1   leave the peers running afterwards
#   TRUSTBROKER_SKIP_FAULTS=1  skip the long fault scenarios (tests/faults.sh) after the suite
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS=$ROOT/tests/peers
cd "$ROOT"
# shellcheck source=tests/peers/common.sh
. "$PEERS/common.sh"

started_at=$(date +%s)
step() { printf '\n==> %s (%ss)\n' "$*" "$(($(date +%s) - started_at))"; }

if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
  export PATH=$HOME/.cargo/bin:$PATH
fi

# Peers this run started (not ones that were already up), to stop on exit.
started=()
cleanup() {
  local status=$?
  if [[ ${TRUSTBROKER_KEEP_PEERS:-0} != 1 ]]; then
    for peer in "${started[@]}"; do bash "$PEERS/$peer.sh" stop >/dev/null 2>&1 || true; done
  fi
  printf '\n==> done in %ss (exit %s)\n' "$(($(date +%s) - started_at))" "$status"
  exit "$status"
}
trap cleanup EXIT

step "installing what is missing"
rm -f "$PEERS_DIR/.apt-updated"
# Native build dependencies of the Rust code, and the tools the tests drive.
# samael (SAML) builds against xmlsec1/libxml2 and runs bindgen (libclang); xmlsec1 is the CLI.
# prometheus brings promtool, which checks the alert rules in deploy/prometheus; nginx is the
# load balancer in front of two nodes (the tests run their own instance; none is started here).
apt_install pkg-config libssl-dev openssl curl ca-certificates iproute2 \
  libxml2-dev libxmlsec1-dev libclang-dev clang xmlsec1 prometheus nginx
# One after the other: apt and dpkg take locks, so the parallel starts below install nothing.
for peer in scep ldap oidc saml; do bash "$PEERS/$peer.sh" install; done
# Headless Chromium and puppeteer-core, for the test that clicks through the portal.
TRUSTBROKER_TEST_BROWSER_FLOW=$(bash "$PEERS/browser.sh" install)
# jose, an independent JWT library, verifies the broker's per-device tokens.
TRUSTBROKER_TEST_JWT_VERIFY=$(bash "$PEERS/jwt.sh" install)
# scim2-client, an independent SCIM 2.0 client library, drives /scim/v2.
TRUSTBROKER_TEST_SCIM_CLIENT=$(bash "$PEERS/scim.sh" install)
# openapi-spec-validator, an independent OpenAPI 3.1 validator, checks /api/v1/openapi.json.
TRUSTBROKER_TEST_OPENAPI_VALIDATOR=$(bash "$PEERS/openapi.sh" install)

step "starting PostgreSQL"
TRUSTBROKER_TEST_PG=$(bash "$PEERS/postgres.sh")

step "starting slapd, the OpenID provider and SimpleSAMLphp"
mkdir -p "$PEERS_DIR"
pids=()
names=(ldap oidc saml)
for peer in "${names[@]}"; do
  bash "$PEERS/$peer.sh" start >"$PEERS_DIR/$peer-start.log" 2>&1 </dev/null &
  pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    log_file=$PEERS_DIR/${names[$i]}-start.log
    grep -q "already running" "$log_file" || started+=("${names[$i]}")
    tail -n 1 "$log_file"
  else
    failed=1
    echo "!! ${names[$i]} failed to start:" >&2
    cat "$PEERS_DIR/${names[$i]}-start.log" >&2
  fi
done
[[ $failed == 0 ]] || exit 1

export TRUSTBROKER_TEST_PEERS=1
export TRUSTBROKER_TEST_PG
export TRUSTBROKER_TEST_LDAP_URL=ldap://127.0.0.1:3389
export TRUSTBROKER_TEST_LDAPS_URL=ldaps://127.0.0.1:6636
export TRUSTBROKER_TEST_LDAP_CA=$PEERS_DIR/ldap/tls/ca.crt
export TRUSTBROKER_TEST_OIDC_ISSUER=http://127.0.0.1:4444
export TRUSTBROKER_TEST_SAML_METADATA_URL=http://127.0.0.1:8443/saml2/idp/metadata.php
export TRUSTBROKER_TEST_SAML_CERT=$PEERS_DIR/saml/cert/idp.crt
export TRUSTBROKER_TEST_BROWSER_FLOW
export TRUSTBROKER_TEST_JWT_VERIFY
export TRUSTBROKER_TEST_SCIM_CLIENT
export TRUSTBROKER_TEST_OPENAPI_VALIDATOR
export TRUSTBROKER_TEST_NGINX=/usr/sbin/nginx
if [[ ${TRUSTBROKER_PEERS_ONLY:-0} == 1 ]]; then
  env | grep '^TRUSTBROKER_TEST_' | sort
  exit 0
fi

# The previous release, for the rolling-upgrade test (tests/it/upgrade.rs). Built before this
# tree: cargo leaves each build's binary at target/debug/trustbroker, and the suite's build
# must be the last.
step "previous release (tests/previous-release.sh)"
previous_status=0
previous=$(bash tests/previous-release.sh) || previous_status=$?
if [[ $previous_status -eq 0 ]]; then
  export TRUSTBROKER_TEST_PREVIOUS_RELEASE=$previous
elif [[ $previous_status -eq 3 ]]; then
  export TRUSTBROKER_TEST_PREVIOUS_RELEASE_MISSING="not in this clone's history (shallow clone?)"
else
  exit "$previous_status"
fi

if [[ ${TRUSTBROKER_SKIP_LINT:-0} != 1 ]]; then
  step "cargo fmt --check"
  cargo fmt --check
  step "cargo clippy"
  cargo clippy --all-targets --locked -- -D warnings
fi

step "cargo test"
cargo test --locked "$@"

# The long fault scenarios (a node killed during a 10,000-device fan-out, PostgreSQL stopped
# for 30 s under load): about two minutes, run after the suite when it ran whole.
if [[ $# -eq 0 && ${TRUSTBROKER_SKIP_FAULTS:-0} != 1 ]]; then
  step "fault scenarios (tests/faults.sh)"
  # The nodes' logs go to a file; the figures and the outcome are shown.
  faults_log=$(mktemp)
  faults_status=0
  cargo test --locked --test it -- --ignored --nocapture faults:: >"$faults_log" 2>&1 ||
    faults_status=$?
  grep -E '^(kill -9|PostgreSQL stopped|test )' "$faults_log" || true
  if [[ $faults_status -ne 0 ]]; then
    tail -n 200 "$faults_log"
    exit "$faults_status"
  fi
fi
