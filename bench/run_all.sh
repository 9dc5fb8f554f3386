#!/usr/bin/env bash
# Regenerate bench/RESULTS.md on this machine: the verification curve, the llama.cpp baseline build,
# then every system on HumanEval, MT-Bench and held-out ShareGPT, side by side in one run.
#   LIMIT=20 N=128 bash bench/run_all.sh        (about 2 hours on a 2-core machine at these settings)
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT="${LIMIT:-20}"; N="${N:-128}"; DATASETS="${DATASETS:-humaneval,mtbench,sharegpt}"
HOME_DIR="${DOVETAIL_HOME:-$HOME/.cache/dovetail}"
HEADS="${HEADS:-$(ls -d "$HOME_DIR"/heads/*/ 2>/dev/null | sed 's#/$##' | paste -sd, - || true)}"
.venv/bin/dovetail bench --verify-curve --out bench/results
bash bench/build_llamacpp.sh
.venv/bin/dovetail bench --dataset "$DATASETS" --limit "$LIMIT" -n "$N" ${HEADS:+--head "$HEADS"} --out bench/results
NOTES=(); [[ -f bench/NOTES.md ]] && NOTES=(--notes bench/NOTES.md)
.venv/bin/python bench/render_results.py "${NOTES[@]}" > bench/RESULTS.md
echo "wrote bench/RESULTS.md"
