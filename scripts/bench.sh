#!/usr/bin/env bash
# temper vs PyTorch, side by side, in one run on this machine: training tokens/s of the same
# GPT (forward, backward, AdamW; same batch, sequence length and precision) and generation
# tokens/s of temper's KV-cache sampler vs Hugging Face `generate` with sampling.
#   bash scripts/bench.sh              CPU shape: L4 d256 h4 V8192 T256 B8, fp32 then bf16
#   bash scripts/bench.sh gpu          GPT-2 small: L12 d768 h12 V50304 T1024 B16, bf16
# PRECISIONS="fp32 bf16" chooses the tables (bf16 = autocast on both sides).
# ROUNDS=N alternates the two sides N times (default 3 on CPU, 1 on GPU) and reports medians.
# Set TEMPER_BIN to use prebuilt binaries (e.g. on a machine without cargo).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
if [ "${1:-cpu}" = gpu ]; then
  shape=(12 768 12 50304 1024 16); steps=10; warmup=3; repeats=3; dev=auto; precs=${PRECISIONS:-bf16}; gen=(64 64 256); default_rounds=1
else
  shape=(4 256 4 8192 256 8); steps=10; warmup=2; repeats=3; dev=cpu; precs=${PRECISIONS:-fp32 bf16}; gen=(16 32 64); default_rounds=3
fi
if [ -z "${TEMPER_BIN:-}" ]; then
  bash scripts/setup.sh
  cargo build --release --locked -p temper-bench
  TEMPER_BIN=target/release
  PY=.venv/bin/python
else
  PY=${PYTHON:-python3}
fi
# Alternate the two sides for several rounds: machine speed drifts (other tenants, clocks), and
# a ratio taken within one round is far steadier than figures taken minutes apart.
rounds=${ROUNDS:-$default_rounds}
for prec in $precs; do
results=()
for ((r = 1; r <= rounds; r++)); do
  echo "$prec round $r/$rounds" >&2
  results+=("$("$TEMPER_BIN/temper-bench" --layers "${shape[0]}" --width "${shape[1]}" --heads "${shape[2]}" \
    --vocab "${shape[3]}" --context "${shape[4]}" --batch "${shape[5]}" --steps $steps --warmup $warmup \
    --repeats $repeats --device $dev --precision $prec --gen-batch "${gen[0]}" --gen-prompt "${gen[1]}" \
    --gen-new "${gen[2]}")")
  results+=("$("$PY" scripts/bench_torch.py "${shape[@]}" $steps $warmup $repeats $dev $prec "${gen[@]}")")
done
"$PY" - "${results[@]}" <<'PY'
import json, statistics, sys
docs = [json.loads(a) for a in sys.argv[1:]]
ours, theirs = docs[0::2], docs[1::2]
med = statistics.median


def figure(side, get):
    return med([get(d) for d in side])


def ratio(get_t, get_p):
    """Median over rounds of the within-round ratio, with its range."""
    rs = [get_t(t) / get_p(p) for t, p in zip(ours, theirs)]
    return med(rs), min(rs), max(rs)


t0, p0 = ours[0], theirs[0]
train_t = lambda d: d["train_tok_per_s"]  # noqa: E731
gen_t = lambda d: d["generate"]["tok_per_s"]  # noqa: E731
rows = [("train tok/s: temper", figure(ours, train_t)),
        ("train tok/s: PyTorch eager", figure(theirs, lambda d: d["eager_tok_per_s"]))]
compiled = all("compiled_tok_per_s" in p for p in theirs)
if compiled:
    rows.append(("train tok/s: torch.compile", figure(theirs, lambda d: d["compiled_tok_per_s"])))
rows += [("generate tok/s: temper", figure(ours, gen_t)),
         ("generate tok/s: HF generate", figure(theirs, lambda d: d["hf_generate_tok_per_s"])),
         ("generate ceiling: GEMMs only", figure(theirs, lambda d: d["decode_gemm_floor_tok_per_s"]))]
print(f"shape {t0['shape']}, {t0['precision']} on {p0['device']} ({p0['threads']} threads), "
      f"params {t0['params']:,}; medians of {len(ours)} alternating round(s)")
for name, v in rows:
    print(f"  {name:<30} {v:>12,.0f}")
ratios = [("temper / eager (train)", ratio(train_t, lambda d: d["eager_tok_per_s"]))]
if compiled:
    ratios.append(("temper / compiled (train)", ratio(train_t, lambda d: d["compiled_tok_per_s"])))
ratios.append(("temper / HF (generate)", ratio(gen_t, lambda d: d["hf_generate_tok_per_s"])))
# The ceiling's ratio comes from the PyTorch side alone.
ceil = [p["decode_gemm_floor_tok_per_s"] / p["hf_generate_tok_per_s"] for p in theirs]
ratios.append(("ceiling / HF (generate)", (med(ceil), min(ceil), max(ceil))))
for name, (m, lo, hi) in ratios:
    spread = f"  (rounds {lo:.2f}-{hi:.2f})" if len(ours) > 1 else ""
    print(f"  {name:<30} {m:>11.2f}x{spread}")
if p0["device"] == "cuda":
    print(f"  {'temper MFU (6N·tok/s / 989 TFLOP/s)':<30} {figure(ours, lambda d: d['train_tflops']) / 989:>12.1%}")
print(json.dumps({"temper": ours, "pytorch": theirs}))
PY
done
