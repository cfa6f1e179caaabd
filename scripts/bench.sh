#!/usr/bin/env bash
# temper vs PyTorch, side by side, in one run on this machine: training tokens/s of the same
# GPT (forward, backward, AdamW; same batch, sequence length and precision) and generation
# tokens/s of temper's KV-cache sampler vs Hugging Face `generate` with sampling.
#   bash scripts/bench.sh              CPU shape: L4 d256 h4 V8192 T256 B8, fp32
#   bash scripts/bench.sh gpu          GPT-2 small: L12 d768 h12 V50304 T1024 B16, bf16
# Set TEMPER_BIN to use prebuilt binaries (e.g. on a machine without cargo).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
if [ "${1:-cpu}" = gpu ]; then
  shape=(12 768 12 50304 1024 16); steps=10; warmup=3; repeats=3; dev=auto; prec=bf16; gen=(64 64 256)
else
  shape=(4 256 4 8192 256 8); steps=10; warmup=2; repeats=3; dev=cpu; prec=fp32; gen=(16 32 64)
fi
if [ -z "${TEMPER_BIN:-}" ]; then
  bash scripts/setup.sh
  cargo build --release --locked -p temper-bench
  TEMPER_BIN=target/release
  PY=.venv/bin/python
else
  PY=${PYTHON:-python3}
fi
ours=$("$TEMPER_BIN/temper-bench" --layers "${shape[0]}" --width "${shape[1]}" --heads "${shape[2]}" --vocab "${shape[3]}" \
  --context "${shape[4]}" --batch "${shape[5]}" --steps $steps --warmup $warmup --repeats $repeats --device $dev \
  --precision $prec --gen-batch "${gen[0]}" --gen-prompt "${gen[1]}" --gen-new "${gen[2]}")
theirs=$("$PY" scripts/bench_torch.py "${shape[@]}" $steps $warmup $repeats $dev $prec "${gen[@]}")
"$PY" - "$ours" "$theirs" <<'PY'
import json, sys
t, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
rows = [("train tok/s: temper", t["train_tok_per_s"]), ("train tok/s: PyTorch eager", p["eager_tok_per_s"])]
if "compiled_tok_per_s" in p:
    rows.append(("train tok/s: torch.compile", p["compiled_tok_per_s"]))
rows += [("generate tok/s: temper", t["generate"]["tok_per_s"]), ("generate tok/s: HF generate", p["hf_generate_tok_per_s"]),
         ("generate ceiling: GEMMs only", p["decode_gemm_floor_tok_per_s"])]
print(f"shape {t['shape']}, {t['precision']} on {p['device']} ({p['threads']} threads), params {t['params']:,}")
for name, v in rows:
    print(f"  {name:<28} {v:>12,.0f}")
print(f"  {'temper / eager (train)':<28} {t['train_tok_per_s'] / p['eager_tok_per_s']:>12.2f}x")
if "compiled_tok_per_s" in p:
    print(f"  {'temper / compiled (train)':<28} {t['train_tok_per_s'] / p['compiled_tok_per_s']:>12.2f}x")
print(f"  {'temper / HF (generate)':<28} {t['generate']['tok_per_s'] / p['hf_generate_tok_per_s']:>12.2f}x")
print(f"  {'ceiling / HF (generate)':<28} {p['decode_gemm_floor_tok_per_s'] / p['hf_generate_tok_per_s']:>12.2f}x")
if p["device"] == "cuda":
    print(f"  {'temper MFU (6N·tok/s / 989 TFLOP/s)':<28} {t['train_tflops'] / 989:>12.1%}")
print(json.dumps({"temper": t, "pytorch": p}))
PY
