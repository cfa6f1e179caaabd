#!/usr/bin/env bash
# The README's test command: installs what is missing (idempotent), then runs every test.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup.sh
# A clean debug build and the tests' runs need a few GB; say so up front instead of failing
# half-way through with "No space left on device".
free_kb=$(df -Pk "$repo" | awk 'NR==2 {print $4}')
echo "test: $((free_kb / 1024 / 1024)) GB free on the disk holding $repo" >&2
if [ "$free_kb" -lt $((4 * 1024 * 1024)) ]; then
  echo "test: warning: under 4 GB free; a clean build (~3 GB) and the tests' runs may not fit" >&2
fi
# Tests run the stage binaries as subprocesses, so build them first.
cargo build --workspace --locked
cargo test --workspace --locked "$@"
