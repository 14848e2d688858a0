from __future__ import annotations

import math
import statistics

import pytest

from fedse.evaluate import Z95, EnvScore, score, summarise, task_interval, wilson
from fedse.trajectory import Trajectory


def test_wilson_interval_contains_the_estimate_and_handles_extremes() -> None:
    low, high = wilson(5, 20)
    assert low < 0.25 < high
    assert wilson(0, 25)[0] == pytest.approx(0.0) and wilson(0, 25)[1] > 0.1
    assert wilson(25, 25)[1] == pytest.approx(1.0) and wilson(25, 25)[0] < 0.9
    assert wilson(0, 0) == (0.0, 1.0)


def test_micro_weights_by_test_size_macro_does_not() -> None:
    scores = {"a": EnvScore(1.0, 1.0, 90, 0.9, 1.0), "b": EnvScore(0.0, 0.0, 10, 0.0, 0.3)}
    out = summarise(scores)
    assert out["micro"] == pytest.approx(0.9)
    assert out["macro"] == pytest.approx(0.5)
    assert out["envs"]["a"]["n"] == 90


def record(task_id: int, success: bool) -> Trajectory:
    return Trajectory(env="maze", task_id=task_id, instruction="", turns=[], final_observation="",
                      reward=float(success), success=success, policy="agent")


def test_score_keeps_each_tasks_mean_over_its_passes() -> None:
    outcomes = {3: [True, True, False], 1: [False, False, False], 2: [True, False, True]}
    s = score([record(t, w) for t, wins in outcomes.items() for w in wins], decisions=40, seconds=2.0)
    assert s.task_ids == (3, 1, 2) and s.passes == 3 and s.n == 3
    assert s.task_success == pytest.approx((2 / 3, 0.0, 2 / 3))
    assert s.success == pytest.approx(4 / 9)
    out = s.as_dict()
    assert out["episodes"] == 9 and out["passes"] == 3 and out["task_ids"] == [3, 1, 2]
    assert out["ci95"][0] <= s.success <= out["ci95"][1]
    assert (s.decisions, s.seconds) == (40, 2.0)


def test_one_pass_keeps_the_wilson_interval() -> None:
    s = score([record(t, t < 5) for t in range(20)])
    assert s.passes == 1 and (s.ci_low, s.ci_high) == pytest.approx(wilson(5, 20))


def test_passes_are_not_counted_as_independent_tasks() -> None:
    """Ten tasks played 8 times each, every task always succeeding or always failing: the evidence is ten
    tasks, not eighty episodes, so the interval is as wide as one pass's (not the 80-episode Wilson)."""
    records = [record(t, t < 5) for t in range(10) for _ in range(8)]
    s = score(records)
    low, high = task_interval(list(s.task_success), s.passes)
    assert (s.ci_low, s.ci_high) == (low, high)
    assert high - low > 1.5 * (wilson(40, 80)[1] - wilson(40, 80)[0])
    assert high - low == pytest.approx(2 * Z95 * math.sqrt(statistics.variance(s.task_success) / 10))
    uniform = task_interval([0.0] * 10, passes=8)  # no spread between tasks: Wilson over the tasks stands in
    assert uniform == pytest.approx(wilson(0, 10)) and uniform[1] > 0


def test_macro_interval_uses_the_per_task_variance_with_passes() -> None:
    even = score([record(t, (t + p) % 2 == 0) for t in range(6) for p in range(2)])  # every task at 0.5
    assert even.variance() == pytest.approx(0.25 / 6)  # no spread between tasks: binomial over the tasks
    out = summarise({"a": even})
    assert out["macro"] == pytest.approx(0.5) and out["macro_ci95"][0] < 0.5 < out["macro_ci95"][1]
    assert out["eval_decisions"] == 0 and out["eval_seconds"] == 0.0
    mixed = score([record(t, t < 3) for t in range(6) for _ in range(2)])
    assert mixed.variance() == pytest.approx(statistics.variance(mixed.task_success) / 6)
