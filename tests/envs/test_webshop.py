from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fedse.envs.webshop import (
    CATEGORIES,
    MAX_RESULTS,
    PAGE_SIZE,
    WebShopEnv,
    candidate_queries,
    demands_key,
    draw_goal,
    fits,
    make_goal,
    reward,
    shop,
)

INSTRUCTION_RE = re.compile(
    r"^(i need|i am looking for|i want|find me|i would like) .+, and price lower than \d+\.00 dollars$"
)
ITEM_ID_RE = re.compile(r"^click\[B0[A-Z0-9]{8}\]$")


def _play(env: WebShopEnv, task_id: int, choose: Callable[[list[str]], str]) -> tuple[list[tuple], dict]:
    """Run one episode, `choose` picking from the admissible actions; the transcript is what must replay."""
    obs, info = env.reset(task_id)
    transcript: list[tuple] = [(obs, info)]
    done = False
    while not done:
        obs, r, term, trunc, info = env.step(choose(info["admissible_actions"]))
        transcript.append((obs, r, term, trunc, info))
        done = term or trunc
    return transcript, info


def test_instruction_and_search_page_format() -> None:
    env = WebShopEnv()
    obs, info = env.reset(0)
    text = env.instruction()
    assert INSTRUCTION_RE.match(text), text
    assert obs.startswith("WebShop [search page]") and f"Instruction: {text}" in obs
    actions = info["admissible_actions"]
    assert actions[0] == f"search[{text}]" and all(a.startswith("search[") for a in actions)
    assert 3 <= len(actions) <= 5 and len(set(actions)) == len(actions)


def test_goal_options_are_written_as_in_webshop() -> None:
    for task in range(40):
        goal = make_goal(task)
        for name, value in goal.options:
            assert f"{name}: {value}" in goal.text
        assert goal.ptype in goal.text and all(a in goal.text for a in goal.attributes)
        assert goal.price_bound >= shop().products[goal.target].price


def test_results_and_item_pages_list_their_clickables() -> None:
    env = WebShopEnv()
    env.reset(1)
    obs, _, _, _, info = env.step(env.admissible_actions()[0])
    assert obs.startswith("WebShop [results page]") and "Page 1 of" in obs
    actions = info["admissible_actions"]
    items = [a for a in actions if ITEM_ID_RE.match(a)]
    assert actions[0] == "click[back to search]" and "click[next >]" in actions and len(items) == PAGE_SIZE
    assert all(a[6:-1] in obs for a in items), "every listed item id is shown on the page"
    obs, _, _, _, info = env.step(items[0])
    assert obs.startswith("WebShop [item page]") and "Price: $" in obs
    assert {"click[buy now]", "click[< prev]", "click[description]", "click[features]"} <= set(
        info["admissible_actions"])


def test_bad_actions_get_feedback_and_change_nothing() -> None:
    env = WebShopEnv()
    env.reset(2)
    bad = ["", "click[", "search[]", "search[   ]", "click[nonexistent]", "buy", "buy now", "\x00",
           "search[日本語]", "click[B0]\n\nclick[buy now]", "x" * 1_000_000,
           "search[" + "y" * 1_000_000 + "]", "click[buy now]", "go to", "craft 0 x using", "search[\x00]"]
    for action in bad:
        before = env.admissible_actions()
        obs, r, term, _, info = env.step(action)
        assert not info["valid_action"] and r == 0.0 and not term, action[:40]
        assert obs.startswith("Invalid action:") and "Instruction:" in obs
        assert env.admissible_actions() == before
        if env.done:
            env.reset(2)
    env.reset(2)
    env.step(env.admissible_actions()[0])
    obs, *_, info = env.step("search[red shoes]")
    assert not info["valid_action"] and "back to search" in obs, "no search box on the results page"


def test_free_text_search_is_accepted_even_if_not_listed() -> None:
    env = WebShopEnv()
    env.reset(3)
    obs, _, _, _, info = env.step("  SEARCH[ Waterproof   Hiking boots ]")
    assert info["valid_action"] and 'results for "Waterproof Hiking boots"' in obs
    env.reset(3)
    obs, _, _, _, info = env.step("search[zzqx]")
    assert info["valid_action"] and "No results" in obs
    assert info["admissible_actions"] == ["click[back to search]"]


def test_expert_solves_the_first_25_test_tasks() -> None:
    env = WebShopEnv()
    for task in WebShopEnv.test_ids[:25]:
        _, info = _play(env, task, lambda _actions: env.expert_action())
        assert info["success"] and env.last_reward == 1.0, task


