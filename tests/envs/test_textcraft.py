from __future__ import annotations

import random
import re

import pytest

from fedse.envs.check import success_rate
from fedse.envs.textcraft import MAX_EXPERT_TURNS, TextCraftEnv, goal_splits, recipe_book, show
from fedse.scripted import random_policy

HINT = re.compile(r"craft [0-9]+ [a-z ]+ using [0-9]+ [a-z ]+(, [0-9]+ [a-z ]+)*")


def started(task_id: int = 0) -> TextCraftEnv:
    env = TextCraftEnv()
    env.reset(task_id)
    return env


def holding(inventory: dict[str, int]) -> TextCraftEnv:
    """A running episode (goal untouched) with a chosen inventory, to test the crafting rules alone."""
    env = started()
    env.inventory = dict(inventory)
    return env


def test_observation_lists_crafting_commands_then_the_goal() -> None:
    env = TextCraftEnv()
    obs, info = env.reset(0)
    head, goal_line = obs.split("\n\n")
    lines = head.splitlines()
    assert lines[0] == "Crafting commands:"
    assert all(HINT.fullmatch(line) for line in lines[1:]), lines
    assert len(lines[1:]) == len(set(lines[1:])) >= 2
    assert goal_line == env.instruction() == f"Goal: craft {show(env.goal)}."
    actions = info["admissible_actions"]
    assert actions == sorted(actions) and "inventory" in actions and len(actions) <= 40
    assert all(a == "inventory" or a.startswith("get ") or a in lines for a in actions)


def test_hints_contain_the_plan_plus_distractors() -> None:
    env = started(3)
    _, crafts = recipe_book().plan(env.goal, {})
    hinted = {r.command() for r in env.hints}
    assert {r.command() for r, _ in crafts} < hinted, "the needed recipes and at least one distractor"


@pytest.mark.parametrize("action", [
    "", "\x00", "\n\n", "craft 0 x using", "craft", "get", "get -1 log", "click[", "go to",
    "inventory inventory", "get 1 unobtainium", "get 99999999999999999999 oak log",
    "craft 4 stick using 2 planks,", "¿qué? " * 50, "get 1 oak log" * 200_000,
    "get ٣ oak log", "craft 4 stick using two planks",
])
def test_bad_actions_are_answered_with_feedback(action: str) -> None:
    env = started()
    obs, reward, terminated, _, info = env.step(action)
    assert obs.startswith("Could not") and not info["valid_action"] and reward == 0.0
    assert len(obs) < 400 and not terminated and env.turn == 1 and env.inventory == {}


def test_only_base_items_can_be_gathered() -> None:
    env = holding({})
    assert "crafted, not gathered" in env.step("get 1 stick")[0]
    assert "stands for any of oak planks" in env.step("get 2 planks")[0]
    assert "stands for any of oak log" in env.step("get 1 oak logs")[0]
    assert "between 1 and 64" in env.step("get 65 oak log")[0]
    obs, *_ , info = env.step("  GET 2  Oak_Log. ")
    assert obs == "Got 2 oak log" and info["valid_action"] and env.inventory == {"oak_log": 2}
    assert env.step("inventory")[0] == "Inventory: [oak log] (2)"


def test_raw_materials_are_gathered_not_unpacked() -> None:
    """Cycles (ingot <-> block <-> nugget) are broken so that the raw material is the base item."""
    book = recipe_book()
    assert {"iron_ingot", "gold_ingot", "diamond", "redstone", "wheat", "oak_log", "string"} <= book.base
    assert {"iron_block", "iron_nugget", "hay_block", "oak_planks", "stick"} <= set(book.by_output)
    assert recipe_book() is book, "the recipes are read once per process"


def test_a_tag_takes_any_member_a_named_item_only_itself() -> None:
    env = holding({"stripped_oak_log": 1, "birch_planks": 2})
    assert env.step("craft 4 oak planks using 1 oak logs")[0] == "Crafted 4 oak planks"
    assert env.inventory == {"oak_planks": 4, "birch_planks": 2}
    obs, *_, info = env.step("craft 4 stick using 2 birch planks")
    assert obs == "Crafted 4 stick" and env.inventory == {"oak_planks": 4, "stick": 4}
    obs, *_, info = env.step("craft 1 crafting table using 4 spruce planks")
    assert obs.startswith("Could not find enough items") and not info["valid_action"]
    assert env.step("craft 1 crafting table using 4 planks")[0] == "Crafted 1 crafting table"
    assert env.inventory == {"stick": 4, "crafting_table": 1}


