"""The results-table driver (flows/results.py): which stages run in which order, and how its cost adds up."""

import json

from flows.results import order, record_timing

STAGES = ["experiment@centralized-0", "experiment@fedit-0", "experiment@fedse-0", "experiment@fedse-1",
          "full@fedse", "rank@2", "variant@exact-s0"]


def test_without_patterns_the_heaviest_run_first_then_by_name() -> None:
    assert order(STAGES, None) == ["full@fedse", *sorted(s for s in STAGES if s != "full@fedse")]


def test_patterns_give_the_run_order_and_drop_unmatched_stages() -> None:
    got = order(STAGES, ["experiment@fedse-*", "experiment@fedit-*", "rank@*"])
    assert got == ["experiment@fedse-0", "experiment@fedse-1", "experiment@fedit-0", "rank@2"]


def test_a_stage_matching_two_patterns_runs_at_the_first() -> None:
    assert order(STAGES, ["variant@*", "*"])[0] == "variant@exact-s0"


def test_timing_sums_the_invocations_that_built_the_table(tmp_path) -> None:
    path = tmp_path / "timing.json"
    assert record_timing(path, 60.0, 2, {"a": 50.0}, []) == 60.0
    assert record_timing(path, 90.0, 2, {"b": 80.0, "a": 40.0}, ["b"]) == 150.0
    kept = json.loads(path.read_text())
    assert kept["stages"] == {"a": 40.0, "b": 80.0}
    assert [s["stages"] for s in kept["sessions"]] == [["a"], ["a", "b"]]
    assert kept["failed"] == ["b"]
