#!/usr/bin/env bash
# The README's main command: set up (idempotent), fetch and prepare the real demo data, build
# release binaries, and run configs/demo.yaml end to end; then show status, metrics, the seed
# sweep (mean ± std over the branches) and write the HTML report. Extra arguments go to
# `temper run` (e.g. --dry-run, --force, -o sft.steps=100). A stage stopped by a gate (the PPO
# branches check their reward model's accuracy) is reported here too; the script exits with
# `temper run`'s code after everything is shown.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup.sh
raw=$(bash scripts/fetch_data.sh)
cargo build --release --locked --workspace
# Converting takes about a second and is deterministic: rewritten files keep their content
# hashes, so stages downstream stay cached unless the conversion itself changed.
./target/release/temper-data prepare-demo --raw "$raw" --out data/demo
code=0
./target/release/temper run configs/demo.yaml "$@" || code=$?
./target/release/temper status configs/demo.yaml
./target/release/temper metrics configs/demo.yaml
./target/release/temper compare configs/demo.yaml
# The independent judge on the human-written held-out data: the reference for the judge rows.
.venv/bin/python scripts/judge_reference.py data/demo
./target/release/temper report configs/demo.yaml
case $code in
  0) ;;
  4) echo "demo: a gate stopped part of the pipeline (see 'gated' in the status above); the rest ran" >&2 ;;
  *) echo "demo: temper run exited with $code (see the status above and runs/demo/logs/)" >&2 ;;
esac
exit "$code"
