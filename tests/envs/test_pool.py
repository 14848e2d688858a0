from __future__ import annotations

import pytest

from fedse.envs.maze import MazeEnv
from fedse.envs.pool import EnvPool
from fedse.scripted import expert_policy, random_policy


def test_pool_steps_only_running_episodes() -> None:
    pool = EnvPool(MazeEnv, [0, 1, 2])
    assert pool.running() == [0, 1, 2]
    calls: list[int] = []

    def act(envs, slots):
        calls.append(len(slots))
        return [env.expert_action() for env in envs]

    slots = pool.run(act)
    assert all(s.done and s.info["success"] for s in slots)
    lengths = sorted(len(s.history) for s in slots)
    assert calls == sorted(calls, reverse=True) and calls[0] == 3 and len(calls) == lengths[-1]
    assert sum(calls) == sum(lengths), "each episode was asked for exactly as many actions as it took"


def test_stepping_a_finished_episode_is_refused() -> None:
    pool = EnvPool(MazeEnv, [0])
    pool.run(expert_policy())
    with pytest.raises(ValueError, match="already ended"):
        pool.step({0: "move up"})


def test_trajectories_record_turns_and_provenance() -> None:
    pool = EnvPool(MazeEnv, [0, 10_000])
    pool.run(random_policy(3))
    records = pool.trajectories("maze", policy="random", seed=3)
    for slot, record in zip(pool.slots, records, strict=True):
        assert record.task_id == slot.task_id and record.policy == "random" and record.seed == 3
        assert len(record.turns) == len(slot.history)
        assert record.turns[0].observation == slot.first_observation
        assert [t.action for t in record.turns] == [a for a, _ in slot.history]
        assert record.final_observation == slot.observation
        assert record.success == slot.info["success"]


def test_a_pool_with_capacity_starts_the_next_episode_as_one_ends() -> None:
    """At most `capacity` episodes run; each that ends is replaced at once by the next task in order, and the
    records come in task order whatever the order the episodes ended in."""
    tasks = [0, 1, 2, 3, 4, 5]
    pool = EnvPool(MazeEnv, tasks, capacity=2)
    assert pool.running() == [0, 1] and len(pool.slots) == 2
    batches: list[list[int]] = []
    ended: list[int] = []

    def act(envs, slots):
        batches.append([s.task_id for s in slots])
        return [env.expert_action() for env in envs]

    pool.run(act, ended=ended.append)
    firsts = [next(i for i, b in enumerate(batches) if t in b) for t in tasks]
    assert firsts == sorted(firsts) and firsts[-1] > 0  # started in order, later ones mid-run
    assert all(len(b) == 2 for b in batches[:firsts[-1] + 1])  # full until the queue ran dry
    assert sum(ended) == len(tasks)
    assert [r.task_id for r in pool.trajectories("maze", policy="expert")] == tasks
    with pytest.raises(ValueError, match="not started"):
        EnvPool(MazeEnv, tasks, capacity=2).trajectories("maze")
