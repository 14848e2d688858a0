"""Constrained acting: walking down the candidate tree (`policy.walk_nodes`) against scoring every candidate.

Part 1 — exploration rollouts of `--episodes` train tasks per environment, the same episode keys, the same
adapter, played twice in this one process: scoring every admissible action in one forward (walk_nodes null)
and walking down the tree (walk_nodes as given), alternated per environment so that machine noise hits both.
decisions/s counts every action chosen over the rollout's wall clock (environment steps included), and
GFLOP/decision comes from torch's FLOP counter on a second, identical rollout. At temperature 1 both draw from
one distribution with other draws, so they play other episodes of the same tasks: compare decisions/s and
success rates, not decision counts.

Part 2 (`--round PROFILE`) — one round of that profile in process (one thread), from the same fresh adapter,
scoring and then walking: seconds and the round's macro success on the evaluation tasks.

    python bench/walk.py [--envs textcraft,maze,wordle] [--episodes 32] [--walk-nodes 64] [--round quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bound import counted, timed
from report import emit

from fedse.config import load_config
from fedse.envs.registry import env_class
from fedse.model import adapter_state, load_agent, set_adapter_state
from fedse.rollout import rollout
from fedse.threads import torch_threads


def acting(agent: Any, cfg: Any, envs: list[str], episodes: int, walk_nodes: int) -> dict[str, float]:
    """Per env and overall: decisions/s, GFLOP/decision and success, scored then walked, and walked / scored."""
    out: dict[str, float] = {}
    totals = {"score": [0.0, 0.0, 0.0], "walk": [0.0, 0.0, 0.0]}  # seconds, decisions, flops
    for name in envs:
        ids = env_class(name).explore_ids()[:episodes]
        for how, nodes in (("score", None), ("walk", walk_nodes)):
            policy = cfg.policy.model_copy(update={"walk_nodes": nodes})

            def play(policy=policy, name=name, ids=ids):
                return rollout(agent, name, ids, policy, False, cfg.seed, round=0)

            flops, _ = counted(play)
            seconds, played = timed(play)
            decisions = played.pace.decisions
            out[f"{name}.{how}.decisions_per_sec"] = decisions / seconds
            out[f"{name}.{how}.gflop_per_decision"] = flops / decisions / 1e9
            out[f"{name}.{how}.success"] = sum(t.success for t in played) / len(ids)
            for k, v in enumerate((seconds, decisions, flops)):
                totals[how][k] += v
        out[f"{name}.walk_over_score"] = (out[f"{name}.walk.decisions_per_sec"]
                                          / out[f"{name}.score.decisions_per_sec"])
    for how, (seconds, decisions, flops) in totals.items():
        out[f"all.{how}.decisions_per_sec"] = decisions / seconds
        out[f"all.{how}.gflop_per_decision"] = flops / decisions / 1e9
    out["all.walk_over_score"] = out["all.walk.decisions_per_sec"] / out["all.score.decisions_per_sec"]
    return out


def round_time(params: str, profile: str, walk_nodes: int) -> dict[str, Any]:
    """One round of `profile`, scoring then walking, from the same fresh adapter: seconds and macro success."""
    from fedse.federation import Federation

    scratch = Path(tempfile.mkdtemp(prefix="fedse-walk-"))
    out: dict[str, Any] = {}
    agent = fresh = None
    try:
        for how, nodes in (("score", "null"), ("walk", str(walk_nodes))):
            cfg = load_config(params, profile=profile, overrides=[
                "federation.rounds=1", "policy.threads=1", "learner.threads=1", f"policy.walk_nodes={nodes}",
                f"transport.dir={scratch / 'exchange' / how}"])
            if agent is None:  # one model for both rounds: only the policy setting differs
                agent = load_agent(cfg.model, seed=cfg.seed)
                fresh = adapter_state(agent)
            set_adapter_state(agent, fresh)
            with torch_threads(1):
                start = time.perf_counter()
                Federation(agent, cfg, scratch / how).run()
                out[f"round.{profile}.{how}.seconds"] = time.perf_counter() - start
            record = json.loads((scratch / how / "metrics.json").read_text())["rounds"][-1]
            out[f"round.{profile}.{how}.macro"] = record["macro"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out[f"round.{profile}.score_over_walk_seconds"] = (out[f"round.{profile}.score.seconds"]
                                                       / out[f"round.{profile}.walk.seconds"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="textcraft,maze,wordle")
    parser.add_argument("--episodes", type=int, default=32, help="explored train tasks per env")
    parser.add_argument("--walk-nodes", type=int, default=64, help="walk a decision whose tree has more tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None, help="a params.yaml profile [the file's own]")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override a parameter")
    parser.add_argument("--round", default=None, help="also time one round of this profile each way")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cfg = load_config(args.params, profile=args.profile, overrides=[*args.sets, "policy.mode=constrained",
                                                                      "policy.score=trie"])
    agent = load_agent(cfg.model, seed=cfg.seed)
    result: dict[str, Any] = {"model": agent.name, "threads": args.threads, "walk_nodes": args.walk_nodes,
                              "episodes_per_env": args.episodes}
    with torch_threads(args.threads):
        result |= acting(agent, cfg, args.envs.split(","), args.episodes, args.walk_nodes)
    if args.round:
        result |= round_time(args.params, args.round, args.walk_nodes)
    emit(result, args.json)


if __name__ == "__main__":
    main()
