#!/usr/bin/env bash
# Build llama.cpp (a BASELINE to measure against, never a dependency of dovetail_rt) from the
# llama-cpp-python==0.3.36 source distribution into $DOVETAIL_HOME/llama.cpp (default
# ~/.cache/dovetail/llama.cpp). `dovetail bench` finds the binaries there. ~5 min on 2 cores.
set -euo pipefail
HOME_DIR="${DOVETAIL_HOME:-$HOME/.cache/dovetail}"
DEST="$HOME_DIR/llama.cpp"
if [[ -x "$DEST/build/bin/llama-completion" && -x "$DEST/build/bin/llama-speculative-simple" ]]; then
  echo "llama.cpp already built in $DEST"; exit 0
fi
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$WORK" llama-cpp-python==0.3.36
tar -xzf "$WORK"/llama_cpp_python-0.3.36.tar.gz -C "$WORK"
rm -rf "$DEST" && mkdir -p "$HOME_DIR"
mv "$WORK"/llama_cpp_python-0.3.36/vendor/llama.cpp "$DEST"
cd "$DEST"
cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF > build.log
cmake --build build -j"$(nproc)" --target llama-bench llama-completion llama-speculative-simple >> build.log
echo "llama.cpp built in $DEST/build/bin"
