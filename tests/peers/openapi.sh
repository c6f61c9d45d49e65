#!/usr/bin/env bash
# An independent OpenAPI 3.1 validator for the served document (/api/v1/openapi.json): Python's
# openapi-spec-validator, pinned here. Nothing runs in the background: `install` puts a
# virtualenv in place and prints the validator's path (TRUSTBROKER_TEST_OPENAPI_VALIDATOR).
#
#   tests/peers/openapi.sh install
#
# Packages go into $PEERS_DIR/openapi/venv, never into the repository or the system Python.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/peers/common.sh
. "$HERE/common.sh"

DIR=$PEERS_DIR/openapi
VERSION=0.9.0

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
if [[ ! -x $DIR/venv/bin/openapi-spec-validator ]] ||
  [[ $("$DIR/venv/bin/python" -c 'import importlib.metadata as m; print(m.version("openapi-spec-validator"))' 2>/dev/null) != "$VERSION" ]]; then
  "$DIR/venv/bin/pip" install -q "openapi-spec-validator==$VERSION" >"$DIR/pip.log" 2>&1 || { cat "$DIR/pip.log" >&2; exit 1; }
fi
echo "$DIR/venv/bin/openapi-spec-validator"
