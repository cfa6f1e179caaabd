#!/usr/bin/env bash
# What activation checkpointing, the chunked loss and bf16 AdamW moments cost and save here: peak RSS
# (GNU time's maximum resident set size of the whole process) and training step time of
# temper-bench, each setting in its own process, at two shapes where they matter:
#   blocks: GPT-2 small, L12 d768 h12 V8192 T1024 B4 — activations dominate;
#   vocab:  L2 d256 h4 V151936 (Qwen's vocabulary) T1024 B4 — the B × T × V logits dominate.
# bash scripts/bench_memory.sh [blocks|vocab|all] (default all). STEPS (default 2) timed steps
# after one warm-up. Set TEMPER_BIN to use prebuilt binaries.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
which=${1:-all}
steps=${STEPS:-2}
if [ -z "${TEMPER_BIN:-}" ]; then
  bash scripts/setup.sh
  cargo build --release --locked -p temper-bench >&2
  TEMPER_BIN=target/release
fi
run() { # label, shape..., flags...
  local label=$1; shift
  local out
  out=$(mktemp)
  /usr/bin/time -v "$TEMPER_BIN/temper-bench" "$@" --steps "$steps" --warmup 1 --repeats 1 \
    --gen-new 0 --device cpu 2>"$out.time" >"$out"
  python3 - "$label" "$out" "$out.time" <<'PY'
import json, re, sys
label, out, tim = sys.argv[1:]
r = json.load(open(out))
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(tim).read()).group(1))
print(f"  {label:<34} peak RSS {rss / 1024:7.0f} MiB   step {r['train_step_ms'] / 1e3:6.2f} s   "
      f"{r['train_tok_per_s']:6.0f} tokens/s")
PY
  rm -f "$out" "$out.time"
}
if [ "$which" = all ] || [ "$which" = blocks ]; then
  blocks=(--layers 12 --width 768 --heads 12 --vocab 8192 --context 1024 --batch 4)
  echo "GPT-2 small blocks: L12 d768 h12 V8192 T1024 B4, fp32, $steps steps"
  run "plain" "${blocks[@]}"
  run "activation_checkpointing" "${blocks[@]}" --activation-checkpointing
  run "optim moments: bf16" "${blocks[@]}" --bf16-moments
fi
if [ "$which" = all ] || [ "$which" = vocab ]; then
  vocab=(--layers 2 --width 256 --heads 4 --vocab 151936 --context 1024 --batch 4)
  echo "Qwen-sized vocabulary: L2 d256 h4 V151936 T1024 B4, fp32, $steps steps"
  run "plain" "${vocab[@]}"
  run "loss_chunk: 128" "${vocab[@]}" --loss-chunk 128
fi
