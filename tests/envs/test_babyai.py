"""BabyAI text wrapper: what the agent reads and may type, the expert, chance level, and BabyAI's rules."""

from __future__ import annotations

import random

import pytest

from fedse.envs import babyai
from fedse.envs.babyai import LEVELS, BabyAIEnv
from fedse.envs.check import success_rate
from fedse.scripted import random_policy


def expert_episode(env: BabyAIEnv, task: int) -> tuple[bool, int]:
    env.reset(task)
    while not env.done:
        env.step(env.expert_action())
    return env.success, env.turn


def first_task_of(level: str) -> int:
    return LEVELS.index(level)


def test_first_observation_states_goal_view_load_and_actions() -> None:
    env = BabyAIEnv()
    obs, info = env.reset(0)
    assert env.level == LEVELS[0] and env.instruction() == "go to the red ball"
    assert obs.startswith("Your goal: go to the red ball\nIn view: ")
    assert "red ball 1 at 4 steps ahead and 3 steps to your right" in obs
    assert "Ahead of you: 5 free cells, then a wall." in obs
    assert "You are carrying nothing." in obs
    assert obs.endswith("Available actions: " + ", ".join(info["admissible_actions"]) + ".")
    assert info["admissible_actions"][:3] == ["turn left", "turn right", "move forward"]
    assert "go to red ball 1" in info["admissible_actions"]


def test_task_ids_cycle_through_the_level_mix() -> None:
    env = BabyAIEnv()
    assert len(LEVELS) == len(set(LEVELS)) and len(env.test_ids) % len(LEVELS) == 0
    for task in (0, 29, 30, 89, 10_000, 123_457):
        env.reset(task)
        assert env.level == LEVELS[task % len(LEVELS)]


def test_object_names_stay_put_while_the_agent_turns() -> None:
    env = BabyAIEnv()
    env.reset(0)
    named = dict(env._by_name)
    for _ in range(4):
        env.step("turn left")
    assert all(env._by_name[name] is obj for name, obj in named.items()), "a name always means one object"
    assert env.step("go to grey key 4")[4]["valid_action"]


def test_remembered_objects_are_described_but_not_offered() -> None:
    env = BabyAIEnv()
    env.reset(0)
    obs, _, _, _, info = env.step("turn left")
    assert "Out of view, remembered: " in obs and "red ball 1 at" in obs.split("Out of view")[1]
    assert "go to red ball 1" not in info["admissible_actions"]
    obs, _, _, _, info = env.step("go to red ball 1")
    assert not info["valid_action"] and "out of view; turn until you see it" in obs


@pytest.mark.parametrize(("action", "says"), [
    ("", "You typed no action."),
    ("fly to the moon", "'fly to the moon' is not a valid action."),
    ("go to purple unicorn 3", "you know of no such object"),
    ("go to", "'go to' is not a valid action."),
    ("pick up", "'pick up' is not a valid action."),
    ("toggle and go through", "is not a valid action."),
    ("toggle", "there is no door right in front of you"),
    ("drop", "you are not carrying anything"),
    ("go through grey ball 1", "it is not a door"),
    ("click[", "is not a valid action"),
    ("\x00\n\x00", "is not a valid action"),
    ("x" * 1_000_000, "xxx...' is not a valid action."),
])
def test_bad_actions_get_a_reason_and_cost_a_turn(action: str, says: str) -> None:
    env = BabyAIEnv()
    env.reset(0)
    obs, reward, terminated, truncated, info = env.step(action)
    assert says in obs and "Available actions: " in obs
    assert not info["valid_action"] and reward == 0.0 and not terminated and not truncated
    assert env.turn == 1 and len(obs) < 5_000


def test_blocked_forward_and_full_hands_are_explained() -> None:
    env = BabyAIEnv()
    env.reset(first_task_of("PutNextLocal-v0"))
    _, _, _, _, info = env.step(next(a for a in env.admissible_actions() if a.startswith("pick up ")))
    assert info["valid_action"] and env._env.carrying is not None
    other = next(a[len("go to "):] for a in info["admissible_actions"] if a.startswith("go to "))
    obs, _, _, _, info = env.step(f"pick up {other}")
    assert not info["valid_action"] and f"You cannot pick up the {other}: you are already carrying" in obs
    while "move forward" in env.admissible_actions():
        env.step("move forward")
    obs, _, _, _, info = env.step("move forward")
    assert not info["valid_action"] and "You cannot move forward:" in obs and "is in the way." in obs


