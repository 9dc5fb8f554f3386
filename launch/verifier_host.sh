#!/usr/bin/env bash
# Host A (strong CPU): serve the target to draft hosts on the network, with keys (CURVE).
#   KEYS=~/.dovetail/keys PORT=5557 bash launch/verifier_host.sh [-t THREADS] [--numa-node N]
# Once: `dovetail keys generate $KEYS --name verifier` here; copy $KEYS/verifier.key to each draft host,
# and each draft host's draft.key into $KEYS/authorized/. Only those draft hosts are served.
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS="${KEYS:-$HOME/.dovetail/keys}"
exec "${DOVETAIL_VENV:-.venv}/bin/dovetail" verifier -m "${MODEL:-qwen2.5-coder-1.5b}" \
  --listen "tcp://${BIND:-0.0.0.0}:${PORT:-5557}" \
  --curve-secret-key "$KEYS/verifier.key_secret" --authorized-keys "$KEYS/authorized" "$@"
