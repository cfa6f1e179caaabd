#!/usr/bin/env bash
# Installs what temper needs to build and run: a Python venv with torch 2.11.0 (whose bundled
# libtorch tch 0.24 links against) plus transformers for the reference scripts.
# The venv lives in a cache keyed by the torch version, outside the clone, so a fresh clone
# (CI) reuses it; `.libtorch` in the repo is a symlink to the wheel's torch/ folder, which
# `.cargo/config.toml` points LIBTORCH and the binaries' rpath at. Idempotent: a second run
# only checks and returns in seconds.
set -euo pipefail

TORCH_VERSION=2.11.0
TRANSFORMERS_VERSION=4.57.1
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${TEMPER_CACHE:-$HOME/.cache/temper}
venv=$cache/torch-$TORCH_VERSION/venv
stamp=$venv/.temper-ready-$TORCH_VERSION-$TRANSFORMERS_VERSION

if [ ! -f "$stamp" ]; then
  echo "setup: creating $venv (torch $TORCH_VERSION, ~4.6 GB on first run)" >&2
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION" \
    safetensors numpy
  "$venv/bin/python" -c "import torch, transformers; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__"
  touch "$stamp"
fi

torch_dir=$("$venv/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__))')
ln -sfn "$torch_dir" "$repo/.libtorch"
ln -sfn "$venv" "$repo/.venv"
echo "setup: libtorch at $torch_dir" >&2
