#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 with trust authentication and a
# database `test`, and prints the URL the tests use as their admin connection.
#
# These machines run one already; otherwise this starts the installed cluster, or installs
# Debian's postgresql and configures it.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/peers/common.sh
. "$HERE/common.sh"

URL=postgres://postgres@127.0.0.1:5432/test
ready() { pg_isready -q -h 127.0.0.1 -p 5432; }

if ! command -v pg_isready >/dev/null || ! ready; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql postgresql-client
  fi
  version=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n1)
  hba=/etc/postgresql/$version/main/pg_hba.conf
  if ! grep -q "trustbroker-tests" "$hba"; then
    # Loopback only, for the test suite: trust, as on the CI machines.
    sed -i '1i host all all 127.0.0.1/32 trust # trustbroker-tests\nhost all all ::1/128 trust # trustbroker-tests' "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null ||
    pg_ctlcluster --skip-systemctl-redirect "$version" main restart
  wait_for PostgreSQL ready
fi
if ! psql -q -h 127.0.0.1 -U postgres -d test -c 'SELECT 1' >/dev/null 2>&1; then
  psql -q -h 127.0.0.1 -U postgres -d postgres -c 'CREATE DATABASE test' >/dev/null
fi
echo "$URL"
