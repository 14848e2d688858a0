"""The results-table driver (flows/results.py): which stages run in which order, and how its cost adds up."""

import json

from flows.results import clear, order, record_timing

STAGES = ["experiment@centralized-0", "experiment@fedit-0", "experiment@fedse-0", "experiment@fedse-1",
          "collapse@fedse", "personal@fedit-0", "variant@exact-s0"]


def test_without_patterns_the_heaviest_run_first_then_by_name() -> None:
    assert order(STAGES, None) == ["collapse@fedse", *sorted(s for s in STAGES if s != "collapse@fedse")]


def test_patterns_give_the_run_order_and_drop_unmatched_stages() -> None:
    got = order(STAGES, ["experiment@fedse-*", "experiment@fedit-*", "personal@*"])
    assert got == ["experiment@fedse-0", "experiment@fedse-1", "experiment@fedit-0", "personal@fedit-0"]


def test_a_stage_matching_two_patterns_runs_at_the_first() -> None:
    assert order(STAGES, ["variant@*", "*"])[0] == "variant@exact-s0"


def test_timing_sums_the_invocations_that_built_the_table(tmp_path) -> None:
    path = tmp_path / "timing.json"
    assert record_timing(path, 60.0, 2, {"a": 50.0}, [], "t1") == 60.0
    assert record_timing(path, 90.0, 2, {"b": 80.0, "a": 40.0}, ["b"], "t2") == 150.0
    kept = json.loads(path.read_text())
    assert kept["stages"] == {"a": 40.0, "b": 80.0}
    assert [s["stages"] for s in kept["sessions"]] == [["a"], ["a", "b"]]
    assert kept["failed"] == ["b"]


def test_an_invocation_recorded_after_each_stage_counts_once_at_its_latest_wall(tmp_path) -> None:
    """A table driver killed midway (a session ends) has written its wall time up to its last stage."""
    path = tmp_path / "timing.json"
    record_timing(path, 60.0, 2, {"a": 50.0}, [], "t1")
    record_timing(path, 30.0, 2, {"b": 25.0}, [], "t2")
    assert record_timing(path, 70.0, 2, {"b": 25.0, "c": 60.0}, [], "t2") == 130.0
    assert [s["stages"] for s in json.loads(path.read_text())["sessions"]] == [["a"], ["b", "c"]]


def test_a_stage_s_old_outputs_are_cleared_before_it_runs(tmp_path) -> None:
    """As dvc repro does: a half-written run folder from a killed run would make the flow refuse to start."""
    folder, file, absent = tmp_path / "run", tmp_path / "metrics.json", tmp_path / "never"
    (folder / "buffers").mkdir(parents=True)
    (folder / "buffers" / "b.jsonl").write_text("{}")
    file.write_text("{}")
    clear([folder, file, absent])
    assert not folder.exists() and not file.exists() and list(tmp_path.iterdir()) == []


def test_the_smollm2_table_runs_only_when_named_and_each_report_waits_for_its_own_runs() -> None:
    from flows.results import in_scope, ready

    assert not in_scope("smollm2@fedse-s0", None) and in_scope("smollm2@fedse-s0", ["smollm2@*"])
    assert in_scope("experiment@fedse-0", None) and in_scope("collapse@fedit", ["smollm2@*"])
    left = ["report", "report_collapse", "report_smollm2", "smollm2@fedit-s0"]
    assert ready(left, None) == ["report", "report_collapse"]  # the SmolLM2 report waits for its runs
    assert ready(["report", "experiment@fedse-0", "report_smollm2"], ["smollm2@*"]) == ["report_smollm2"]


def test_an_unfinished_run_is_resumed_and_anything_else_starts_afresh(tmp_path) -> None:
    from flows.results import resumable

    cmd = "python -m flows.experiment --profile smollm2 --method fedse --seed 0 --out experiments/x"
    run = tmp_path / "run"
    assert not resumable(cmd, [run])  # nothing there
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"complete": False, "rounds": [{"round": 0}]}))
    assert resumable(cmd, [run]) and not resumable("fedse report x", [run])
    (run / "metrics.json").write_text(json.dumps({"complete": False, "rounds": []}))
    assert not resumable(cmd, [run])  # killed before its first round: nothing to keep
    (run / "metrics.json").write_text(json.dumps({"complete": True, "rounds": [{"round": 0}]}))
    assert not resumable(cmd, [run])
    (run / "metrics.json").write_text("{half written")
    assert not resumable(cmd, [run])