@pytest.mark.parametrize("typed", ["Go Forward.", " TURN  left ", "'pickup grey key 1'", "GO TO red ball 1."])
def test_lenient_spelling_is_accepted(typed: str) -> None:
    env = BabyAIEnv()
    env.reset(0)
    assert env.step(typed)[4]["valid_action"]


def test_one_go_to_runs_many_primitive_steps_in_one_turn() -> None:
    env = BabyAIEnv()
    env.reset(0)
    obs, reward, terminated, _, info = env.step("go to red ball 1")
    assert env.turn == 1 and env._env.step_count > 3 and 0.0 < reward < 1.0
    assert terminated and info["success"] and obs.startswith("You completed the mission.")


def test_success_pays_babyai_reward_for_primitive_steps() -> None:
    env = BabyAIEnv()
    for task in (0, first_task_of("UnlockPickup-v0")):
        env.reset(task)
        reward = 0.0
        while not env.done:
            _, reward, _, _, info = env.step(env.expert_action())
        assert info["success"]
        assert reward == pytest.approx(1 - 0.9 * env._env.step_count / env._env.max_steps)
        assert 0.0 < reward < 1.0


def test_the_levels_own_step_budget_ends_the_episode_without_success() -> None:
    env = BabyAIEnv()
    env.reset(first_task_of("PutNextLocal-v0"))
    env._env.max_steps = env._env.step_count + 1  # the level allows one more primitive step
    obs, reward, terminated, _, info = env.step("turn left")
    assert terminated and not info["success"] and reward == 0.0
    assert "You ran out of time" in obs and info["admissible_actions"] == []


def test_strict_level_fails_on_picking_the_wrong_object() -> None:
    env = BabyAIEnv()
    for task in range(first_task_of("PickupDistDebug-v0"), 3_000, len(LEVELS)):
        _, info = env.reset(task)
        wanted = env._env.instrs.desc.obj_set
        wrong = [a for a in info["admissible_actions"]
                 if a.startswith("pick up ") and all(env._by_name[a[8:]] is not o for o in wanted)]
        if wrong:
            break
    obs, reward, terminated, _, info = env.step(wrong[0])
    assert terminated and not info["success"] and reward == 0.0 and obs.startswith("The mission failed")


def test_expert_solves_the_first_25_test_tasks() -> None:
    env = BabyAIEnv()
    tasks = env.test_ids[:25]
    results = [expert_episode(env, task) for task in tasks]
    assert all(ok for ok, _ in results), [t for t, (ok, _) in zip(tasks, results, strict=True) if not ok]
    assert max(turns for _, turns in results) <= env.max_turns


def test_random_valid_actions_rarely_succeed() -> None:
    rate, _, _ = success_rate("babyai", list(BabyAIEnv.test_ids), random_policy(0), {})
    assert 0.1 < rate < 0.4  # AgentGym's anchor ≈ 0.23; 0.24 over 10 seeds here


def test_same_task_same_actions_same_transcript() -> None:
    for task in (3, 27, 10_017):
        first, second = BabyAIEnv(), BabyAIEnv()
        second.reset(task + 1)  # a different world in between must not leak into the replay
        obs_a, info_a = first.reset(task)
        obs_b, info_b = second.reset(task)
        assert (obs_a, info_a) == (obs_b, info_b)
        rng = random.Random(task)
        while not first.done:
            action = rng.choice(info_a["admissible_actions"] + ["drop", "nonsense"])
            assert first.expert_action() == second.expert_action()
            out_a, out_b = first.step(action), second.step(action)
            assert out_a == out_b
            info_a = out_a[4]


def test_minigrid_chatter_stays_off_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    env = BabyAIEnv()
    for task in range(10_000, 10_000 + 2 * len(LEVELS)):
        env.reset(task)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------- disjoint splits in content
def held_out() -> frozenset[str]:
    return BabyAIEnv.heldout_keys("test") | BabyAIEnv.heldout_keys("val")


