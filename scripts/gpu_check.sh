#!/usr/bin/env bash
# The GPU check: run on a machine with CUDA and no cargo, from a copy of the repository that
# carries prebuilt release binaries (TEMPER_BIN, default target/release; built here with
# `cargo build --release`). It uses that machine's own torch (2.11.0+cu130) for libtorch and
# as the PyTorch side.
#
#   bash scripts/gpu_check.sh [OUT]      (OUT defaults to $OUT, else runs/gpu_check)
#
# 1. the tiny pipeline end to end on CUDA (configs/tiny.yaml with device: cuda);
# 2. `bench.sh gpu`: GPT-2 small (L12 d768, T1024, B16, bf16 autocast) training tokens/s of
#    temper and PyTorch eager / torch.compile, and generation vs Hugging Face `generate`;
# 3. the tiny pipeline on that machine's CPU, and the final numbers of both side by side.
# Results go to a few files in OUT (machine.txt, tiny_cuda.log, bench_gpu.txt, tiny_cpu.log,
# summary.txt), written as each part ends, so a run cut short still reports what finished;
# work folders go under WORK (default /tmp/temper_gpu_check). Sized for 8 minutes on one H200.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${1:-${OUT:-runs/gpu_check}}
work=${WORK:-/tmp/temper_gpu_check}
mkdir -p "$out" "$work"
bin=${TEMPER_BIN:-$repo/target/release}
python=${PYTHON:-python3}
torch_lib=$("$python" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TEMPER_BIN_DIR="$bin"
{
  echo "== machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  nproc
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$out/machine.txt"

tiny() { # device, timeout
  local dev=$1 cfg="$work/tiny_$1.yaml"
  sed -e "s#device: cpu#device: $dev#" \
      -e "s#\.\./tests/fixtures#$repo/tests/fixtures#g" \
      -e "s#workdir: ../runs/tiny#workdir: $work/tiny_$dev#" configs/tiny.yaml > "$cfg"
  local start
  start=$(date +%s)
  timeout "$2" "$bin/temper" run "$cfg" > "$out/tiny_$dev.log" 2>&1
  echo "tiny pipeline on $dev: exit $?, $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
  "$bin/temper" metrics "$cfg" --last 1 >> "$out/tiny_$dev.log" 2>&1
}

# 1. The tiny pipeline on CUDA.
tiny cuda 150
# 2. The benchmark, both sides in one run.
TEMPER_BIN="$bin" PYTHON="$python" timeout 240 bash scripts/bench.sh gpu > "$out/bench_gpu.txt" 2>&1
echo "bench.sh gpu: exit $?" | tee -a "$out/summary.txt"
# 3. The same pipeline on this machine's CPU, and the two side by side.
tiny cpu 120
"$python" - "$work" <<'PY' 2>&1 | tee -a "$out/summary.txt"
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
print(f"{'stage':10} {'metric':18} {'cuda':>10} {'cpu':>10}")
for stage, keys in [("pretrain", ["loss"]), ("sft", ["loss"]), ("reward", ["accuracy"]),
                    ("ppo", ["reward/mean", "kl/mean"]), ("eval", ["ppo/win_rate"])]:
    rows = {}
    for dev in ("cuda", "cpu"):
        p = work / f"tiny_{dev}" / "stages" / stage / "summary.json"
        rows[dev] = json.loads(p.read_text()) if p.exists() else {}
    for k in keys:
        vals = [rows[d].get(k) for d in ("cuda", "cpu")]
        fmt = lambda v: f"{v:10.4f}" if isinstance(v, (int, float)) else f"{'-':>10}"
        print(f"{stage:10} {k:18} {fmt(vals[0])} {fmt(vals[1])}")
PY
echo "gpu_check: done; results in $out" >&2
