#!/usr/bin/env bash
# Installs what temper needs to build and run: a Python venv with torch 2.11.0 (whose bundled
# libtorch tch 0.24 links against) plus the reference packages the goldens and load checks use
# (transformers, peft, trl, bitsandbytes, vaderSentiment, tensorboard), Debian's chromium for
# the report's browser test (the Rust code needs none of them), and the headers the c10d shim
# compiles against: Debian's libgloo-dev (Gloo) and CUDA 13's crt and cccl wheels (NCCL, whose
# nccl.h comes with torch's own nvidia-nccl).
# The venv lives in a cache keyed by the torch version, outside the clone, so a fresh clone
# (CI) reuses it; `.libtorch` in the repo is a symlink to the wheel's torch/ folder, which
# `.cargo/config.toml` points LIBTORCH and the binaries' rpath at. Idempotent: a second run
# only checks and returns in seconds.
set -euo pipefail

TORCH_VERSION=2.11.0
# Reference packages, pinned; changing one changes the stamp, so the next run installs it.
REFERENCE="transformers==4.57.1 peft==0.21.2 trl==1.16.0 bitsandbytes==0.50.2 vaderSentiment==3.3.2 tensorboard==2.20.0"
# Headers only (3 MB), for ProcessGroupNCCL.hpp: crates/core/build.rs compiles NCCL in when
# they are there, and temper runs without a GPU either way.
NCCL_HEADERS="nvidia-cuda-crt==13.0.* nvidia-cuda-cccl==13.0.*"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${TEMPER_CACHE:-$HOME/.cache/temper}
venv=$cache/torch-$TORCH_VERSION/venv
stamp=$venv/.temper-ready-$(echo "$TORCH_VERSION $REFERENCE $NCCL_HEADERS" | sha256sum | cut -c1-16)

if [ ! -f "$stamp" ]; then
  echo "setup: installing into $venv (torch $TORCH_VERSION, ~4.6 GB on first run)" >&2
  mkdir -p "$(dirname "$venv")"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  # --no-cache-dir: pip's wheel cache would hold a second copy of torch's ~4 GB on disk.
  "$venv/bin/python" -m pip install -q --no-cache-dir --upgrade pip
  # shellcheck disable=SC2086 # REFERENCE and NCCL_HEADERS are lists of requirements
  "$venv/bin/python" -m pip install -q --no-cache-dir "torch==$TORCH_VERSION" $REFERENCE $NCCL_HEADERS safetensors numpy
  "$venv/bin/python" -c "import torch, transformers, peft, trl, vaderSentiment; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__"
  touch "$stamp"
fi

torch_dir=$("$venv/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__))')
ln -sfn "$torch_dir" "$repo/.libtorch"
ln -sfn "$venv" "$repo/.venv"
echo "setup: libtorch at $torch_dir" >&2

# gloo's headers (Debian's libgloo-dev, headers only: every symbol comes from libtorch_cpu) to
# compile the c10d shim behind data-parallel training; the build stops without them.
if [ ! -f /usr/include/gloo/config.h ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  echo "setup: installing libgloo-dev (headers for the c10d shim)" >&2
  if ! { $sudo apt-get install -y -q --no-install-recommends libgloo-dev >/dev/null 2>&1 ||
    { $sudo apt-get update -q >/dev/null 2>&1 &&
      $sudo apt-get install -y -q --no-install-recommends libgloo-dev >/dev/null 2>&1; }; }; then
    echo "setup: could not install libgloo-dev (apt-get install libgloo-dev); temper cannot build without gloo's headers" >&2
    exit 1
  fi
fi

# Headless Chromium for the test that opens `temper report` in a real browser (tests/report.rs);
# Debian's package, ~20 s once. Not fatal: without it that test says it skipped its browser half.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  echo "setup: installing chromium (for the report's browser test)" >&2
  if ! { $sudo apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 ||
    { $sudo apt-get update -q >/dev/null 2>&1 &&
      $sudo apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; }; then
    echo "setup: could not install chromium; the report's browser check will be skipped" >&2
  fi
fi
