#!/usr/bin/env bash
# The GPU check: run on a machine with CUDA and no cargo, from a copy of the repository that
# carries prebuilt release binaries (target/release, built here with `cargo build --release`).
# It uses that machine's own torch (2.11.0+cu130) for libtorch and as the PyTorch side.
#
#   bash scripts/gpu_check.sh [OUT]      (OUT defaults to $OUT, else runs/gpu_check)
#
# 1. the tiny pipeline end to end on CUDA (configs/tiny.yaml with device: cuda), then the same
#    on CPU, and the final numbers of both side by side;
# 2. `bench.sh gpu`: GPT-2 small (L12 d768, T1024, B16, bf16 autocast) training tokens/s of
#    temper and PyTorch eager / torch.compile, and generation vs Hugging Face `generate`.
# Everything lands under OUT (logs, summaries, bench JSON); the whole check is sized to finish
# within 8 minutes on one H200. Nothing is installed.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
bin=${TEMPER_BIN:-$repo/target/release}
python=${PYTHON:-python3}
torch_lib=$("$python" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TEMPER_BIN_DIR="$bin"
{
  echo "== machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$out/machine.txt"

# 1. The tiny pipeline on CUDA and on CPU.
for dev in cuda cpu; do
  cfg="$out/tiny_$dev.yaml"
  sed -e "s#device: cpu#device: $dev#" \
      -e "s#\.\./tests/fixtures#$repo/tests/fixtures#g" \
      -e "s#workdir: ../runs/tiny#workdir: $out/tiny_$dev#" configs/tiny.yaml > "$cfg"
  start=$(date +%s)
  timeout 240 "$bin/temper" run "$cfg" 2>&1 | tee "$out/tiny_$dev.log"
  echo "tiny pipeline on $dev: $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
  "$bin/temper" metrics "$cfg" --last 1 > "$out/tiny_${dev}_metrics.txt" 2>&1 || true
done
"$python" - "$out" <<'PY' | tee -a "$out/summary.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'stage':10} {'metric':18} {'cuda':>10} {'cpu':>10}")
for stage, keys in [("pretrain", ["loss"]), ("sft", ["loss"]), ("reward", ["accuracy"]),
                    ("ppo", ["reward/mean", "kl/mean"]), ("eval", ["ppo/win_rate"])]:
    rows = {}
    for dev in ("cuda", "cpu"):
        p = out / f"tiny_{dev}" / "stages" / stage / "summary.json"
        rows[dev] = json.loads(p.read_text()) if p.exists() else {}
    for k in keys:
        vals = [rows[d].get(k) for d in ("cuda", "cpu")]
        fmt = lambda v: f"{v:10.4f}" if isinstance(v, (int, float)) else f"{'-':>10}"
        print(f"{stage:10} {k:18} {fmt(vals[0])} {fmt(vals[1])}")
PY

# 2. The benchmark, both sides in one run.
TEMPER_BIN="$bin" PYTHON="$python" timeout 300 bash scripts/bench.sh gpu 2>&1 | tee "$out/bench_gpu.txt"
echo "gpu_check: done; results in $out" >&2
