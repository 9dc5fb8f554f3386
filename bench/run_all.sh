#!/usr/bin/env bash
# Regenerate bench/RESULTS.md on this machine: the verification curve, the llama.cpp baseline build,
# every system on HumanEval, MT-Bench and held-out ShareGPT side by side in one run, then the draft
# heads' tree-size sweep against the 0.5B draft at the same tree sizes.
#   bash bench/run_all.sh        (about 2 hours on a 2-core machine at the defaults below)
#   LIMIT=20,20,5 N=128          prompts per dataset and new tokens for the side-by-side run
#   SWEEP_LIMIT=2 SWEEP_N=64 TREES=4:5:4,4:5:8,4:5:16,4:5:32 HEADS=dir,dir   the sweep (skipped without heads)
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT="${LIMIT:-20,20,5}"; N="${N:-128}"; DATASETS="${DATASETS:-humaneval,mtbench,sharegpt}"
SWEEP_LIMIT="${SWEEP_LIMIT:-2}"; SWEEP_N="${SWEEP_N:-64}"; TREES="${TREES:-4:5:4,4:5:8,4:5:16,4:5:32}"
HOME_DIR="${DOVETAIL_HOME:-$HOME/.cache/dovetail}"
HEADS="${HEADS:-$(ls -d "$HOME_DIR"/heads/*/ 2>/dev/null | sed 's#/$##' | paste -sd, - || true)}"
results_file() { tail -1 | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["results_file"])'; }

.venv/bin/dovetail bench --verify-curve --out bench/results
bash bench/build_llamacpp.sh
FILES=("$(.venv/bin/dovetail bench --dataset "$DATASETS" --limit "$LIMIT" -n "$N" --out bench/results | tee /dev/stderr | results_file)")
if [[ -n "$HEADS" ]]; then
  FILES+=("$(.venv/bin/dovetail bench --systems target,dovetail --dataset "$DATASETS" --limit "$SWEEP_LIMIT" -n "$SWEEP_N" \
             --head "$HEADS" --trees "$TREES" --cost-model off --out bench/results | tee /dev/stderr | results_file)")
fi
NOTES=(); [[ -f bench/NOTES.md ]] && NOTES=(--notes bench/NOTES.md)
.venv/bin/python bench/render_results.py --bench "${FILES[@]}" "${NOTES[@]}" > bench/RESULTS.md
echo "wrote bench/RESULTS.md"