def test_counts_must_follow_the_recipe_and_batches_multiply_it() -> None:
    env = holding({"oak_log": 2})
    for wrong in ("craft 1 oak planks using 1 oak logs", "craft 4 oak planks using 2 oak logs",
                  "craft 4 oak planks using 1 oak logs, 1 stick", "craft 4 planks using 1 oak logs",
                  "craft 4 birch planks using 1 oak logs"):
        obs, *_, info = env.step(wrong)
        assert obs.startswith("Could not find a valid recipe") and not info["valid_action"], wrong
    assert env.inventory == {"oak_log": 2}
    assert env.step("craft 8 oak planks using 2 oak log")[0] == "Crafted 8 oak planks"
    assert env.inventory == {"oak_planks": 8}


def test_crafting_the_goal_succeeds_with_reward_one() -> None:
    env = started(5)
    *_, info = env.step("inventory")
    while not env.done:
        obs, reward, terminated, truncated, info = env.step(env.expert_action())
    assert terminated and not truncated and reward == 1.0 and info["success"]
    assert obs == f"Crafted {recipe_book().best[env.goal].makes} {show(env.goal)}"


def test_expert_solves_the_first_25_test_tasks_with_admissible_actions() -> None:
    env = TextCraftEnv()
    for task in env.test_ids[:25]:
        _, info = env.reset(task)
        while not env.done:
            action = env.expert_action()
            assert action in info["admissible_actions"]
            *_, info = env.step(action)
        assert info["success"] and env.turn <= MAX_EXPERT_TURNS, task


def test_expert_recovers_from_a_detour() -> None:
    env = started(7)
    rng = random.Random(7)
    _, info = env.reset(7)
    for _ in range(4):
        *_, info = env.step(rng.choice(info["admissible_actions"]))
    while not env.done:
        *_, info = env.step(env.expert_action())
    assert info["success"]


def test_random_admissible_actions_succeed_on_less_than_half() -> None:
    rate, _, _ = success_rate("textcraft", list(TextCraftEnv.test_ids), random_policy(0), {})
    assert 0.1 < rate < 0.5


def test_same_task_same_actions_same_transcript() -> None:
    def transcript(task: int) -> list[object]:
        env = TextCraftEnv()
        rng = random.Random(1)
        obs, info = env.reset(task)
        seen: list[object] = [obs, info]
        while not env.done:
            seen.append(env.step(rng.choice([*info["admissible_actions"], "get 1 nothing"])))
            info = seen[-1][-1]  # type: ignore[index]
        return seen

    assert transcript(12) == transcript(12)
    assert transcript(10_012) == transcript(10_012)
    assert transcript(12)[0] != transcript(13)[0]


def test_test_ids_get_distinct_goals_from_the_pool() -> None:
    env = TextCraftEnv()
    goals = {(env.reset(t), env.goal)[1] for t in env.test_ids}
    pool = recipe_book().goals
    assert len(goals) == len(env.test_ids) and goals <= set(pool)
    assert all(recipe_book().depth[g] >= 2 for g in pool)


def test_goal_pool_is_partitioned_by_goal_item() -> None:
    parts = goal_splits()
    assert {k: len(v) for k, v in parts.items()} == {"test": 100, "val": 40, "train": 124, "pretrain": 124}
    flat = [g for part in parts.values() for g in part]
    assert len(flat) == len(set(flat)) and set(flat) == set(recipe_book().goals)


def test_each_split_draws_goals_only_from_its_own_part() -> None:
    env = TextCraftEnv()
    parts = goal_splits()
    for name, ids in (("val", env.validation_ids()), ("train", env.explore_ids()[:2000]),
                      ("pretrain", env.pretrain_ids()[:2000])):
        assert {env._goal_for(t) for t in ids} <= set(parts[name]), name
    held_out = {env.content_key(t) for t in [*env.test_ids, *env.validation_ids()]}
    assert not held_out & {env.content_key(t) for t in env.explore_ids()[:2000]}
    key = env.content_key(0)
    assert key.startswith(f"{parts['test'][0]}<-craft ") and env.content_key(0) == key
