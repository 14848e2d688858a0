#!/usr/bin/env bash
# Issue 26's levers on VALIDATION ids only (never test), tiny base v3, quick profile, run seeds 0-2, two runs at a
# time on 2 CPU cores (one thread each). Each finished run's metrics.json is kept as reports/calibration/v3/<tag>.json;
# an unfinished run (a session ended) is continued with --resume when the script runs again.
#   bash reports/calibration/issue26.sh            # every candidate x seeds 0-2 not yet kept
#   bash reports/calibration/issue26.sh fedse      # only candidates whose name starts with this
#   JOBS=1 bash reports/calibration/issue26.sh      # one run at a time (JOBS, default 2)
# A run holds a lock (flock on $OUT/<tag>.lock) while it works, so a second copy of the script started later (when a
# core frees up) skips the runs the first is doing instead of writing into the same folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 PATH="$PWD/.venv/bin:$PATH"
OUT=${OUT:-.cache/fedse/calibration-v3}; KEEP=reports/calibration/v3; mkdir -p "$OUT" "$KEEP"
# name | method | settings
CANDIDATES="fedse|fedse|
fedit|fedit|
shortest|fedse|--set buffer.keep=shortest
prune|fedse|--set buffer.prune=true
unsolved4|fedse|--set federation.explore_unsolved=true --set federation.explore_attempts=4
owncap1|fedse|--set federation.own_cap=1
combo|fedse|--set buffer.keep=shortest --set buffer.prune=true --set federation.explore_unsolved=true --set federation.explore_attempts=4
exactlr2|fedse|--set aggregation.rule=exact --set aggregation.server_lr=2"
one() {  # name method seed settings...
  local name=$1 method=$2 seed=$3; shift 3
  local tag="$name-s$seed"
  [ -f "$KEEP/$tag.json" ] && return 0
  exec 9>"$OUT/$tag.lock"; flock -n 9 || return 0  # another copy of the script holds this run
  local where=(--out "$OUT/$tag")
  if [ -f "$OUT/$tag/metrics.json" ]; then where=(--resume "$OUT/$tag"); else rm -rf "${OUT:?}/$tag"; fi
  if fedse --set federation.eval_split=val "$@" run --profile quick --method "$method" --seed "$seed" \
       "${where[@]}" >> "$OUT/$tag.log" 2>&1; then
    cp "$OUT/$tag/metrics.json" "$KEEP/$tag.json"; echo "done $tag"
  else echo "FAILED $tag (log $OUT/$tag.log)"; fi
}
export -f one; export OUT KEEP
for seed in 0 1 2; do  # seed-major: an interrupted sweep has every candidate at seed 0 first
  echo "$CANDIDATES" | while IFS='|' read -r name method sets; do
    [[ -z "${1:-}" || $name == "$1"* ]] || continue
    echo "$name $method $seed${sets:+ $sets}"  # no trailing blank: xargs -L would join the next line
  done
done | xargs -P "${JOBS:-2}" -L 1 bash -c 'one "$@"' _
