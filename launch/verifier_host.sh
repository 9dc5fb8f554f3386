#!/usr/bin/env bash
# Host A (strong CPU): serve the target to draft hosts on the network.
#   PORT=5557 bash launch/verifier_host.sh [-t THREADS] [--numa-node N] [--dtype bfloat16]
# Binds 0.0.0.0: the link is not authenticated, so use it only on a trusted network (or a tunnel).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${DOVETAIL_VENV:-.venv}/bin/dovetail" verifier -m "${MODEL:-qwen2.5-coder-1.5b}" \
  --listen "tcp://${BIND:-0.0.0.0}:${PORT:-5557}" "$@"
