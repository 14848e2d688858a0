"""Held-out evaluation: episodes on an environment's test tasks (greedy, or at `policy.eval_temperature`), with
uncertainty.

Micro average weights environments by their test-set sizes (the paper's "Avg"); macro weighs each
environment equally. Intervals are Wilson score intervals (95%) for per-environment success, which stay
sensible at 0% and 100%, and a normal interval for the macro average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedse.trajectory import Trajectory

Z95 = 1.959963984540054


@dataclass(frozen=True)
class EnvScore:
    success: float
    reward: float
    n: int
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, float | int]:
        return {"success": self.success, "reward": self.reward, "n": self.n, "ci95": [self.ci_low, self.ci_high]}


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def score(trajectories: list[Trajectory]) -> EnvScore:
    n = len(trajectories)
    wins = sum(t.success for t in trajectories)
    low, high = wilson(wins, n)
    return EnvScore(wins / n if n else 0.0, sum(t.reward for t in trajectories) / n if n else 0.0, n, low, high)


def summarise(per_env: dict[str, EnvScore]) -> dict[str, object]:
    """The `fedse eval --json` object: per env, micro and macro averages, and the macro interval."""
    total = sum(s.n for s in per_env.values())
    micro = sum(s.success * s.n for s in per_env.values()) / total if total else 0.0
    macro = sum(s.success for s in per_env.values()) / len(per_env) if per_env else 0.0
    var = sum(s.success * (1 - s.success) / s.n for s in per_env.values() if s.n) / max(1, len(per_env)) ** 2
    half = Z95 * math.sqrt(var)
    return {"envs": {k: v.as_dict() for k, v in per_env.items()}, "micro": micro, "macro": macro,
            "macro_ci95": [max(0.0, macro - half), min(1.0, macro + half)]}