def test_random_admissible_policy_rarely_succeeds() -> None:
    env = WebShopEnv()
    rng = random.Random(0)
    wins = 0
    for task in WebShopEnv.test_ids:
        _, info = _play(env, task, rng.choice)
        wins += info["success"]
    assert wins / len(WebShopEnv.test_ids) < 0.1  # WebShop's random anchor is near 0


def test_same_task_same_actions_same_transcript() -> None:
    for task in (0, 199, 10_000 + 4_321):
        a, b = WebShopEnv(), WebShopEnv()
        run_a, _ = _play(a, task, random.Random(task).choice)
        run_b, _ = _play(b, task, random.Random(task).choice)
        assert run_a == run_b


def test_catalog_and_goals_do_not_depend_on_the_process() -> None:
    """String hashing is salted per process; catalog and goals must not notice. And no build at import."""
    code = ("import fedse.envs.webshop as w; assert w.shop.cache_info().currsize == 0; "
            "s = w.shop(); print(len(s.products), s.products[123], [w.make_goal(t) for t in (0, 7, 10_001)], "
            "s.search('long lasting moisturizer')[:5])")
    root = Path(__file__).resolve().parents[2]
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)}
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             check=True)
        outputs.append(run.stdout)
    assert outputs[0] == outputs[1] and outputs[0].strip()


def test_reward_is_webshops_share_of_goal_met_times_type_match() -> None:
    products = shop().products
    goal = next(g for g in map(make_goal, range(100)) if g.options and len(g.attributes) >= 2)
    target = products[goal.target]
    total = len(goal.attributes) + len(goal.options) + 1
    assert reward(goal, target, dict(goal.options)) == 1.0
    assert reward(goal, target, {}) == pytest.approx((total - len(goal.options)) / total)
    sibling = next(p for p in products if p.category == goal.category and p.ptype != goal.ptype)
    other = next(p for p in products if p.category != goal.category)
    assert reward(goal, sibling, {}) <= 0.5 and reward(goal, other, {}) <= 0.1


def test_buying_without_the_options_is_not_a_success() -> None:
    env = WebShopEnv()
    task = next(t for t in WebShopEnv.test_ids if make_goal(t).options)
    env.reset(task)
    while env.page != "item":  # the expert opens a fitting product; buy before it selects options
        env.step(env.expert_action())
    _, r, term, _, info = env.step("click[buy now]")
    assert term and not info["success"] and 0.0 < r < 1.0


def test_search_pages_and_navigation() -> None:
    env = WebShopEnv()
    env.reset(5)
    env.step("search[cotton t-shirt]")
    assert len(env.results) == MAX_RESULTS
    first_page = env.admissible_actions()
    obs, *_ = env.step("click[next >]")
    assert "Page 2 of 5" in obs and "click[< prev]" in env.admissible_actions()
    item = next(a for a in env.admissible_actions() if ITEM_ID_RE.match(a))
    env.step(item)
    env.step("click[description]")
    obs, *_ = env.step("click[< prev]")
    assert obs.startswith("WebShop [item page]")
    obs, *_ = env.step("click[< prev]")
    assert "Page 2 of 5" in obs, "< prev on an item returns to the results page it came from"
    env.step("click[< prev]")
    assert env.admissible_actions() == first_page


def test_option_values_are_unambiguous_buttons() -> None:
    reserved = {"back to search", "next >", "< prev", "description", "features", "buy now"}
    for spec in CATEGORIES.values():
        for ptype, keys in spec.types.items():
            names = [spec.groups[k][0] for k in keys]
            values = [v for k in keys for v in spec.groups[k][1]]
            assert len(set(names)) == len(names), ptype
            assert len(set(values)) == len(values) and not set(values) & reserved, ptype


def test_every_test_goal_is_met_by_its_target_and_search_finds_a_fit() -> None:
    products = shop().products
    for task in WebShopEnv.test_ids:
        goal = make_goal(task)
        assert fits(goal, products[goal.target])
        first_page = shop().search(candidate_queries(goal)[0][7:-1])[:PAGE_SIZE]
        assert any(fits(goal, products[i]) for i in first_page), task


