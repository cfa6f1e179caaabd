#!/usr/bin/env bash
# The README's test command: installs what is missing (idempotent), then runs every test.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup.sh
# Tests run the stage binaries as subprocesses, so build them first.
cargo build --workspace --locked
cargo test --workspace --locked "$@"
