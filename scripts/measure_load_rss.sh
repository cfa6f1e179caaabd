#!/usr/bin/env bash
# Peak memory of loading a 1 GB checkpoint: builds a random 267 M-parameter Llama in fp32
# (1.07 GB, one model.safetensors, made by transformers; kept under ~/.cache/temper/load_rss),
# then runs `temper-sft --validate` on it (which loads the model and its tokenizer, checks the
# config and exits) under /usr/bin/time, and the same on the tiny Qwen2 fixture for the
# baseline of a stage process (libtorch and its CUDA libraries). Prints both peaks and the
# difference per byte of checkpoint. Needs the release build and the project venv
# (scripts/setup.sh).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${TEMPER_CACHE:-$HOME/.cache/temper}/load_rss
model=$cache/model
if [ ! -f "$model/model.safetensors" ]; then
  mkdir -p "$cache"
  "$repo/.venv/bin/python" - "$model" "$repo" <<'PY'
import shutil, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
out, repo = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512)
LlamaForCausalLM(cfg).save_pretrained(out, max_shard_size="10GB")
for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
    shutil.copy(f"{repo}/tests/fixtures/chat/chatml/{f}", out)
PY
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
peak_kb() {
  printf 'init: %s\ndata: %s\nsteps: 1\nbatch_size: 1\n' "$1" "$repo/tests/fixtures/tiny/sft.jsonl" > "$work/sft.yaml"
  /usr/bin/time -v "$repo/target/release/temper-sft" --config "$work/sft.yaml" --out "$work/out" --validate \
    2>&1 >/dev/null | awk '/Maximum resident/ {print $6}'
}
bytes=$(stat -c %s "$model/model.safetensors")
# The peak varies from run to run (allocator timing), so each side is measured 5 times.
runs=${RUNS:-5}
big=$(for _ in $(seq "$runs"); do peak_kb "$model"; done | sort -n | tr '\n' ' ')
base=$(for _ in $(seq "$runs"); do peak_kb "$repo/tests/fixtures/qwen2_chatml"; done | sort -n | tr '\n' ' ')
awk -v b="$bytes" -v big="$big" -v base="$base" 'BEGIN {
  n = split(big, B, " "); split(base, S, " "); m = int((n + 1) / 2)
  gb = 1024 / 1e9
  printf "checkpoint %.2f GB; peak RSS loading it over %d runs: median %.2f GB (min %.2f, max %.2f);\n", b/1e9, n, B[m]*gb, B[1]*gb, B[n]*gb
  printf "a stage with a tiny model: median %.2f GB; loading costs %.2f x the checkpoint above that (median)\n", S[m]*gb, (B[m]-S[m])*1024/b
}'
