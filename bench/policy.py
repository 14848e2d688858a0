"""Action selection: scores equal to the naive scorer, and rollout speed (decisions/s) new vs old per batch size.

Part 1 — greedy episodes run with `ConstrainedPolicy` (prompt KV cache reused across turns, candidates as a
prefix tree, all scored in one forward pass). At every decision the exact inputs are kept, and afterwards the
naive scorer (one padded row per prompt+candidate, no cache) scores the very same decisions on the same model.
Only time spent in scoring is counted on both sides.

Part 2 — exploration rollouts (temperature `policy.temperature`) of `--episodes` train tasks per environment
at each batch size: `fedse.rollout.rollout` (new) against the policy and rollout as they were before the speed
work (`bench/policy_before.py`, old), alternated per (env, batch size) in this one process so that machine
noise hits both; decisions/s counts every action chosen over the whole rollout's wall-clock time
(environment steps included). Both run under `policy.threads`. Old and new sample differently (a generator per
chunk vs episode-keyed Gumbel noise), so they play different episodes of the same tasks: compare decisions/s,
not decision counts. This machine is noisy: read ratios from one run, never absolute numbers across runs.

    python bench/policy.py [--envs textcraft,maze,wordle] [--episodes 64] [--batch-sizes 4,8,16,32,64] [--json]
    python bench/policy.py --set model.tiny.pretrain_steps=0 --set model.tiny.corpus.episodes=100   # random base
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from policy_before import rollout_before
from report import emit

from fedse.config import Config, load_config
from fedse.envs.pool import EnvPool
from fedse.envs.registry import env_class, make_env
from fedse.model import Agent, load_agent
from fedse.policy import ConstrainedPolicy, episode_tokens, score_naive
from fedse.rollout import rollout
from fedse.threads import torch_threads


def against_naive(agent: Agent, cfg: Config, envs: list[str], episodes: int) -> dict[str, Any]:
    """Cached vs naive scoring of the same greedy decisions: speed and the largest log-prob difference."""
    cached_s = naive_s = 0.0
    decisions = 0
    worst = 0.0
    same = True
    for name in envs:
        policy = ConstrainedPolicy(agent, temperature=0.0, seed=0, context=cfg.policy.context,
                                   keep_turns=cfg.policy.history_turns)
        inputs: list[tuple[list[list[int]], list[list[list[int]]], list[torch.Tensor]]] = []

        def act(env_list, slots, policy=policy, inputs=inputs):
            nonlocal cached_s, decisions
            prompts = [episode_tokens(agent, s, policy.budget, True, policy.keep_turns) for s in slots]
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


def rollout_speed(agent: Agent, cfg: Config, envs: list[str], episodes: int, sizes: list[int]) -> dict[str, Any]:
    """Decisions/s of exploration rollouts, new vs old, at every batch size (alternated: old, new)."""
    result: dict[str, Any] = {"threads": cfg.policy.threads or torch.get_num_threads()}
    for name in envs:
        ids = env_class(name).explore_ids()[:episodes]
        for size in sizes:
            spec = cfg.policy.model_copy(update={"batch_size": size})
            with torch_threads(spec.threads):
                start = time.perf_counter()
                old = sum(len(t.turns) for t in rollout_before(agent, name, ids, spec, False, cfg.seed)) / (
                    time.perf_counter() - start)
            played = rollout(agent, name, ids, spec, False, cfg.seed, round=0)
            new = played.pace.per_second
            result |= {f"{name}.b{size}.old_dps": old, f"{name}.b{size}.new_dps": new,
                       f"{name}.b{size}.new_over_old": new / old}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="textcraft,maze,wordle")
    parser.add_argument("--episodes", type=int, default=64, help="train tasks per env in part 2")
    parser.add_argument("--naive-episodes", type=int, default=8, help="episodes per env in part 1 (0: skip)")
    parser.add_argument("--batch-sizes", default="4,8,16,32,64")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override a parameter")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cfg = load_config(args.params, overrides=args.sets)
    agent = load_agent(cfg.model, seed=cfg.seed)
    envs = args.envs.split(",")
    result: dict[str, Any] = {}
    if args.naive_episodes:
        with torch_threads(cfg.policy.threads):
            result |= against_naive(agent, cfg, envs, args.naive_episodes)
    result |= rollout_speed(agent, cfg, envs, args.episodes, [int(b) for b in args.batch_sizes.split(",")])
    emit(result, args.json)


if __name__ == "__main__":
    main()
