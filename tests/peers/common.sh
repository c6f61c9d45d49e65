#!/usr/bin/env bash
# Shared helpers for the peer scripts (sourced, not run).
# State of every peer lives under $PEERS_DIR; every address is on loopback.

PEERS_DIR=${PEERS_DIR:-/tmp/trustbroker-peers}
export PEERS_DIR

log() { printf '%s\n' "$*" >&2; }

# apt_install PKG...: installs the packages that are missing, running `apt-get update` at most
# once per test run (the marker lives in $PEERS_DIR, which run.sh clears at start).
apt_install() {
  local missing=()
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  mkdir -p "$PEERS_DIR"
  if [[ ! -f $PEERS_DIR/.apt-updated ]]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    touch "$PEERS_DIR/.apt-updated"
  fi
  log "installing: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=120 "${missing[@]}" >/dev/null
}

# pid_alive FILE: the PID in FILE is a running process.
pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_pid FILE [group]: ends the process in FILE (its whole process group with "group").
stop_pid() {
  local file=$1 group=${2:-}
  if pid_alive "$file"; then
    local pid
    pid=$(cat "$file")
    if [[ $group == group ]]; then kill -- -"$pid" 2>/dev/null || kill "$pid"; else kill "$pid"; fi
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    log "stopped pid $pid ($file)"
  fi
  rm -f "$file"
}

# wait_for DESCRIPTION COMMAND...: retries COMMAND for up to 20 s.
wait_for() {
  local what=$1; shift
  for _ in $(seq 200); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "timed out waiting for $what"
  return 1
}
