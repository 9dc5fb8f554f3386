#!/usr/bin/env bash
# Run on a machine with an NVIDIA GPU (torch with CUDA installed): bash bench/gpu_check.sh OUT_DIR [TAU]
# Needs pyzmq and transformers>=5.24 importable; wheels placed in .whl/ (git-ignored) are installed first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
exec python3 bench/gpu_check.py "${1:-bench/results}" ${2:-}
