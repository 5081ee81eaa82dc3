#!/usr/bin/env bash
# ECAD driven by the agreement quality on a lent GPU, as one short deadline-bound command
# (issue 8). Accuracy-driven searches over-rate their picks by 1-3 points (selection on a noisy
# pass/fail rate: docs/acceleration.md "A search at CFG 2.25 and a three-stage pick"). Agreement
# (mean PSNR of each image to the uncached image of the same prompt and seed, capped at 40 dB)
# has far less variance, and selecting on it does not touch the accuracy noise, so its picks'
# test accuracy is an unbiased estimate without a re-scoring stage.
# 1. search-cache --quality agreement at the model's scale (2.5: the reference images are the
#    baseline the bar is measured against), window 2.5-2.9x, PROMPTS validation prompts from
#    CAL_FIRST, seeded from the confirmed H200 front, the shipped schedules and v9.
# 2. Its best-agreement points at >= 2.5x / 2.6x / 2.75x on the TEST test prompts at 2.5 and at
#    2.25, against the H200's stored no-cache verdicts (2.5).
#   there:  bash recipes/gpu/ecad_agreement.sh   (device tool: carry [".gpu", ".whl"])
#   smoke test here: DEVICE=cpu PROMPTS=4 TEST=4 POPULATION=4 SEARCH_MINUTES=0.05 DEADLINE_S=600 \
#                    OUT=/tmp/a WORK=/tmp/a/work bash recipes/gpu/ecad_agreement.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$SECONDS
RESULTS=${RESULTS:-$OUT}
WORK=${WORK:-runs/gpu-ecad-agreement}
DEVICE=${DEVICE:-cuda}
PROMPTS=${PROMPTS:-512}
CAL_FIRST=${CAL_FIRST:-17000}
TEST=${TEST:-2400}
POPULATION=${POPULATION:-24}
SEARCH_MINUTES=${SEARCH_MINUTES:-1.3}
DEADLINE_S=${DEADLINE_S:-175}
PREV=benchmarks/results
mkdir -p "$WORK" "$RESULTS"
LOG="$RESULTS/ecad-agreement.log"
source recipes/gpu/stages.sh ecad-agreement  # finish/trap, left, stage, carried packages
stage search python3 -m pixforge.cli search-cache --device "$DEVICE" --precision fp32 --quality agreement --cfg 2.5 \
    --cfg-cache --prompts "$PROMPTS" --first-prompt "$CAL_FIRST" --population "$POPULATION" --mutation 0.02 \
    --random-fraction 0.25 --min-speedup 2.5 --max-speedup 2.9 --generations 100 --time-budget-minutes "$SEARCH_MINUTES" \
    --seed-from "$PREV/gpu-h200-cfg2.25/confirmed_pareto.json" --seed-from src/pixforge/assets/default/cache/ecad.json \
    --seed-from src/pixforge/assets/default/cache/ecad-fast.json --seed-from "$PREV/gpu-h200-cfg2.25/rescored_pareto.json" \
    --seed-from "$PREV/ecad_v9_pareto.json" --out "$WORK/agree"
[ -f "$WORK/agree/pareto.json" ] || exit 1
for CFG in 2.5 2.25; do
    stage "test at $CFG" python3 benchmarks/cache.py --device "$DEVICE" --prompts "$TEST" --repeats 1 --batch 600 \
        --cfg "$CFG" --baseline-from "$PREV/gpu-h200-2026-11-28/search1_test2400.json" --policies none \
        --ecad "$WORK/agree/pareto.json" --ecad-speedups 2.5,2.6,2.75 --out "$WORK/test_cfg$CFG.json" \
        --plot "$WORK/test_cfg$CFG.png"
done