def test_expert_recovers_from_a_detour_and_falls_back_to_the_title() -> None:
    env = WebShopEnv()
    env.reset(7)
    env.step("search[zzqx]")  # a dead end: the expert must go back and search properly
    while not env.done:
        env.step(env.expert_action())
    assert env.success and env.turn <= WebShopEnv.max_turns
    env.reset(8)
    env.step(env.admissible_actions()[0])  # the expert's own first query, then abandoned
    env.step("click[back to search]")
    action = env.expert_action()
    assert action == f"search[{shop().products[env.goal.target].title}]"
    while not env.done:
        env.step(env.expert_action())
    assert env.success



# ---------------------------------------------------------------------------------- disjoint splits in content
def held_out() -> frozenset[str]:
    return WebShopEnv.heldout_keys("test") | WebShopEnv.heldout_keys("val")


def test_test_and_validation_demands_are_disjoint() -> None:
    test, val = WebShopEnv.heldout_keys("test"), WebShopEnv.heldout_keys("val")
    assert len(test) == len(WebShopEnv.test_ids) and len(val) == len(WebShopEnv.validation_ids())
    assert not test & val


def test_the_key_is_the_demands_not_the_phrasing_or_the_target() -> None:
    task, goal = next((t, g) for t, g in ((t, make_goal(t)) for t in range(100))
                      if g.options and len(g.attributes) >= 2)
    assert WebShopEnv.content_key(task) == demands_key(goal)
    reworded = dataclasses.replace(goal, target=goal.target + 1, phrase=goal.ptype, text="find me " + goal.ptype,
                                   attributes=goal.attributes[::-1], options=goal.options[::-1])
    assert demands_key(reworded) == demands_key(goal)
    for changed in (dataclasses.replace(goal, price_bound=goal.price_bound + 10),
                    dataclasses.replace(goal, attributes=goal.attributes[1:]),
                    dataclasses.replace(goal, options=goal.options[1:])):
        assert demands_key(changed) != demands_key(goal)


def test_sampled_explore_and_pretrain_ids_never_ask_held_out_demands() -> None:
    rng = random.Random(0)
    explore, pretrain = WebShopEnv.explore_ids(), WebShopEnv.pretrain_ids()
    sample = [*explore[:10_000], *rng.sample(explore, 2_000), *pretrain[:10_000], *rng.sample(pretrain, 2_000)]
    banned = held_out()
    assert not [t for t in sample if WebShopEnv.content_key(t) in banned]


def test_same_id_same_demands_and_first_page_across_fresh_instances() -> None:
    for task in (0, 199, 10_050, 10_178, 123_456, 210_401):
        assert make_goal(task) == make_goal(task) and WebShopEnv.content_key(task) == demands_key(make_goal(task))
        assert WebShopEnv().reset(task) == WebShopEnv().reset(task)
    code = "import fedse.envs.webshop as w; print([w.WebShopEnv.content_key(t) for t in (10_178, 210_401)])"
    root = Path(__file__).resolve().parents[2]
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)}).stdout
               for seed in ("1", "2")}
    assert outputs == {f"{[WebShopEnv.content_key(t) for t in (10_178, 210_401)]}\n"}


def test_a_train_id_drawing_held_out_demands_is_redrawn() -> None:
    banned = held_out()
    task = next(t for t in WebShopEnv.explore_ids()[:5_000] if demands_key(draw_goal(t, 0)) in banned)
    goal = make_goal(task)
    assert goal != draw_goal(task, 0) and demands_key(goal) not in banned
    env = WebShopEnv()
    _, info = _play(env, task, lambda _actions: env.expert_action())
    assert env.goal == goal and info["success"], "a redrawn goal is as solvable as any"


def test_a_planted_collision_is_redrawn_for_val_train_and_pretrain_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = (10_007, 123_456, 300_001)
    planted = frozenset(demands_key(draw_goal(t, 0)) for t in tasks)
    monkeypatch.setattr(WebShopEnv, "banned_keys", classmethod(lambda cls, t: planted))
    for task in tasks:
        goal = make_goal(task)
        assert goal == draw_goal(task, 1) and demands_key(goal) not in planted
        assert WebShopEnv().reset(task)[0].count(goal.text) == 1


def test_test_ids_keep_their_goals() -> None:
    goals = [make_goal(task) for task in WebShopEnv.test_ids]
    assert goals == [draw_goal(task, 0) for task in WebShopEnv.test_ids]
    texts = "\n".join(goal.text for goal in goals)
    assert hashlib.sha256(texts.encode()).hexdigest()[:16] == "dbc3673436674166", "as before redraws existed"
