#!/usr/bin/env bash
# The GPU check: run on a machine with CUDA and no cargo, from a copy of the repository that
# carries prebuilt release binaries (TEMPER_BIN, default target/release; built here with
# `cargo build --release`). It uses that machine's own torch (2.11.0+cu130) for libtorch and
# as the PyTorch side.
#
#   bash scripts/gpu_check.sh [OUT]      (OUT defaults to $OUT, else runs/gpu_check)
#
# 1. the tiny pipeline end to end on CUDA (configs/tiny.yaml with device: cuda), then NCCL:
#    pretraining on the GPU in an NCCL group of one (TEMPER_DIST_BACKEND=nccl, every
#    all-reduce, broadcast and barrier through ProcessGroupNCCL; gradients in 1 MiB buckets
#    reduced while backward runs, TEMPER_DIST_OVERLAP=1, which is off by default on NCCL until
#    this has passed) against the same run without a group — the losses and weights must
#    agree; then the parity ladder's model-core tests
#    (forward, gradients, AdamW, KV cache, bf16, reward head, sampling, DPO) on CUDA against
#    the same checked-in goldens, when the folder holds the parity test binary as `parity`
#    (`cargo test --release --no-run --test parity` prints its path);
# 2. `bench.sh gpu`: GPT-2 small (L12 d768, T1024, B16, bf16 autocast) training tokens/s of
#    temper and PyTorch eager / torch.compile, and generation vs Hugging Face `generate`;
# 3. `bench_dp.sh` on that machine's 16 CPU cores: 1 process against 2 and 4 Gloo ranks;
# 4. the tiny pipeline on that machine's CPU, and the final numbers of both side by side.
# Results go to a few files in OUT (machine.txt, tiny_cuda.log, nccl.log, parity_cuda.log,
# bench_gpu.txt, bench_dp.txt, tiny_cpu.log, summary.txt), written as each part ends, so a run
# cut short still reports what finished; work folders go under WORK (default
# /tmp/temper_gpu_check). Sized for 8 minutes on one H200.
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
# 1b. NCCL: one process through ProcessGroupNCCL against the same process without a group.
cat > "$work/nccl_pretrain.yaml" <<YAML
tokenizer: $work/tiny_cuda/stages/tokenizer/tokenizer.json
data: [$repo/tests/fixtures/tiny/corpus.txt]
model: {arch: gpt2, n_layer: 2, n_head: 2, d_model: 64, max_position: 64}
block_size: 64
steps: 20
batch_size: 8
optim: {lr: 3.0e-3, warmup_steps: 10}
eval_every: 20
save_every: 10
log_every: 5
device: cuda
YAML
{
  rm -rf "$work/nccl_plain" "$work/nccl_group"
  timeout 60 "$bin/temper-pretrain" --config "$work/nccl_pretrain.yaml" --out "$work/nccl_plain"
  echo "plain: exit $?"
  TEMPER_DIST_BACKEND=nccl MASTER_ADDR=127.0.0.1 MASTER_PORT=29533 TEMPER_DIST_TIMEOUT=60 \
    TEMPER_DIST_OVERLAP=1 TEMPER_DIST_BUCKET_MB=1 timeout 90 "$bin/temper-pretrain" --config "$work/nccl_pretrain.yaml" --out "$work/nccl_group"
  echo "nccl group of one: exit $?"
  "$python" - "$work" <<'PY'
import json, pathlib, sys
from safetensors.torch import load_file
work = pathlib.Path(sys.argv[1])
loss = lambda d: [json.loads(l)["loss"] for l in (work / d / "metrics.jsonl").open()
                  if json.loads(l).get("split") == "train"]
a, b = load_file(work / "nccl_plain/checkpoint/model.safetensors"), load_file(
    work / "nccl_group/checkpoint/model.safetensors")
dw = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
dl = max(abs(x - y) for x, y in zip(loss("nccl_plain"), loss("nccl_group")))
print(f"NCCL group of one vs no group on CUDA: largest loss difference {dl:.2e}, "
      f"largest weight difference {dw:.2e} ({'same' if dl < 1e-5 and dw < 1e-4 else 'DIFFERENT'})")
PY
} > "$out/nccl.log" 2>&1
tail -1 "$out/nccl.log" | tee -a "$out/summary.txt"
# 1c. The parity ladder's model-core half on CUDA, fp32, the CPU's tolerances.
if [ -x "$bin/parity" ]; then
  CARGO_MANIFEST_DIR="$repo/tests" TEMPER_TEST_DEVICE=cuda timeout 150 "$bin/parity" \
    --nocapture forward:: sampling:: preference:: > "$out/parity_cuda.log" 2>&1
  echo "parity tests on CUDA: exit $?, $(grep -E '^test result' "$out/parity_cuda.log" | tail -1)" |
    tee -a "$out/summary.txt"
else
  echo "parity tests on CUDA: skipped (no $bin/parity)" | tee -a "$out/summary.txt"
fi
# 2. The benchmark, both sides in one run.
TEMPER_BIN="$bin" PYTHON="$python" timeout 240 bash scripts/bench.sh gpu > "$out/bench_gpu.txt" 2>&1
echo "bench.sh gpu: exit $?" | tee -a "$out/summary.txt"
# 3. Data parallel on this machine's CPU cores: 2 and 4 Gloo ranks against one process.
for n in 2 4; do
  NPROC=$n ROUNDS=1 TEMPER_BIN="$bin" timeout 120 bash scripts/bench_dp.sh >> "$out/bench_dp.txt" 2>&1
  echo "bench_dp.sh with $n ranks: exit $?" | tee -a "$out/summary.txt"
done
# 4. The same pipeline on this machine's CPU, and the two side by side.
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
