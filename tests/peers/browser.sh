#!/usr/bin/env bash
# Headless Chromium (Debian's `chromium`) driven by puppeteer-core, for the tests that click
# through the enrollment portal and the admin console as a person would (the console's also runs
# axe-core on each page). Nothing runs in the background: `install` puts chromium and the node
# modules in place, and prints the portal flow's path; the console's, console-flow.mjs, is
# beside it.
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
cp "$HERE/browser/enroll-flow.mjs" "$HERE/browser/console-flow.mjs" "$HERE/browser/package.json" \
  "$HERE/browser/package-lock.json" "$DIR/"
cd "$DIR"
# Every dependency installed at the version package.json pins, or a fresh `npm ci`.
stale=$(node -e '
  const deps = require("./package.json").dependencies;
  for (const [name, want] of Object.entries(deps)) {
    let have = null;
    try { have = require(`./node_modules/${name}/package.json`).version; } catch {}
    if (have !== want) console.log(name);
  }')
if [[ -n $stale ]]; then
  # The browser is Debian's: never let puppeteer download one.
  PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >npm.log 2>&1 ||
    { cat npm.log >&2; exit 1; }
fi
echo "$DIR/enroll-flow.mjs"
