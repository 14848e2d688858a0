"""Action selection: the cached constrained policy vs padded batch scoring of prompt+candidate, same decisions.

Greedy episodes run with `ConstrainedPolicy` (prompt KV cache reused across turns, every candidate scored in
one forward pass). At every decision the exact inputs are kept, and afterwards the naive scorer (one padded
row per prompt+candidate, no cache) scores the very same decisions on the same model. Only time spent in
scoring is counted on both sides; both run in this process, one after the other.

    python bench/policy.py [--envs maze,wordle,textcraft,webshop,babyai] [--episodes 8] [--json]
"""

from __future__ import annotations

import argparse
import time

import torch
from report import emit

from fedse.config import load_config
from fedse.envs.pool import EnvPool
from fedse.envs.registry import make_env
from fedse.model import load_agent
from fedse.policy import ConstrainedPolicy, episode_tokens, score_naive


def run(envs: list[str], episodes: int, params: str) -> dict[str, float]:
    cfg = load_config(params)
    agent = load_agent(cfg.model, seed=cfg.seed)
    cached_s = naive_s = 0.0
    decisions = 0
    worst = 0.0
    same = True
    for name in envs:
        policy = ConstrainedPolicy(agent, temperature=0.0, seed=0, context=cfg.policy.context)
        inputs: list[tuple[list[list[int]], list[list[list[int]]], list[torch.Tensor]]] = []

        def act(env_list, slots, policy=policy, inputs=inputs):
            nonlocal cached_s, decisions
            prompts = [episode_tokens(agent, s, policy.budget, True) for s in slots]
            cands = [[agent.renderer.candidate(a) for a in s.info["admissible_actions"]] for s in slots]
            start = time.perf_counter()
            actions = policy(env_list, slots)
            cached_s += time.perf_counter() - start
            decisions += len(slots)
            inputs.append((prompts, cands, policy.last_scores))
            return actions

        EnvPool(lambda name=name: make_env(name), list(range(episodes))).run(act)
        for prompts, cands, cached in inputs:
            start = time.perf_counter()
            naive = score_naive(agent, prompts, cands)
            naive_s += time.perf_counter() - start
            for a, b in zip(cached, naive, strict=True):
                worst = max(worst, float((a - b).abs().max()))
                same &= int(a.argmax()) == int(b.argmax())
    return {"speedup_cached_vs_naive": naive_s / cached_s, "decisions": decisions,
            "decisions_per_sec_cached": decisions / cached_s, "decisions_per_sec_naive": decisions / naive_s,
            "max_abs_logprob_diff": worst, "same_decisions": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="maze,wordle,textcraft,webshop,babyai")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    emit(run(args.envs.split(","), args.episodes, args.params), args.json)


if __name__ == "__main__":
    main()
