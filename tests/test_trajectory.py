from __future__ import annotations

from pathlib import Path

import pytest

from fedse.trajectory import Trajectory, Turn, read_jsonl, write_jsonl


def make(task: int = 1, policy: str = "expert", **kw) -> Trajectory:
    return Trajectory(env="maze", task_id=task, instruction="go", turns=[Turn(observation="o", action="a")],
                      final_observation="Success", reward=1.0, success=True, policy=policy, **kw)


def test_content_hash_ignores_provenance_but_not_content() -> None:
    assert make(policy="expert").content_hash == make(policy="agent", round=3, seed=9).content_hash
    assert make(task=1).content_hash != make(task=2).content_hash


def test_jsonl_round_trip(tmp_path: Path) -> None:
    records = [make(task=i, round=i) for i in range(3)]
    path = tmp_path / "sub" / "x.jsonl"
    assert write_jsonl(path, records) == 3
    assert list(read_jsonl(path)) == records


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    write_jsonl(path, [make()])
    before = path.read_text()

    def broken():
        yield make(task=5)
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_jsonl(path, broken())
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]


def test_malformed_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(make().model_dump_json() + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a trajectory"):
        list(read_jsonl(path))
