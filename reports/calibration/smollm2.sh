#!/usr/bin/env bash
# Calibrating the `smollm2` profile (SmolLM2-135M-Instruct, constrained policy) on VALIDATION ids only, on 2 CPU
# cores, one run per core (each `fedse run` acts and trains on one torch thread).
#   bash reports/calibration/smollm2.sh TAG METHOD [--set k=v ...]    one smollm2-profile run on val ids
#   bash reports/calibration/smollm2.sh pair TAG1 "SETS1" TAG2 "SETS2"  two Fed-SE runs side by side
# Each run's metrics.json lands in $OUT/TAG (default /tmp/smollm2-cal) with its log and its wall time; the
# table of every run is in README.md beside this script.
set -euo pipefail
cd "$(dirname "$0")/../.."
source .venv/bin/activate
export OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/smollm2-cal}; mkdir -p "$OUT"

one() {
  local tag=$1 method=$2; shift 2
  rm -rf "${OUT:?}/$tag"
  local began=$SECONDS
  fedse --set federation.eval_split=val "$@" run --profile smollm2 --method "$method" --out "$OUT/$tag" \
    > "$OUT/$tag.log" 2>&1
  echo "$((SECONDS - began))" > "$OUT/$tag.seconds"
  python - "$OUT/$tag/metrics.json" "$tag" "$((SECONDS - began))" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["rounds"]:
    cl = r.get("clients", {})
    print(sys.argv[2], r["round"], "macro %.3f" % r["macro"], {e: round(v["success"], 2) for e, v in r["envs"].items()},
          "explore", {c: round(v["explore_success"] or 0, 2) for c, v in cl.items()},
          "loss", {c: (round(v["loss_first"], 3), round(v["loss_last"], 3)) for c, v in cl.items()},
          "seconds %.0f" % r["seconds"])
print(sys.argv[2], "wall seconds", sys.argv[3])
EOF
}

if [ "$1" = pair ]; then
  # shellcheck disable=SC2086  # the SETS strings are word lists on purpose
  one "$2" fedse $3 > "$OUT/$2.summary" 2>&1 &
  one "$4" fedse $5 > "$OUT/$4.summary" 2>&1 &
  wait
  cat "$OUT/$2.summary" "$OUT/$4.summary"
else
  one "$@"
fi
