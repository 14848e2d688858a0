#!/bin/bash
# Calibration sweep on validation ids (never test): many quick-profile variants at once, one CPU thread each
# (17 processes: meant for a machine with 16+ cores). Writes $OUT/summary.txt (round, seconds, macro, per-env
# success, per-client explore success / buffer / first and last loss / train seconds) and $OUT/sweep.tgz.
# On the lent device machine the project's wheels were unpacked into /tmp/site; with make setup's .venv on the
# PATH as python3 that entry is harmless.
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/sweep-out}; mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
W=/tmp/sweep; mkdir -p $W
nproc; nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch,transformers,peft;print(torch.__version__,transformers.__version__,peft.__version__, torch.cuda.is_available())"
COMMON="--set federation.eval_split=val --set model.device=cpu --set learner.autocast='off'"
run() { name=$1; m=$2; sd=$3; shift 3; ( timeout ${LIMIT:-480} python3 -m fedse.cli $COMMON "$@" run --profile quick --method $m --seed $sd --out $W/$name > $W/$name.log 2>&1; echo "rc=$?" >> $W/$name.log ) & }
T1="--set policy.eval_temperature=1.0"
run c01_base fedse 0 $T1 --set learner.lr=0.003 --set learner.epochs=2
run c02_lr1e2 fedse 0 $T1 --set learner.lr=0.01 --set learner.epochs=2
run c03_ep4 fedse 0 $T1 --set learner.lr=0.003 --set learner.epochs=4
run c04_lr1e2ep4 fedse 0 $T1 --set learner.lr=0.01 --set learner.epochs=4
run c05_s48 fedse 0 $T1 --set learner.lr=0.003 --set federation.seeds_per_client=48
run c06_lr1e2s48 fedse 0 $T1 --set learner.lr=0.01 --set federation.seeds_per_client=48
run c07_lr1e2ep4s48 fedse 0 $T1 --set learner.lr=0.01 --set learner.epochs=4 --set federation.seeds_per_client=48
run c08_r8 fedse 0 $T1 --set learner.lr=0.01 --set federation.rounds=8 --set federation.explore_episodes=8 --set federation.eval_episodes=5
run c09_central centralized 0 $T1 --set learner.lr=0.01 --set learner.epochs=4 --set federation.seeds_per_client=48
run c10_local local 0 $T1 --set learner.lr=0.01 --set learner.epochs=4 --set federation.seeds_per_client=48
run c11_fedit fedit 0 $T1 --set learner.lr=0.01 --set learner.epochs=4 --set federation.seeds_per_client=48
run c12_T05 fedse 0 --set policy.eval_temperature=0.5 --set learner.lr=0.01 --set learner.epochs=4
run c13_greedy fedse 0 --set learner.lr=0.01 --set learner.epochs=4
run c14_alpha64 fedse 0 $T1 --set learner.lr=0.01 --set model.lora.alpha=64
run c15_c04s1 fedse 1 $T1 --set learner.lr=0.01 --set learner.epochs=4
run c16_c02s1 fedse 1 $T1 --set learner.lr=0.01
# the GPU path: CUDA training and bf16, smoke then the quick profile
( timeout ${LIMIT:-480} python3 -m fedse.cli --set "federation.clients=[textcraft, maze, wordle]" run --profile smoke --method fedse --out $W/g_smoke > $W/g_smoke.log 2>&1; echo "rc=$?" >> $W/g_smoke.log
  timeout 380 python3 -m fedse.cli $T1 --set federation.eval_split=val --set learner.lr=0.01 --set learner.epochs=4 run --profile quick --method fedse --seed 0 --out $W/g_quick > $W/g_quick.log 2>&1; echo "rc=$?" >> $W/g_quick.log ) &
wait
cd $W && for d in */; do d=${d%/}; python3 - "$d" <<'PY'
import json,sys
d=sys.argv[1]
try: m=json.load(open(f"{d}/metrics.json"))
except Exception as e: print(d, "no metrics", e); sys.exit()
for r in m["rounds"]:
    cl={c:(round(s.get("explore_success") or 0,2),s.get("buffer"),round(s.get("loss_first",0),2),round(s.get("loss_last",0),2),round(s.get("train_seconds",0))) for c,s in (r.get("clients") or {}).items()}
    print(d, r["round"], round(r["seconds"]), "macro", round(r["macro"],3), {e:v["success"] for e,v in r["envs"].items()}, cl)
PY
done | tee $OUT/summary.txt
tar czf $OUT/sweep.tgz */metrics.json *.log
