"""Held-out evaluation: episodes on an environment's test tasks (greedy, or at `policy.eval_temperature`), with
uncertainty.

Every task may be played `eval.passes` times (different draws of the sampling noise, see `fedse.policy`); an
environment's success is the mean over all its episodes, and each task's own mean over its passes is kept
(`task_ids`, `task_success`) so that two adapters scored on the same draws can be compared task by task.

Micro average weights environments by their test-set sizes (the paper's "Avg"); macro weighs each
environment equally. Intervals (95%) treat the *task* as the unit, because the passes of one task are
correlated (same task, same adapter): with one pass per task the Wilson score interval of the success
proportion (sensible at 0% and 100%); with several, a normal interval of the mean of the per-task means. The
macro interval is a normal interval with the same per-environment variances.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from fedse.trajectory import Trajectory

Z95 = 1.959963984540054


@dataclass(frozen=True)
class EnvScore:
    """One environment's evaluation: `n` tasks, each played `passes` times (`episodes` in all).

    `decisions` and `seconds` say how many actions the rollout chose and how long it took (its pace).
    """

    success: float
    reward: float
    n: int
    ci_low: float
    ci_high: float
    task_ids: tuple[int, ...] = ()
    task_success: tuple[float, ...] = ()
    passes: int = 1
    episodes: int | None = None
    decisions: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {"success": self.success, "reward": self.reward, "n": self.n, "ci95": [self.ci_low, self.ci_high],
                "task_ids": list(self.task_ids), "task_success": list(self.task_success), "passes": self.passes,
                "episodes": self.n * self.passes if self.episodes is None else self.episodes}

    def variance(self) -> float:
        """Variance of `success` with tasks as the unit: the sample variance of the per-task means over n
        when passes > 1 (passes of a task are correlated, so episodes are not independent), else binomial over
        the n tasks (also where the task means do not vary at all, as in `task_interval`)."""
        if self.passes > 1 and len(self.task_success) > 1 and statistics.pvariance(self.task_success) > 0:
            return statistics.variance(self.task_success) / len(self.task_success)
        return self.success * (1 - self.success) / self.n if self.n else 0.0


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at p = 0 or 1 one end is exactly 0 or 1; rounding would leave it a hair inside, excluding p itself
    low = 0.0 if p <= 0 else max(0.0, min(p, centre - half))
    high = 1.0 if p >= 1 else min(1.0, max(p, centre + half))
    return low, high


def task_interval(task_success: list[float], passes: int, z: float = Z95) -> tuple[float, float]:
    """95% interval of the mean success over tasks.

    One pass: Wilson over the tasks. Several: a normal interval of the mean of per-task means, clipped to
    [0, 1] (tasks are independent, passes of one task are not). Where the task means do not vary at all (every
    task at 0 or 1, say) that interval would have no width, so Wilson over the tasks stands in: no claim of
    certainty from a handful of tasks.
    """
    n = len(task_success)
    mean = sum(task_success) / n if n else 0.0
    if passes <= 1 or n < 2 or statistics.pvariance(task_success) == 0:
        return wilson(mean * n, n, z)
    half = z * math.sqrt(statistics.variance(task_success) / n)
    return max(0.0, mean - half), min(1.0, mean + half)


def score(trajectories: list[Trajectory], decisions: int = 0, seconds: float = 0.0) -> EnvScore:
    """Success, reward and interval of one environment's episodes, grouped by task (in first-played order)."""
    by_task: dict[int, list[bool]] = {}
    for t in trajectories:
        by_task.setdefault(t.task_id, []).append(t.success)
    ids = tuple(by_task)
    means = tuple(sum(wins) / len(wins) for wins in by_task.values())
    passes = max((len(wins) for wins in by_task.values()), default=1)
    episodes = len(trajectories)
    success = sum(t.success for t in trajectories) / episodes if episodes else 0.0
    reward = sum(t.reward for t in trajectories) / episodes if episodes else 0.0
    low, high = task_interval(list(means), passes)
    return EnvScore(success, reward, len(ids), low, high, ids, means, passes, episodes, decisions, seconds)


def summarise(per_env: dict[str, EnvScore]) -> dict[str, object]:
    """The `fedse eval --json` object (and a round's evaluation record): per env, micro and macro averages, the
    macro interval, and the evaluation's pace (`eval_decisions`, `eval_seconds`, summed over envs)."""
    total = sum(s.n for s in per_env.values())
    micro = sum(s.success * s.n for s in per_env.values()) / total if total else 0.0
    macro = sum(s.success for s in per_env.values()) / len(per_env) if per_env else 0.0
    var = sum(s.variance() for s in per_env.values()) / max(1, len(per_env)) ** 2
    half = Z95 * math.sqrt(var)
    return {"envs": {k: v.as_dict() for k, v in per_env.items()}, "micro": micro, "macro": macro,
            "macro_ci95": [max(0.0, macro - half), min(1.0, macro + half)],
            "eval_decisions": sum(s.decisions for s in per_env.values()),
            "eval_seconds": sum(s.seconds for s in per_env.values())}
