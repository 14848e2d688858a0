#!/usr/bin/env bash
# Pretrained SmolLM2-135M on every environment's whole test set (seed 0, one sampled pass, constrained policy),
# one environment per process so that each finished environment is kept (reports/envs/pretrained-smollm2-<env>.json)
# and a rerun does only the missing ones; JOBS at a time (default 2, one thread each). About 35 CPU-min for BabyAI's
# 90 tasks on this machine; WebShop's 200 take longer.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
for env in ${ENVS:-maze wordle textcraft babyai webshop}; do
  out=reports/envs/pretrained-smollm2-$env.json
  [ -s "$out" ] || echo "$env"
done | xargs -P "${JOBS:-2}" -I{} sh -c '.venv/bin/fedse --set model.preset=smollm2-135m --set policy.mode=constrained \
  --set policy.batch_size=8 --set policy.threads=1 eval --env {} --json --passes 1 --split test \
  > reports/envs/.pretrained-smollm2-{}.tmp 2>> .cache/fedse/smollm2-eval.log \
  && mv reports/envs/.pretrained-smollm2-{}.tmp reports/envs/pretrained-smollm2-{}.json && echo "done {}"'
