from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedse.report import (
    claims_table,
    estimate,
    improvement,
    improvement_table,
    load_runs,
    markdown,
    metric,
    rank_table,
    results_table,
    verdict,
)

ENVS = ["maze", "wordle"]


def doc(method: str, seed: int, maze: float, wordle: float, r: int = 8, n: int = 20) -> dict:
    envs = {"maze": {"success": maze, "reward": maze, "n": n, "ci95": [0, 1]},
            "wordle": {"success": wordle, "reward": wordle, "n": n, "ci95": [0, 1]}}
    macro = (maze + wordle) / 2
    clients = {e: {"bytes_sent": 1000 * r} for e in ENVS}
    return {"method": method, "seed": seed, "profile": "quick", "lora_r": r, "envs": ENVS, "model": "tiny",
            "complete": True,
            "rounds": [{"round": 0, "envs": envs, "micro": macro, "macro": macro,
                        "macro_ci95": [macro - .1, macro + .1], "clients": clients}]}


def test_estimate_uses_t_interval_over_seeds_and_own_interval_for_one_seed() -> None:
    e = estimate([0.2, 0.4, 0.6], single_half=0.09)
    assert e.mean == pytest.approx(0.4) and e.half == pytest.approx(4.303 * 0.2 / 3 ** 0.5, rel=1e-3)
    # seeds that agree exactly keep their sampling error (binomial half-width / sqrt(n))
    assert estimate([0.3, 0.3], single_half=0.2).half == pytest.approx(0.2 / 2 ** 0.5)
    assert estimate([0.5], single_half=0.07).half == 0.07


def test_tables_group_seeds_and_check_the_papers_orderings() -> None:
    docs = [doc("fedse", s, 0.6 + s / 100, 0.5) for s in range(3)] + [doc("fedit", s, 0.2, 0.1 + s / 100)
                                                                       for s in range(3)]
    assert metric([d for d in docs if d["method"] == "fedse"], "maze").mean == pytest.approx(0.61)
    table = results_table(docs)
    assert table.index("| fedse |") < table.index("| fedit |")  # sorted by macro
    assert "| 0,1,2 |" in table
    claims = claims_table(docs)
    assert "| fedse > fedit (micro) |" in claims and "| holds |" in claims
    assert "fedse > local (micro)" in claims and "not run" in claims
    assert verdict(0.05, 0.1) == "same direction, within noise" and verdict(-0.01, 0.1) == "does not hold"
    # equal means computed in two orders differ by float rounding; a tie has no direction
    tie = (0.1 + 0.2) - 0.3  # 5.6e-17
    assert tie > 0
    assert verdict(tie, 0.1) == "does not hold" and verdict(tie, 0.0) == "does not hold"


def test_rank_sweep_reports_megabytes_per_client() -> None:
    docs = [doc("fedse", 0, 0.3, 0.3, r=2), doc("fedse", 0, 0.4, 0.4, r=8)]
    table = rank_table(docs)
    assert "| 2 |" in table and "| 0.002 |" in table and "47.0 / 19.1" in table
    assert "fedse r=2" in markdown(docs)


def test_load_runs_names_the_bad_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match=r"no metrics\.json"):
        load_runs([tmp_path / "a"])
    (tmp_path / "a" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_runs([tmp_path / "a"])
    (tmp_path / "a" / "metrics.json").write_text(json.dumps({"rounds": []}))
    with pytest.raises(ValueError, match="holds no finished round"):
        load_runs([tmp_path / "a"])
    (tmp_path / "a" / "metrics.json").write_text(json.dumps(doc("fedse", 0, 0.1, 0.1) | {"complete": False}))
    with pytest.raises(ValueError, match=r"did not finish \(1 rounds recorded\)"):
        load_runs([tmp_path / "a"])


def two_rounds(method: str, seed: int, start: float, end: float, profile: str = "quick") -> dict:
    d = doc(method, seed, start, start)
    last = doc(method, seed, end, end)["rounds"][0] | {"round": 1}
    return d | {"profile": profile, "rounds": d["rounds"] + [last]}


def test_improvement_pairs_round_zero_and_final_per_seed() -> None:
    runs = [two_rounds("fedse", s, 0.1, 0.3 + s / 100) for s in range(3)]
    first, last, diff, half = improvement(runs)
    assert (first, last) == pytest.approx((0.1, 0.31)) and diff == pytest.approx(0.21)
    # the t interval of the paired differences (0.025) is floored by one run's binomial interval / sqrt(3)
    binomial = 1.96 * (2 * (0.1 * 0.9 / 20 + 0.3 * 0.7 / 20) / 4) ** 0.5
    assert half == pytest.approx(max(4.303 * 0.01 / 3 ** 0.5, binomial / 3 ** 0.5), rel=1e-3)
    table = improvement_table([*runs, doc("pretrained", 0, 0.1, 0.1)])
    assert "| fedse | 0.100 | 0.310 | +0.210 ± " in table and "| holds |" in table and "pretrained" not in table
    # one run: the binomial interval of two independent proportions (n=20 per env, 2 envs)
    _, _, diff, half = improvement([two_rounds("fedse", 0, 0.1, 0.15)])
    assert half == pytest.approx(1.96 * ((0.09 + 0.1275) / 20 * 2) ** 0.5 / 2, rel=1e-3)
    assert verdict(diff, half) == "same direction, within noise"


def test_mixed_profiles_are_reported_as_separate_rows() -> None:
    table = results_table([two_rounds("fedse", 0, 0.1, 0.2), two_rounds("fedse", 0, 0.1, 0.4, profile="full")])
    assert "| fedse (quick) |" in table and "| fedse (full) |" in table


def test_curves_csv_holds_the_mean_macro_per_round_and_method(tmp_path: Path) -> None:
    from fedse.plots import curves_csv

    docs = [two_rounds("fedse", 0, 0.1, 0.3), two_rounds("fedse", 1, 0.2, 0.5), doc("pretrained", 0, 0.1, 0.1)]
    rows = curves_csv(docs, tmp_path / "curves.csv").read_text().splitlines()
    assert rows[0] == "round,fedse,pretrained"
    assert rows[1] == "0,0.1500,0.1000" and rows[2] == "1,0.4000,0.1000"  # the base holds its one value


def test_runs_that_sent_bf16_adapters_are_their_own_row() -> None:
    from fedse.report import label

    assert label(doc("fedse", 0, 0.1, 0.1)) == "fedse"
    assert label(doc("fedse", 0, 0.1, 0.1) | {"exchange": {"dtype": "fp32"}}) == "fedse"
    assert label(doc("fedse", 0, 0.1, 0.1, r=4) | {"exchange": {"dtype": "bf16"}}) == "fedse r=4 bf16"


def test_tasks_per_round_tells_the_rounds_scored_on_fewer_tasks(tmp_path: Path) -> None:
    from fedse.plots import method_curves, tasks_per_round

    def run(seed: int, small: int) -> dict:
        rounds = [{"round": t, "macro": 0.2, "envs": {"maze": {"success": 0.2, "n": 25 if t in (0, 2) else small},
                                                        "wordle": {"success": 0.2, "n": 25}}} for t in range(3)]
        return {"method": "fedse", "seed": seed, "rounds": rounds}

    docs = [run(0, 10), run(1, 8)]
    assert tasks_per_round(docs) == {0: 25, 1: 8, 2: 25}
    assert method_curves(docs, tmp_path / "c.png").stat().st_size > 0
