from __future__ import annotations

import random

from fedse.envs.maze import DOUBLE_T, DOUBLE_T_GOAL, MazeEnv, free_cells, random_maze, shortest_path


def play(env: MazeEnv, task: int, actions: list[str]) -> list[str]:
    observations = [env.reset(task)[0]]
    for action in actions:
        observations.append(env.step(action)[0])
    return observations


def test_double_t_has_the_papers_25_starts_and_goal() -> None:
    cells = free_cells(DOUBLE_T)
    assert len(cells) == 26 and DOUBLE_T_GOAL in cells
    env = MazeEnv()
    starts = {env.task(t)[1] for t in env.test_ids}
    assert starts == set(cells) - {DOUBLE_T_GOAL}
    assert all(env.task(t)[2] == DOUBLE_T_GOAL for t in env.test_ids)


def test_observation_text_matches_lmrl_gym() -> None:
    env = MazeEnv()
    first = play(env, 0, [])[0]
    assert "The goal is at position 8, 6." in first
    assert "Your current position is at position 1, 1." in first
    assert "walls above you, below you, and to your left" in first


def test_moves_change_row_and_col_as_documented_and_walls_block() -> None:
    env = MazeEnv()
    obs = play(env, 0, ["move right", "move up", "move left", "move left"])
    assert "position 1, 2" in obs[1]
    assert "position 1, 2" in obs[2]  # wall above: unchanged
    assert "position 1, 1" in obs[3] and "position 1, 1" in obs[4]


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


def test_train_tasks_never_are_a_test_task_and_fit_the_turn_limit() -> None:
    env = MazeEnv()
    test_tasks = {(DOUBLE_T, env.task(t)[1], DOUBLE_T_GOAL) for t in env.test_ids}
    for task in list(env.train_ids[:700]) + list(env.train_ids[5_000:5_300]):
        grid, start, goal = env.task(task)
        assert (grid, start, goal) not in test_tasks
        assert 0 < len(shortest_path(grid, start, goal)) <= env.max_turns


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
    assert random_wins / (25 * 8) < 0.2  # LMRL-Gym anchor ≈ 0.07–0.10
