#!/usr/bin/env bash
# Builds the previous release named in deploy/previous-release (tag and commit) for the
# rolling-upgrade test and prints the binary's path. The build shares this tree's cargo target
# directory, so only the old crate itself compiles; the binary is kept in
# target/previous-release/ and reused. Exit 3: the release is not in this clone's history.
#
# Cargo uplifts every build's binary to target/debug/trustbroker: run this before building the
# current tree (tests/run.sh does), never while its tests run.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
read -r tag commit < <(grep -v '^#' "$ROOT/deploy/previous-release")
out=$ROOT/target/previous-release/trustbroker-$tag
if [[ -x $out ]]; then
  echo "$out"
  exit 0
fi
rev=$commit
if git -C "$ROOT" rev-parse -q --verify "refs/tags/$tag^{commit}" >/dev/null; then
  rev=$(git -C "$ROOT" rev-parse "refs/tags/$tag^{commit}")
  if [[ $rev != "$commit" ]]; then
    echo "tag $tag is $rev, but deploy/previous-release says $commit" >&2
    exit 1
  fi
fi
if ! git -C "$ROOT" cat-file -e "$rev^{commit}" 2>/dev/null; then
  echo "the previous release $tag ($commit) is not in this clone's history" >&2
  exit 3
fi
src=$ROOT/target/previous-release/src
rm -rf "$src"
mkdir -p "$src"
git -C "$ROOT" archive "$rev" | tar -x -C "$src"
(cd "$src" && CARGO_TARGET_DIR=$ROOT/target cargo build --locked --bin trustbroker >&2)
cp "$ROOT/target/debug/trustbroker" "$out.tmp"
mv "$out.tmp" "$out"
rm -rf "$src"
echo "$out"
