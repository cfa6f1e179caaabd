#!/usr/bin/env bash
# The README's main command: set up (idempotent), fetch and prepare the real demo data, build
# release binaries, and run configs/demo.yaml end to end (`temper run` ends by saying what each
# stage achieved); then show the status, the seed sweep of the study (mean ± std over the
# branches) and write the HTML report. Extra arguments go to
# `temper run` (e.g. --dry-run, --force, -o sft.steps=100). A stage stopped by a gate (the PPO
# branches check their reward model's accuracy) is reported here too; the script exits with
# `temper run`'s code after everything is shown.
set -euo pipefail
# `--study` runs configs/demo_study.yaml instead: the same chain over three seeds (about an hour
# on 2 cores), the file docs/results.md's demo tables come from.
config=configs/demo.yaml
if [[ "${1:-}" == "--study" ]]; then
  config=configs/demo_study.yaml
  shift
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup.sh
raw=$(bash scripts/fetch_data.sh)
cargo build --release --locked --workspace
# Converting takes about a second and is deterministic: rewritten files keep their content
# hashes, so stages downstream stay cached unless the conversion itself changed.
./target/release/temper-data prepare-demo --raw "$raw" --out data/demo
code=0
./target/release/temper run "$config" "$@" || code=$?
./target/release/temper status "$config"
./target/release/temper compare "$config"
# The independent judge on the human-written held-out data: the reference for the judge rows.
.venv/bin/python scripts/judge_reference.py data/demo
./target/release/temper report "$config"
case $code in
  0) ;;
  4) echo "demo: a gate stopped part of the pipeline (see 'gated' in the status above); the rest ran" >&2 ;;
  *) echo "demo: temper run exited with $code (see the status above and runs/demo/logs/)" >&2 ;;
esac
exit "$code"
