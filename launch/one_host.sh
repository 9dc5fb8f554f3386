#!/usr/bin/env bash
# Both processes on this host: the verifier (target, CPU) as a child, the draft side here.
#   bash launch/one_host.sh --prompt "def quicksort(arr):" -n 64 [any `dovetail run` option]
# Uses the default pair unless -m / -md are given (install it once: .venv/bin/dovetail models install).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${DOVETAIL_VENV:-.venv}/bin/dovetail" run "$@"
