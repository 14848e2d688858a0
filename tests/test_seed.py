from __future__ import annotations

from pathlib import Path

import pytest

from fedse.envs.registry import env_class, env_names
from fedse.seed import write_seed_file
from fedse.trajectory import read_jsonl


@pytest.mark.parametrize("name", env_names())
def test_seed_files_hold_successful_expert_episodes_on_train_ids_outside_validation(name: str, tmp_path: Path) -> None:
    summary = write_seed_file(name, 12, tmp_path, seed=0)
    records = list(read_jsonl(summary.path))
    assert summary.written == len(records) == 12
    train, val = env_class(name).explore_ids(), env_class(name).validation_ids()
    assert all(r.task_id in train and r.task_id not in val for r in records)
    assert all(r.success and r.policy == "expert" and r.seed == 0 for r in records)
    assert len({r.task_id for r in records}) == 12
    assert all(r.content_hash and r.turns and r.instruction for r in records)


def test_same_seed_same_file_other_seed_other_tasks(tmp_path: Path) -> None:
    a = write_seed_file("maze", 20, tmp_path / "a", seed=0)
    b = write_seed_file("maze", 20, tmp_path / "b", seed=0).path.read_text()
    c = write_seed_file("maze", 20, tmp_path / "a", seed=1)
    assert a.path == tmp_path / "a" / "s0" / "maze.jsonl" and c.path == tmp_path / "a" / "s1" / "maze.jsonl"
    assert a.path.read_text() == b and a.path.read_text() != c.path.read_text(), "each run seed its own draw"