def fresh_key(level: str, seed: int) -> str:
    """The key of (level, seed) built on a brand-new level object, bypassing every cache."""
    env = babyai._make_level(level)
    babyai._reset_quietly(env, seed)
    return babyai._world_key(level, env)


def test_test_and_validation_worlds_are_disjoint() -> None:
    test, val = BabyAIEnv.heldout_keys("test"), BabyAIEnv.heldout_keys("val")
    assert len(test) == len(BabyAIEnv.test_ids) and len(val) == len(BabyAIEnv.validation_ids())
    assert not test & val
    assert all(key.startswith(f"{BabyAIEnv.level_of(t)}|") for t, key in zip(
        BabyAIEnv.test_ids, map(BabyAIEnv.content_key, BabyAIEnv.test_ids), strict=True)), "a readable prefix"


def test_sampled_explore_and_pretrain_ids_never_play_a_held_out_world() -> None:
    rng = random.Random(0)
    explore, pretrain = BabyAIEnv.explore_ids(), BabyAIEnv.pretrain_ids()
    # the first 10,000 explore ids hold three worlds that are test or validation worlds (14948 among them)
    sample = [*range(14_000, 15_000), *rng.sample(explore, 1_000), *range(210_000, 211_000),
              *rng.sample(pretrain, 1_000)]
    banned = held_out()
    leaks = [t for t in sample if BabyAIEnv.content_key(t) in banned]
    assert not leaks


def test_same_id_same_world_across_fresh_instances_and_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = (0, 45, 10_050, 14_948, 123_457, 210_278)
    keys = [BabyAIEnv.content_key(t) for t in tasks]
    first = [BabyAIEnv().reset(t) for t in tasks]
    monkeypatch.setattr(babyai, "_KEYS", {})
    monkeypatch.setattr(babyai, "_SCRATCH", {})
    assert [BabyAIEnv.content_key(t) for t in reversed(tasks)] == keys[::-1]
    for task, key, (obs, info) in zip(tasks, keys, first, strict=True):
        env = BabyAIEnv()
        assert env.reset(task) == (obs, info)
        assert fresh_key(env.level, BabyAIEnv.seed_of(task)) == key, "the played world is the keyed one"


def test_a_train_id_drawing_a_held_out_world_is_redrawn() -> None:
    level = "OpenRedBlueDoorsDebug-v0"  # one small room: its few worlds repeat across seeds
    start = BabyAIEnv.explore_ids()[0]
    start += (first_task_of(level) - start) % len(LEVELS)
    banned = held_out()
    task = next(t for t in range(start, start + 400 * len(LEVELS), len(LEVELS))
                if babyai.instance_key(level, t) in banned)
    assert BabyAIEnv.seed_of(task) == task + babyai.REDRAW_STRIDE
    key = BabyAIEnv.content_key(task)
    assert key != babyai.instance_key(level, task) and key not in banned
    env = BabyAIEnv()
    env.reset(task)
    assert env.level == level and babyai._world_key(level, env._env) == key
    assert expert_episode(env, task)[0], "a redrawn world is as solvable as any"


def test_a_planted_collision_is_redrawn_for_val_train_and_pretrain_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = (10_007, 123_456, 300_001)
    planted = frozenset(babyai.instance_key(BabyAIEnv.level_of(t), t) for t in tasks)
    monkeypatch.setattr(BabyAIEnv, "banned_keys", classmethod(lambda cls, t: planted))
    env = BabyAIEnv()
    for task in tasks:
        obs, _ = env.reset(task)
        assert BabyAIEnv.seed_of(task) == task + babyai.REDRAW_STRIDE
        played = babyai._world_key(env.level, env._env)
        assert played == babyai.instance_key(env.level, task + babyai.REDRAW_STRIDE) and played not in planted
        assert obs.startswith(f"Your goal: {env._env.mission}\n")


def test_test_ids_keep_their_seed_and_world() -> None:
    for task in BabyAIEnv.test_ids:
        assert BabyAIEnv.seed_of(task) == task
        assert BabyAIEnv.content_key(task) == fresh_key(BabyAIEnv.level_of(task), task)
