#!/usr/bin/env bash
# The test OpenID Provider (npm oidc-provider 9.13.3) on http://127.0.0.1:4444.
#
#   tests/peers/oidc.sh [install|start|stop|reset]
#
# Client mdm-broker / mdm-broker-secret; redirect URIs from OIDC_REDIRECT_URIS (comma-separated).
# People alice/alicepw bob/bobpw carol/carolpw with email, name and groups claims.
# node_modules are installed with `npm ci` into $PEERS_DIR/oidc, never into the repository.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/peers/common.sh
. "$HERE/common.sh"

DIR=$PEERS_DIR/oidc
export OIDC_PORT=${OIDC_PORT:-4444}
export OIDC_ISSUER=${OIDC_ISSUER:-http://127.0.0.1:$OIDC_PORT}
export OIDC_STATE_DIR=$DIR
PIDFILE=$DIR/oidc.pid
DISCOVERY=$OIDC_ISSUER/.well-known/openid-configuration

install() {
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then apt_install nodejs npm; fi
  if ! command -v curl >/dev/null; then apt_install curl; fi
}

case "${1:-start}" in
  install) install; exit 0 ;;
  stop) stop_pid "$PIDFILE"; exit 0 ;;
  reset) stop_pid "$PIDFILE"; rm -rf "$DIR" ;;
  start) ;;
  *) echo "usage: $0 [install|start|stop|reset]" >&2; exit 2 ;;
esac
install
if pid_alive "$PIDFILE" && curl -fsS -o /dev/null "$DISCOVERY"; then
  log "oidc-provider already running: $OIDC_ISSUER"
  exit 0
fi
stop_pid "$PIDFILE"

mkdir -p "$DIR"
cp "$HERE/oidc/provider.mjs" "$HERE/oidc/package.json" "$HERE/oidc/package-lock.json" "$DIR/"
cd "$DIR"
if [[ ! -f node_modules/oidc-provider/package.json ]] ||
  [[ $(node -p "require('./node_modules/oidc-provider/package.json').version") != 9.13.3 ]]; then
  npm ci --no-audit --no-fund --loglevel=error >npm.log 2>&1 || { cat npm.log >&2; exit 1; }
fi
setsid nohup node provider.mjs >"$DIR/oidc.log" 2>&1 </dev/null &
echo $! >"$PIDFILE"
wait_for "oidc-provider" curl -fsS -o /dev/null "$DISCOVERY" || { cat "$DIR/oidc.log" >&2; exit 1; }
log "oidc-provider started: PID $(cat "$PIDFILE") issuer $OIDC_ISSUER"
