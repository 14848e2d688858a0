from __future__ import annotations

import pytest

from fedse.evaluate import EnvScore, summarise, wilson


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
