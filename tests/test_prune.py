"""Pruning an own success by replay: loops and no-op steps go, informative steps stay, success is verified."""

from __future__ import annotations

from fedse.envs.maze import DOUBLE_T, MazeEnv, shortest_path
from fedse.envs.pool import EnvPool
from fedse.envs.registry import make_env
from fedse.prune import prune, replay
from fedse.scripted import random_policy
from fedse.trajectory import Trajectory, Turn


def played(env: str, task: int, actions: list[str]) -> Trajectory:
    game = make_env(env)
    observation, _ = game.reset(task)
    turns = []
    reward = 0.0
    for action in actions:
        turns.append(Turn(observation=observation, action=action))
        observation, reward, terminated, truncated, info = game.step(action)
        if terminated or truncated:
            break
    return Trajectory(env=env, task_id=task, instruction=game.instruction(), turns=turns,
                      final_observation=observation, reward=reward, success=bool(info["success"]), policy="agent",
                      round=2, seed=7)


def test_a_maze_walk_loses_its_wall_bumps_and_its_loops_and_still_succeeds() -> None:
    env = MazeEnv()
    task = env.explore_ids()[0]
    _, start, goal = env.task(task)
    path = [f"move {d}" for d in shortest_path(DOUBLE_T, start, goal)]
    back = {"up": "down", "down": "up", "left": "right", "right": "left"}
    detour = [path[0], f"move {back[path[0].split()[1]]}"]  # there and back: a loop
    bump = next(f"move {d}" for d in ("up", "down", "left", "right")
                if DOUBLE_T[start[0] + {"up": -1, "down": 1}.get(d, 0)][start[1] + {"left": -1, "right": 1}.get(d, 0)]
                == "1")  # into a wall: nothing changes
    walk = played("maze", task, [bump, *detour, "fly away", *path])
    assert walk.success and len(walk.turns) == len(path) + 4
    short = prune(walk)
    assert [t.action for t in short.turns] == path and short.success
    assert (short.policy, short.round, short.seed) == ("agent", 2, 7) and short.content_hash != walk.content_hash


def test_informative_wordle_guesses_are_never_dropped_but_an_invalid_word_is() -> None:
    game = make_env("wordle")
    task = game.explore_ids()[3]
    game.reset(task)
    actions = []
    while not game.done:
        action = game.expert_action()
        actions.append(action)
        game.step(action)
    walk = played("wordle", task, ["x q z v w", *actions])  # not a word: it costs a guess and teaches nothing
    assert walk.success
    assert [t.action for t in prune(walk).turns] == actions, "the expert's guesses all carried information"


def test_failures_and_unreproducible_episodes_come_back_unchanged() -> None:
    lost = played("maze", MazeEnv().explore_ids()[1], ["move up"] * 15)
    assert not lost.success and prune(lost) is lost
    forged = played("maze", MazeEnv().explore_ids()[2], ["move up"]).model_copy(update={"success": True})
    assert replay(forged, [0])[0] is None and prune(forged) is forged


def test_random_successes_get_shorter_never_longer_and_stay_successes() -> None:
    for env in ("maze", "textcraft", "babyai"):
        ids = list(make_env(env).explore_ids()[:60])
        pool = EnvPool(lambda env=env: make_env(env), ids)
        pool.run(random_policy(1))
        wins = [t for t in pool.trajectories(env, policy="agent") if t.success]
        pruned = [prune(t) for t in wins]
        assert wins and all(p.success and len(p.turns) <= len(w.turns) for p, w in zip(pruned, wins, strict=True))
        assert sum(len(p.turns) for p in pruned) < sum(len(w.turns) for w in wins), env
