"""Environment throughput: text steps per second under the random-valid-action policy.

Each environment runs the same number of episodes on train task ids, in one process, one after the other;
the time includes reset, step and building the admissible-action list (the base class does it every step,
as a policy needs it). Prints a table, or JSON with --json, with the ratio to the issue's target.

    python bench/envs.py [--episodes 400] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

from fedse.envs.pool import EnvPool
from fedse.envs.registry import env_class, env_names, make_env
from fedse.scripted import random_policy

TARGET = {"babyai": 100, "webshop": 1_000, "textcraft": 1_000, "maze": 1_000, "wordle": 1_000}


def measure(name: str, episodes: int, seed: int = 0) -> dict[str, float]:
    """Steps/s over `episodes` random episodes (after one warm-up episode that fills per-process caches)."""
    train = env_class(name).train_ids
    EnvPool(lambda: make_env(name), [train.start]).run(random_policy(seed))  # warm-up: loads data, indexes
    ids = list(train[1 : 1 + episodes])
    start = time.perf_counter()
    slots = EnvPool(lambda: make_env(name), ids).run(random_policy(seed))
    seconds = time.perf_counter() - start
    steps = sum(len(s.history) for s in slots)
    return {"steps": steps, "seconds": seconds, "steps_per_sec": steps / seconds,
            "target": TARGET.get(name, 0), "ratio_to_target": steps / seconds / TARGET.get(name, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=400)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {name: measure(name, args.episodes) for name in env_names()}
    if args.json:
        print(json.dumps({"envs": results}))
        return
    print(f"{'env':<10} {'steps':>7} {'steps/s':>10} {'target':>7} {'ratio':>6}")
    for name, r in results.items():
        print(f"{name:<10} {r['steps']:>7.0f} {r['steps_per_sec']:>10,.0f} {r['target']:>7} "
              f"{r['ratio_to_target']:>6.1f}")


if __name__ == "__main__":
    main()
