#!/usr/bin/env bash
# Host B (the GPU): draft here, verify on host A.
#   VERIFIER_HOST=10.0.0.5 bash launch/draft_host.sh --prompt "Write a haiku" --chat -n 64
set -euo pipefail
cd "$(dirname "$0")/.."
: "${VERIFIER_HOST:?set VERIFIER_HOST to the verifier host's address}"
exec "${DOVETAIL_VENV:-.venv}/bin/dovetail" generate --verifier "tcp://${VERIFIER_HOST}:${PORT:-5557}" \
  -md "${DRAFT:-qwen2.5-coder-0.5b}" "$@"
