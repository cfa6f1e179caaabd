#!/usr/bin/env bash
# The README's main command: set up (idempotent), fetch and prepare the real demo data, build
# release binaries, and run configs/demo.yaml end to end; then show status and metrics.
# Extra arguments go to `temper run` (e.g. --dry-run, --force, -o sft.steps=100).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup.sh
raw=$(bash scripts/fetch_data.sh)
cargo build --release --locked --workspace
# Converting takes about a second and is deterministic: rewritten files keep their content
# hashes, so stages downstream stay cached unless the conversion itself changed.
./target/release/temper-data prepare-demo --raw "$raw" --out data/demo
./target/release/temper run configs/demo.yaml "$@"
./target/release/temper status configs/demo.yaml
./target/release/temper metrics configs/demo.yaml
./target/release/temper report configs/demo.yaml
