#!/usr/bin/env bash
# micromdm's SCEP client and server (Debian package `scep` 2.1.0), the interoperability peers.
#
#   tests/peers/scep.sh install          scepclient + scepserver
#   tests/peers/scep.sh start-server     scepserver on 127.0.0.1:$SCEPSERVER_PORT (2016), static
#                                        challenge $SCEPSERVER_CHALLENGE, fresh depot; for the
#                                        side-by-side benchmark
#   tests/peers/scep.sh stop-server
#
# scepserver listens on every interface and has no address flag, so it runs in a network
# namespace with only `lo` up, and a socat relay in the root namespace offers it on loopback.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/peers/common.sh
. "$HERE/common.sh"

DIR=$PEERS_DIR/scep
PORT=${SCEPSERVER_PORT:-2016}
CHALLENGE=${SCEPSERVER_CHALLENGE:-secret}
NETNS=tbscep

install() {
  if ! command -v scepclient >/dev/null || ! command -v scepserver >/dev/null; then apt_install scep; fi
}

case "${1:-install}" in
  install) install ;;
  start-server)
    install
    command -v ip >/dev/null || apt_install iproute2
    command -v socat >/dev/null || apt_install socat
    bash "$HERE/scep.sh" stop-server
    rm -rf "$DIR"; mkdir -p "$DIR"
    cd "$DIR"
    scepserver ca -init -depot depot >/dev/null 2>&1
    ip netns add "$NETNS" 2>/dev/null || true
    ip netns exec "$NETNS" ip link set lo up
    setsid nohup ip netns exec "$NETNS" scepserver -depot depot -port "$PORT" \
      -challenge "$CHALLENGE" -allowrenew 0 >"$DIR/scepserver.log" 2>&1 </dev/null &
    echo $! >"$DIR/scepserver.pid"
    # The relay enters the namespace for each connection it forwards.
    setsid nohup socat "TCP-LISTEN:$PORT,bind=127.0.0.1,reuseaddr,fork" \
      "EXEC:ip netns exec $NETNS socat STDIO TCP\\:127.0.0.1\\:$PORT" \
      >"$DIR/relay.log" 2>&1 </dev/null &
    echo $! >"$DIR/relay.pid"
    wait_for scepserver curl -fsS "http://127.0.0.1:$PORT/scep?operation=GetCACaps" ||
      { cat "$DIR"/*.log >&2; exit 1; }
    log "scepserver on http://127.0.0.1:$PORT/scep (challenge '$CHALLENGE', depot $DIR/depot)"
    ;;
  stop-server)
    stop_pid "$DIR/relay.pid" group
    stop_pid "$DIR/scepserver.pid" group
    ip netns del "$NETNS" 2>/dev/null || true
    ;;
  *) echo "usage: $0 [install|start-server|stop-server]" >&2; exit 2 ;;
esac
