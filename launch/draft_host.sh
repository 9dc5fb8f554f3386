#!/usr/bin/env bash
# Host B (the GPU): draft here, verify on host A, over the keyed link (CURVE).
#   VERIFIER_HOST=10.0.0.5 KEYS=~/.dovetail/keys bash launch/draft_host.sh --prompt "Write a haiku" --chat -n 64
# Once: `dovetail keys generate $KEYS --name draft` here (its draft.key goes to host A's authorized/ folder),
# and host A's verifier.key copied to $KEYS/verifier.key.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${VERIFIER_HOST:?set VERIFIER_HOST to the verifier host's address}"
KEYS="${KEYS:-$HOME/.dovetail/keys}"
exec "${DOVETAIL_VENV:-.venv}/bin/dovetail" generate --verifier "tcp://${VERIFIER_HOST}:${PORT:-5557}" \
  -md "${DRAFT:-qwen2.5-coder-0.5b}" --curve-secret-key "$KEYS/draft.key_secret" \
  --curve-server-key "$KEYS/verifier.key" "$@"
