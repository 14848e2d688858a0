"""`fedse envs check`: is every environment solvable, hard for chance, and fast enough?

Expert success near 1 proves the test tasks are solvable within the turn limit; random-valid-action success
is compared with the paper's anchors (a task a random agent solves tells us nothing about learning). Both come
with a 95 % Wilson interval whose unit is the task (the random policy's success on a task is its mean over
RANDOM_REPEATS passes): a test set tells a trained agent from random play only where the two intervals part.
"""

from __future__ import annotations

import time
from typing import Any

from fedse.envs.pool import EnvPool, Slot
from fedse.envs.registry import env_class, make_env
from fedse.evaluate import wilson
from fedse.scripted import expert_policy, random_policy

RANDOM_REPEATS = 4  # random passes over the same tasks, averaged: 25 tasks alone move in steps of 0.04


def play(env_name: str, task_ids: list[int], act: Any, options: dict[str, Any]) -> tuple[list[Slot], float]:
    """Every episode of one policy over the given tasks, and the seconds it took."""
    start = time.perf_counter()
    pool = EnvPool(lambda: make_env(env_name, **options), task_ids)
    slots = pool.run(act)
    return slots, time.perf_counter() - start


def success_rate(env_name: str, task_ids: list[int], act: Any, options: dict[str, Any]) -> tuple[float, int, float]:
    """(success rate, env steps taken, seconds) for one policy over the given tasks."""
    slots, seconds = play(env_name, task_ids, act, options)
    steps = sum(len(s.history) for s in slots)
    return sum(bool(s.info["success"]) for s in slots) / len(slots), steps, seconds


def check_env(env_name: str, episodes: int, seed: int = 0,
              options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Expert and random success on the first `episodes` test tasks (Wilson intervals over the tasks), the
    expert's mean turns, and steps/s under the random policy."""
    options = options or {}
    test = env_class(env_name).test_ids
    ids = list(test[: min(episodes, len(test))])
    expert, _ = play(env_name, ids, expert_policy(), options)
    wins, steps, seconds = 0, 0, 0.0
    for repeat in range(RANDOM_REPEATS):
        slots, s = play(env_name, ids, random_policy(seed + repeat), options)
        wins += sum(bool(x.info["success"]) for x in slots)
        steps += sum(len(x.history) for x in slots)
        seconds += s
    expert_wins = sum(bool(x.info["success"]) for x in expert)
    random_rate = wins / (len(ids) * RANDOM_REPEATS)
    return {
        "tasks": len(ids),
        "expert_success": expert_wins / len(ids),
        "expert_ci95": list(wilson(expert_wins, len(ids))),
        "expert_turns": sum(len(x.history) for x in expert) / len(ids),
        "random_success": random_rate,
        "random_ci95": list(wilson(random_rate * len(ids), len(ids))),
        "steps_per_sec": steps / seconds if seconds else 0.0,
    }
