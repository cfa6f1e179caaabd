#!/usr/bin/env bash
# Data-parallel scaling on this machine: temper-pretrain on one process with the whole batch
# against N Gloo ranks with 1/N of it each (same global batch, same steps), alternating the two
# for ROUNDS rounds; prints training tokens/s of each (median over the logged steps, the first
# left out). Two baselines: one process on every core (what DP must beat here) and one process
# on one rank's share of the cores (cores/N threads); the scaling efficiency is
# tokens/s(N ranks) / (N × tokens/s(one process on cores/N threads)).
#   bash scripts/bench_dp.sh            2 ranks, L4 d256 h4 T128, global batch 32, 40 steps
# The N ranks run twice per round: reducing gradient buckets while backward runs (the default)
# and after it (TEMPER_DIST_OVERLAP=0), both with BUCKET_MB-MiB buckets (default 2, so that
# this 4 M-parameter model makes several; a bigger model gets DDP's 25 by default).
# NPROC, ROUNDS (default 2), STEPS, BUCKET_MB override. Set TEMPER_BIN to use prebuilt binaries.
# One process uses every core (libtorch's default); each of N ranks gets cores/N threads, as
# torchrun gives them.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
nproc=${NPROC:-2}
rounds=${ROUNDS:-2}
steps=${STEPS:-40}
bucket_mb=${BUCKET_MB:-2}
global=32
if [ -z "${TEMPER_BIN:-}" ]; then
  bash scripts/setup.sh
  cargo build --release --locked -p temper-pretrain -p temper-tokenizer >&2
  TEMPER_BIN=target/release
fi
cores=$(nproc)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/tok.yaml" <<EOF
corpus: [$repo/tests/fixtures/tiny/corpus.txt]
vocab_size: 1024
EOF
"$TEMPER_BIN/temper-tokenizer" --config "$work/tok.yaml" --out "$work/tok" >/dev/null 2>&1
config() { # per-rank batch
  cat >"$work/pre-$1.yaml" <<EOF
tokenizer: $work/tok/tokenizer.json
data: [$repo/tests/fixtures/tiny/corpus.txt]
model: {arch: gpt2, n_layer: 4, n_head: 4, d_model: 256, max_position: 128}
block_size: 128
steps: $steps
batch_size: $1
optim: {lr: 1.0e-3, warmup_steps: 5}
log_every: 5
eval_every: 1000
save_every: 1000
cache_dir: $work/cache
EOF
  echo "$work/pre-$1.yaml"
}
one=$(config $global)
many=$(config $((global / nproc)))
median_tps() { # median tokens_per_s of the train rows after the first
  python3 - "$1/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
tps = [r["tokens_per_s"] for r in rows if r.get("split") == "train"][1:]
print(statistics.median(tps))
PY
}
ones=() ; slices=() ; manys=() ; afters=()
threads=$(( cores / nproc > 0 ? cores / nproc : 1 ))
ranks() { # out overlap: the N ranks of one run
  local port=$((29500 + RANDOM % 1000)) pids=() k p
  for ((k = 0; k < nproc; k++)); do
    RANK=$k LOCAL_RANK=$k WORLD_SIZE=$nproc MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      OMP_NUM_THREADS=$threads TEMPER_DIST_OVERLAP=$2 TEMPER_DIST_BUCKET_MB=$bucket_mb \
      "$TEMPER_BIN/temper-pretrain" --config "$many" --out "$1" >/dev/null 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
}
for ((r = 1; r <= rounds; r++)); do
  echo "round $r/$rounds: 1 process × batch $global, then $nproc ranks × batch $((global / nproc))" >&2
  rm -rf "$work/one" "$work/slice" "$work/many" "$work/after"
  OMP_NUM_THREADS=$cores "$TEMPER_BIN/temper-pretrain" --config "$one" --out "$work/one" >/dev/null 2>&1
  ones+=("$(median_tps "$work/one")")
  OMP_NUM_THREADS=$threads "$TEMPER_BIN/temper-pretrain" --config "$one" --out "$work/slice" >/dev/null 2>&1
  slices+=("$(median_tps "$work/slice")")
  ranks "$work/many" 1
  manys+=("$(median_tps "$work/many")")
  ranks "$work/after" 0
  afters+=("$(median_tps "$work/after")")
done
python3 - "$nproc" "$cores" "$threads" "$bucket_mb" "${ones[*]}" "${slices[*]}" "${manys[*]}" "${afters[*]}" <<'PY'
import statistics, sys
n, cores, threads = (int(x) for x in sys.argv[1:4])
bucket_mb = sys.argv[4]
runs = [[float(x) for x in a.split()] for a in sys.argv[5:9]]
one, part, many, after = (statistics.median(r) for r in runs)
rows = [(f"1 process, {cores} threads", one, runs[0]),
        (f"1 process, {threads} thread(s)", part, runs[1]),
        (f"{n} ranks, {threads} thread(s) each", many, runs[2]),
        (f"  same, reduced after backward", after, runs[3])]
print(f"data parallel on {cores} cores: L4 d256 h4 T128, global batch 32 (medians over rounds)")
for name, v, r in rows:
    print(f"  {name:<32} {v:8.0f} tokens/s   rounds {', '.join(f'{x:.0f}' for x in r)}")
print(f"  {n} ranks vs 1 process on all cores: {many / one:.2f}x")
print(f"  {bucket_mb} MiB buckets reduced during backward vs after it: {many / after:.2f}x")
print(f"  scaling efficiency, {n} ranks / ({n} x 1 process on {threads} thread(s)): {many / (n * part):.2f}")
PY
