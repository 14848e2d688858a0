from __future__ import annotations

import random

from fedse.envs.maze import (
    DOUBLE_T,
    DOUBLE_T_GOAL,
    MIN_PATH,
    MazeEnv,
    double_t_pairs,
    free_cells,
    random_maze,
    shortest_path,
)


def at(env: MazeEnv, start: tuple[int, int], goal: tuple[int, int]) -> str:
    """Put the agent at `start` on the double-T with `goal` (as LMRL-Gym's fixed task), return the text."""
    env.reset(0)
    env.grid, env.pos, env.goal = DOUBLE_T, start, goal
    return f"{env.instruction()}\n{env._describe()}"


def test_double_t_pairs_are_split_by_content_test_and_validation_held_out() -> None:
    cells = free_cells(DOUBLE_T)
    assert len(cells) == 26 and DOUBLE_T_GOAL in cells
    parts = double_t_pairs()
    assert {k: len(v) for k, v in parts.items()} == {"test": 25, "val": 50, "train": 431}
    flat = [p for part in parts.values() for p in part]
    assert len(set(flat)) == len(flat) == 506, "every pair 3-15 moves apart, each in one split"
    assert all(MIN_PATH <= len(shortest_path(DOUBLE_T, s, g)) <= MazeEnv.max_turns for s, g in flat)
    env = MazeEnv()
    assert [env.task(t)[1:] for t in env.test_ids] == list(parts["test"])
    assert [env.task(t)[1:] for t in env.validation_ids()] == list(parts["val"])
    assert [env.task(t)[1:] for t in env.explore_ids()] == list(parts["train"])
    assert len({g for _, g in parts["test"]}) >= 10, "test goals span the maze, not one excluded goal"


def test_observation_text_matches_lmrl_gym() -> None:
    env = MazeEnv()
    first = at(env, (1, 1), (8, 6))
    assert "The goal is at position 8, 6." in first
    assert "Your current position is at position 1, 1." in first
    assert "walls above you, below you, and to your left" in first


def test_moves_change_row_and_col_as_documented_and_walls_block() -> None:
    env = MazeEnv()
    at(env, (1, 1), (8, 6))
    obs = [env.step(a)[0] for a in ["move right", "move up", "move left", "move left"]]
    assert "position 1, 2" in obs[0]
    assert "position 1, 2" in obs[1]  # wall above: unchanged
    assert "position 1, 1" in obs[2] and "position 1, 1" in obs[3]


def test_reaching_the_goal_answers_success() -> None:
    env = MazeEnv()
    env.reset(0)
    path = shortest_path(env.grid, env.pos, env.goal)
    for direction in path[:-1]:
        _, reward, done, _, _ = env.step(f"move {direction}")
        assert not done and reward == 0.0
    obs, reward, done, _, info = env.step(f"move {path[-1]}")
    assert (obs, reward, done, info["success"]) == ("Success", 1.0, True, True)


def test_lenient_spelling_is_accepted_and_garbage_is_not() -> None:
    env = MazeEnv()
    env.reset(3)
    assert env.step("Move Right.")[4]["valid_action"]
    assert env.step("right")[4]["valid_action"]
    _, _, _, _, info = env.step("move diagonally")
    assert not info["valid_action"]


def test_no_train_or_pretrain_task_is_a_held_out_task_and_all_fit_the_turn_limit() -> None:
    env = MazeEnv()
    held_out = {env.content_key(t) for t in list(env.test_ids) + list(env.validation_ids())}
    others = list(env.explore_ids()) + list(env.train_ids[5_000:5_300]) + list(env.pretrain_ids()[:300])
    for task in others:
        grid, start, goal = env.task(task)
        assert env.content_key(task) not in held_out
        assert 0 < len(shortest_path(grid, start, goal)) <= env.max_turns
    assert env.content_key(0) == "double-t:{},{}->{},{}".format(*env.task(0)[1], *env.task(0)[2])


def test_random_mazes_are_connected_and_walled_in() -> None:
    for seed in range(50):
        grid = random_maze(seed)
        assert all(ch == "1" for ch in grid[0] + grid[-1]) and all(r[0] == r[-1] == "1" for r in grid)
        cells = free_cells(grid)
        assert all(shortest_path(grid, cells[0], c) or c == cells[0] for c in cells)


def test_expert_solves_every_test_task_and_random_is_rare() -> None:
    env = MazeEnv()
    rng = random.Random(0)
    solved = random_wins = 0
    for task in env.test_ids:
        env.reset(task)
        while not env.done:
            env.step(env.expert_action())
        solved += env.success
        for _ in range(8):
            _, info = env.reset(task)
            while not env.done:
                _, _, _, _, info = env.step(rng.choice(info["admissible_actions"]))
            random_wins += env.success
    assert solved == 25
    assert random_wins / (25 * 8) < 0.15  # LMRL-Gym anchor ≈ 0.07–0.10
