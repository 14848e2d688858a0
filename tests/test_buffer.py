from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedse.buffer import Buffer, shortest_per_task, success_filter
from fedse.trajectory import Trajectory, Turn


def traj(task: int, success: bool, policy: str = "agent", round: int | None = 0) -> Trajectory:
    return Trajectory(env="maze", task_id=task, instruction="go", turns=[Turn(observation="o", action=f"a{task}")],
                      final_observation="end", reward=float(success), success=success, policy=policy, round=round)


def test_filter_keeps_exactly_the_successes() -> None:
    batch = [traj(i, i % 3 == 0) for i in range(10)]
    kept = success_filter(batch)
    assert [t.task_id for t in kept] == [0, 3, 6, 9]
    assert success_filter([traj(1, False)]) == []


def test_shortest_per_task_keeps_the_most_direct_success_of_each_task() -> None:
    def walk(task: int, turns: int, tag: str = "") -> Trajectory:
        return traj(task, True).model_copy(update={"turns": [Turn(observation="o", action=f"a{tag}{i}")
                                                             for i in range(turns)]})
    long, short, tie = walk(1, 5), walk(1, 2), walk(1, 2, "b")
    other = walk(2, 7)
    kept = shortest_per_task([long, short, other, tie])
    assert kept == [short, other]  # the first of equally short ones, one per task, in first-seen order
    assert shortest_per_task([]) == []
    wordle = walk(1, 9).model_copy(update={"env": "wordle"})
    assert len(shortest_per_task([short, wordle])) == 2  # the same id in two environments are two tasks


def test_buffer_grows_across_rounds_and_deduplicates(tmp_path: Path) -> None:
    buf = Buffer(tmp_path)
    seeds = [traj(i, True, policy="expert", round=None) for i in range(3)]
    m0 = buf.commit(0, buf.add([*seeds, traj(9, True)]))
    assert m0["count"] == 4 and m0["added"] == 4 and m0["sources"] == {"expert": 3, "agent": 1}
    again = buf.add([traj(9, True, round=1), traj(10, True, round=1)])  # task 9: same content, other round
    assert [t.task_id for t in again] == [10]
    m1 = buf.commit(1, again)
    assert m1["count"] == 5 and m1["added_hashes"] == [again[0].content_hash]
    reopened = Buffer(tmp_path)
    assert [t.task_id for t in reopened.records] == [0, 1, 2, 9, 10]
    assert json.loads((tmp_path / "manifest_0.json").read_text())["count"] == 4


def test_buffer_survives_a_crash_between_write_and_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    buf = Buffer(tmp_path)
    buf.commit(0, buf.add([traj(1, True), traj(2, True)]))
    before = (tmp_path / "buffer.jsonl").read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    crashed = Buffer(tmp_path)
    with pytest.raises(OSError, match="power cut"):
        crashed.commit(1, crashed.add([traj(3, True)]))
    monkeypatch.undo()
    assert (tmp_path / "buffer.jsonl").read_bytes() == before
    assert not (tmp_path / "manifest_1.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buffer.jsonl", "manifest_0.json"]  # no temp left
    assert [t.task_id for t in Buffer(tmp_path).records] == [1, 2]


def walk(task: int, turns: int, tag: str = "", policy: str = "agent") -> Trajectory:
    """A success of `turns` turns (its own content hash: model_copy would keep the old one)."""
    base = traj(task, True, policy=policy).model_dump()
    return Trajectory(**base | {"turns": [Turn(observation="o", action=f"a{tag}{i}") for i in range(turns)],
                                "content_hash": ""})


def test_keep_shortest_holds_one_success_per_task_and_a_shorter_one_supersedes_it(tmp_path: Path) -> None:
    buf = Buffer(tmp_path)
    seed, long = walk(1, 4, policy="expert"), walk(2, 9)
    m0 = buf.commit(0, buf.add([seed, long, walk(2, 12, "b")], keep="shortest"))
    assert m0["count"] == 2 and m0["superseded_hashes"] == []  # the longer second walk on task 2 is not taken
    shorter, longer = walk(2, 5, "c"), walk(1, 6, "d")
    added = buf.add([shorter, longer, traj(3, False)], keep="shortest")
    assert added == [shorter, traj(3, False)]  # failures (w/o filter) are kept as they come
    m1 = buf.commit(1, added)
    assert m1["superseded_hashes"] == [long.content_hash] and m1["count"] == 3 and m1["rows"] == 4
    again = Buffer(tmp_path)  # the superseded record stays on disk and out of the buffer
    assert [len(t.turns) for t in again.records] == [4, 5, 1] and again.rows == 4
    same_content = walk(70, 2, "e")
    by_content = buf.add([walk(7, 3, "f"), same_content], keep="shortest",
                         key=lambda t: f"{t.env}:{t.task_id // 10 if t.task_id >= 10 else t.task_id}")
    assert [t.task_id for t in by_content] == [70], "ids 7 and 70 share a content key: one task, the shorter wins"


def test_rewind_restores_what_a_later_round_superseded(tmp_path: Path) -> None:
    from fedse.checkpoint import rewind

    buf = Buffer(tmp_path)
    first = walk(1, 8)
    buf.commit(0, buf.add([first], keep="shortest"))
    buf.commit(1, buf.add([walk(1, 3, "b")], keep="shortest"))
    assert [len(t.turns) for t in Buffer(tmp_path).records] == [3]
    again = Buffer(tmp_path)
    rewind(again, 0)
    assert again.records == [first] and not (tmp_path / "manifest_1.json").exists()
    assert [t.content_hash for t in Buffer(tmp_path).records] == [first.content_hash]
