#!/usr/bin/env bash
# An independent SCIM 2.0 client for the provisioning tests: Python's scim2-client (with the
# scim2-models it validates against), pinned here. Nothing runs in the background: `install`
# puts a virtualenv and the driver in place and prints the driver's path
# (TRUSTBROKER_TEST_SCIM_CLIENT); the venv's python sits next to it in venv/bin/python.
#
#   tests/peers/scim.sh install
#
# Packages go into $PEERS_DIR/scim/venv, never into the repository or the system Python.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/peers/common.sh
. "$HERE/common.sh"

DIR=$PEERS_DIR/scim
PINS=("scim2-client[httpx2]==0.13.2" "scim2-models==0.12.3")

case "${1:-install}" in
  install) ;;
  stop | start) exit 0 ;;
  *) echo "usage: $0 install" >&2; exit 2 ;;
esac
if ! command -v python3 >/dev/null; then apt_install python3 python3-venv; fi
mkdir -p "$DIR"
if [[ ! -x $DIR/venv/bin/python ]]; then
  python3 -m venv "$DIR/venv" >&2 || { apt_install python3-venv; python3 -m venv "$DIR/venv" >&2; }
fi
if ! "$DIR/venv/bin/python" -c 'import scim2_client.engines.httpx2, scim2_models' 2>/dev/null ||
  [[ $("$DIR/venv/bin/python" -c 'import importlib.metadata as m; print(m.version("scim2-client"))') != 0.13.2 ]]; then
  "$DIR/venv/bin/pip" install -q "${PINS[@]}" >"$DIR/pip.log" 2>&1 || { cat "$DIR/pip.log" >&2; exit 1; }
fi
cp "$HERE/scim/driver.py" "$DIR/driver.py"
echo "$DIR/driver.py"
