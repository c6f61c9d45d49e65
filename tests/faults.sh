#!/usr/bin/env bash
# The long fault scenarios alone, with the peers they need (PostgreSQL, nginx): a node killed
# with `kill -9` during a 10,000-device policy fan-out behind nginx, and PostgreSQL stopped for
# 30 s (TRUSTBROKER_FAULTS_OUTAGE_SECS) under two nodes and a fleet of checking-in devices.
# Each prints its figures. `bash tests/run.sh` runs them after the whole suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TRUSTBROKER_SKIP_LINT=1 exec bash tests/run.sh --test it -- --ignored --nocapture faults::
