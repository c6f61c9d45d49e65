#!/usr/bin/env bash
# An independent JWT verifier for the per-device token tests: Node with jose (the JWT library
# oidc-provider uses, pinned here on its own). Nothing runs in the background: `install` puts the
# node modules in place and prints the script the tests run (TRUSTBROKER_TEST_JWT_VERIFY).
#
#   tests/peers/jwt.sh install
#
# node_modules are installed with `npm ci` into $PEERS_DIR/jwt, never into the repository.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/peers/common.sh
. "$HERE/common.sh"

DIR=$PEERS_DIR/jwt

case "${1:-install}" in
  install) ;;
  stop | start) exit 0 ;;
  *) echo "usage: $0 install" >&2; exit 2 ;;
esac
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then apt_install nodejs npm; fi
mkdir -p "$DIR"
cp "$HERE/jwt/verify.mjs" "$HERE/jwt/package.json" "$HERE/jwt/package-lock.json" "$DIR/"
cd "$DIR"
want=$(node -p "require('./package.json').dependencies.jose")
if [[ ! -f node_modules/jose/package.json ]] ||
  [[ $(node -p "require('./node_modules/jose/package.json').version") != "$want" ]]; then
  npm ci --no-audit --no-fund --loglevel=error >npm.log 2>&1 || { cat npm.log >&2; exit 1; }
fi
echo "$DIR/verify.mjs"
