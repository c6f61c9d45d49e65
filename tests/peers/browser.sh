#!/usr/bin/env bash
# Headless Chromium (Debian's `chromium`) driven by puppeteer-core, for the test that clicks
# through the enrollment portal as a person would. Nothing runs in the background: `install`
# puts chromium and the node modules in place, and prints the command the test runs.
#
#   tests/peers/browser.sh install
#
# node_modules are installed with `npm ci` into $PEERS_DIR/browser, never into the repository.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/peers/common.sh
. "$HERE/common.sh"

DIR=$PEERS_DIR/browser

case "${1:-install}" in
  install) ;;
  stop | start) exit 0 ;;
  *) echo "usage: $0 install" >&2; exit 2 ;;
esac
apt_install chromium
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then apt_install nodejs npm; fi
mkdir -p "$DIR"
cp "$HERE/browser/enroll-flow.mjs" "$HERE/browser/package.json" "$HERE/browser/package-lock.json" "$DIR/"
cd "$DIR"
want=$(node -p "require('./package.json').dependencies['puppeteer-core']")
if [[ ! -f node_modules/puppeteer-core/package.json ]] ||
  [[ $(node -p "require('./node_modules/puppeteer-core/package.json').version") != "$want" ]]; then
  # The browser is Debian's: never let puppeteer download one.
  PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >npm.log 2>&1 ||
    { cat npm.log >&2; exit 1; }
fi
echo "$DIR/enroll-flow.mjs"
