#!/usr/bin/env bash
# Regenerate bench/RESULTS.md on this machine: the weight formats, their verification curves, the
# llama.cpp baseline build, then the side-by-side runs on the llama.cpp engine (the default: the
# installed Q4_K_M file), the same on the BF16 file, and the llama.cpp engine against today's torch
# verifier on a few prompts; earlier runs' result files (EARLIER) are rendered after them.
#   bash bench/run_all.sh        (about 2.5 hours on a 2-core machine at the defaults below)
#   LIMIT=20,20 N=128            prompts per dataset and new tokens for the side-by-side run
#   BF16_LIMIT=10 TORCH_LIMIT=4,4 TORCH_N=96   the BF16 run and the engine comparison
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT="${LIMIT:-20,20}"; N="${N:-128}"; DATASETS="${DATASETS:-humaneval,mtbench}"
BF16_LIMIT="${BF16_LIMIT:-10}"; TORCH_LIMIT="${TORCH_LIMIT:-4,4}"; TORCH_N="${TORCH_N:-96}"
results_file() { tail -1 | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["results_file"])'; }
bench() { .venv/bin/dovetail bench --out bench/results "$@" | tee /dev/stderr | results_file; }

.venv/bin/dovetail models install qwen2.5-coder-1.5b --format q4_0,bf16
CURVE="$(.venv/bin/dovetail bench --verify-curve --engine llamacpp,torch --out bench/results | tee /dev/stderr | results_file)"
bash bench/build_llamacpp.sh
# lookup drafts (issue 10): the editing prompts on the default file and on Q4_0, then the prompts that do not repeat
LOOKUP=(--systems target,ngram,ngram+draft,llamacpp,llamacpp-ngram --llamacpp-ngram ngram-mod,ngram-map-k)
FILES=("$(bench "${LOOKUP[@]}" --dataset humaneval-edit --limit "${EDIT_LIMIT:-20}" -n 256)")
FILES+=("$(bench "${LOOKUP[@]}" -m qwen2.5-coder-1.5b:q4_0 --dataset humaneval-edit --limit "${EDIT_Q4_0_LIMIT:-10}" -n 256)")
FILES+=("$(bench "${LOOKUP[@]}" --dataset humaneval,mtbench --limit 10,10 -n 128)")
FILES+=("$(bench --dataset "$DATASETS" --limit "$LIMIT" -n "$N" --systems target,dovetail,llamacpp,llamacpp-spec)")
FILES+=("$(bench -m qwen2.5-coder-1.5b:bf16 --dataset humaneval --limit "$BF16_LIMIT" -n "$N" \
           --systems target,dovetail,llamacpp,llamacpp-spec)")
FILES+=("$(bench --engine llamacpp,torch --systems target,dovetail --dataset "$DATASETS" --limit "$TORCH_LIMIT" -n "$TORCH_N")")
# the server under N concurrent streaming clients (issue 11): the default file, BF16 (a flat verification
# curve: where batching sessions pays on this CPU), and the server's overhead against `dovetail run`
load() { .venv/bin/python bench/load.py --requests-per-stream 2 -md ngram "$@" | results_file; }
LOAD=("$(load --streams 1,2,4,8,16 -n 64 --parallel 16 --check-identity)")
LOAD+=("$(load -m qwen2.5-coder-1.5b:bf16 --streams 1,2,4,8,16 -n 64 --parallel 16 --check-identity)")
LOAD+=("$(load --streams 1 -n 128 --parallel 4 --compare-run 8)")
LOAD+=("$(load -m qwen2.5-coder-1.5b:q4_0 --streams 1,2,4,8 -n 64 --parallel 16)")
LOAD+=("$(load -md qwen2.5-coder-0.5b --streams 1,4 -n 64 --parallel 4)")  # the shared draft model's passes
# the link under 100,000 hostile messages (issue 12): its file is rendered from bench/results/fuzz-*.json
.venv/bin/python bench/fuzz_link.py --messages 100000 --seed 0 >/dev/null
# the same aimed at the model paths (30 % valid STARTs / VERIFYs) on the tests' tiny target, both engines
for engine in llamacpp torch; do
  .venv/bin/python bench/fuzz_link.py --messages 100000 --seed 0 --tiny "$engine" --aim 0.3 >/dev/null
done
NOTES=(); [[ -f bench/NOTES.md ]] && NOTES=(--notes bench/NOTES.md)
# shellcheck disable=SC2086
.venv/bin/python bench/render_results.py --bench "${FILES[@]}" ${EARLIER:-} --curve "$CURVE" --load "${LOAD[@]}" "${NOTES[@]}" > bench/RESULTS.md
echo "wrote bench/RESULTS.md"
