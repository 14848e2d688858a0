"""`fedse envs check`: is every environment solvable, hard for chance, and fast enough?

Expert success near 1 proves the test tasks are solvable within the turn limit; random-valid-action success
is compared with the paper's anchors (a task a random agent solves tells us nothing about learning).
"""

from __future__ import annotations

import time
from typing import Any

from fedse.envs.pool import EnvPool
from fedse.envs.registry import env_class, make_env
from fedse.scripted import expert_policy, random_policy

RANDOM_REPEATS = 4  # random passes over the same tasks, averaged: 25 tasks alone move in steps of 0.04


def success_rate(env_name: str, task_ids: list[int], act: Any, options: dict[str, Any]) -> tuple[float, int, float]:
    """(success rate, env steps taken, seconds) for one policy over the given tasks."""
    start = time.perf_counter()
    pool = EnvPool(lambda: make_env(env_name, **options), task_ids)
    slots = pool.run(act)
    seconds = time.perf_counter() - start
    steps = sum(len(s.history) for s in slots)
    return sum(bool(s.info["success"]) for s in slots) / len(slots), steps, seconds


def check_env(env_name: str, episodes: int, seed: int = 0,
              options: dict[str, Any] | None = None) -> dict[str, float]:
    """Expert and random success on the first `episodes` test tasks, and steps/s under the random policy."""
    options = options or {}
    test = env_class(env_name).test_ids
    ids = list(test[: min(episodes, len(test))])
    expert, _, _ = success_rate(env_name, ids, expert_policy(), options)
    rates, steps, seconds = [], 0, 0.0
    for repeat in range(RANDOM_REPEATS):
        rate, n, s = success_rate(env_name, ids, random_policy(seed + repeat), options)
        rates.append(rate)
        steps += n
        seconds += s
    return {
        "expert_success": expert,
        "random_success": sum(rates) / len(rates),
        "steps_per_sec": steps / seconds if seconds else 0.0,
    }
