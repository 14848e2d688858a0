#!/usr/bin/env bash
# Issue 13's levers, measured on VALIDATION ids only (never test), on 2 CPU cores, two runs at a time.
#   bash reports/calibration/levers.sh base  [MODEL_DIR|""] [--set k=v ...]   base success, sampled (T=1) and
#        greedy, 25 val tasks x 2 passes ("" = the configured base, e.g. with --set model.tiny.layers=6)
#   bash reports/calibration/levers.sh loop  TAG METHOD [--set k=v ...]   one quick-profile run on val ids
# Loop runs use the quick profile as shipped (64 explored tasks and 16 seeds per client, 2 evaluation passes);
# their metrics.json land in $OUT/TAG (default /tmp/levers). README.md in this folder has every result.
set -euo pipefail
cd "$(dirname "$0")/../.."
source .venv/bin/activate
export OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/levers}; mkdir -p "$OUT"
what=$1; shift
case $what in
  base)
    sets=(--set 'envs.names=[textcraft,maze,wordle]')
    if [ $# -gt 0 ]; then
      if [ -n "$1" ]; then sets+=(--set "model.preset=$1" --set policy.mode=constrained); fi
      shift
    fi
    for T in 1.0 0; do
      fedse "${sets[@]}" "$@" --set policy.eval_temperature=$T eval --env all --split val --episodes 25 --passes 2 \
        --json > "$OUT/base-T$T.json"
      python -c "import json,sys; d=json.load(open(sys.argv[1])); print('T=$T', {k: round(v['success'], 3) for k, v in d['envs'].items()}, 'macro', round(d['macro'], 3))" "$OUT/base-T$T.json"
    done ;;
  loop)
    tag=$1; method=$2; shift 2
    rm -rf "${OUT:?}/$tag"
    fedse --set federation.eval_split=val "$@" run --profile quick --method "$method" --out "$OUT/$tag" \
      > "$OUT/$tag.log" 2>&1
    python - "$OUT/$tag/metrics.json" "$tag" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["rounds"]:
    cl = r.get("clients", {})
    print(sys.argv[2], r["round"], "macro %.3f" % r["macro"], {e: round(v["success"], 2) for e, v in r["envs"].items()},
          "explore", {c: round(v["explore_success"] or 0, 2) for c, v in cl.items()},
          "agg_error", r.get("aggregation", {}).get("agg_error"), "seconds %.0f" % r["seconds"])
EOF
    ;;
  *) echo "usage: levers.sh base [MODEL_DIR] | loop TAG METHOD [--set k=v ...]" >&2; exit 2 ;;
esac
