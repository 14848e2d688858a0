"""The contract every registered environment honours (see fedse/envs/base.py), checked on all of them.

The property tests send 2,000 generated actions to each of the five environments (10,000 in all): empty,
unicode, huge, and near misses of the actions the environment itself lists. None may raise; each must be
answered with feedback text and consume exactly one turn.
"""

from __future__ import annotations

import math
import random
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedse.envs.registry import env_class, env_names, make_env

EXAMPLES_PER_ENV = 2_000
NAMES = env_names()

garbage = st.one_of(
    st.just(""),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=200),
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=8), st.integers(2_000, 200_000)),
    st.sampled_from(["\x00", "\n\n", "click[", "search[]", "click[]", "go to", "craft 0 x using", "get -1 log",
                     "move", "m o v e", "a b c d e f", "toggle and go through", "pick up", "craft", "get",
                     "inventory inventory", "click[buy now", "search[" + "x" * 10_000 + "]", "1e309", "None"]),
)


def mutate(action: str, how: int, extra: str) -> str:
    """Near misses of a valid action: cut, doubled, extended, case-flipped, digits changed, spaced."""
    return [
        action[: len(action) // 2],
        action + action,
        action + extra,
        extra + action,
        action.swapcase(),
        "".join("9" if ch.isdigit() else ch for ch in action) + "0",
        action.replace(" ", ""),
        " ".join(action),
    ][how % 8]


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=EXAMPLES_PER_ENV, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_any_text_is_answered_with_feedback(name: str, data: st.DataObject) -> None:
    env = make_env(name)
    cls = env_class(name)
    task = data.draw(st.one_of(st.integers(cls.test_ids.start, cls.test_ids.stop - 1),
                               st.integers(cls.train_ids.start, cls.train_ids.start + 50_000)), label="task")
    _, info = env.reset(task)
    for _ in range(data.draw(st.integers(0, min(3, cls.max_turns - 1)), label="warmup")):  # reach later states
        _, _, term, trunc, info = env.step(env.expert_action())
        if term or trunc:
            _, info = env.reset(task)
            break
    valid = info["admissible_actions"]
    action = data.draw(st.one_of(
        garbage,
        st.builds(mutate, st.sampled_from(valid), st.integers(0, 7), st.text(max_size=5)),
    ), label="action")
    turn = env.turn
    observation, reward, terminated, truncated, info = env.step(action)
    assert isinstance(observation, str) and observation.strip(), "every action gets feedback text"
    assert isinstance(reward, float) and math.isfinite(reward)
    assert env.turn == turn + 1, "an action (valid or not) consumes exactly one turn"
    assert set(info) >= {"success", "admissible_actions", "task_id", "valid_action"}
    assert info["task_id"] == task
    if terminated or truncated:
        assert info["admissible_actions"] == []


@pytest.mark.parametrize("name", NAMES)
def test_garbage_forever_ends_at_the_turn_limit(name: str) -> None:
    env = make_env(name)
    env.reset(env.test_ids.start)
    for turn in range(1, env.max_turns + 1):
        _, _, terminated, truncated, info = env.step("¿qué? " * turn)
        assert not info["valid_action"] and not info["success"]
        if terminated or truncated:
            break
    assert env.done and turn <= env.max_turns


@pytest.mark.parametrize("name", NAMES)
def test_same_task_same_actions_same_observations(name: str) -> None:
    """Determinism by task id: two instances, interleaved with other tasks, replay identically."""
    cls = env_class(name)
    for task in (cls.test_ids.start, cls.test_ids.stop - 1, cls.train_ids.start + 12_345):
        rng = random.Random(task)
        first, second, noise = make_env(name), make_env(name), make_env(name)
        transcript_a, info_a = first.reset(task)
        noise.reset(cls.train_ids.start + 7)
        transcript_b, info_b = second.reset(task)
        assert transcript_a == transcript_b and info_a == info_b
        done = False
        while not done:
            action = rng.choice(info_a["admissible_actions"] + ["not an action"])
            obs_a, r_a, term, trunc, info_a = first.step(action)
            noise.step(action) if not noise.done else None
            obs_b, r_b, _, _, info_b = second.step(action)
            assert (obs_a, r_a, info_a) == (obs_b, r_b, info_b)
            done = term or trunc


@pytest.mark.parametrize("name", NAMES)
def test_train_and_test_ids_never_overlap(name: str) -> None:
    cls = env_class(name)
    assert len(cls.test_ids) > 0 and len(cls.train_ids) >= 100_000
    assert cls.test_ids.step == cls.train_ids.step == 1
    ranges = sorted([cls.test_ids, cls.train_ids, cls.pretrain_ids()], key=lambda r: r.start)
    assert all(a.stop <= b.start for a, b in pairwise(ranges)), "the three ranges are disjoint"
    assert not set(cls.test_ids) & set(cls.train_ids[:100_000])
    probes = (cls.test_ids[0], cls.validation_ids()[-1], cls.train_ids[-1], cls.pretrain_ids()[0])
    assert [cls.split_of(i) for i in probes] == ["test", "val", "train", "pretrain"]
    val, explore = cls.validation_ids(), cls.explore_ids()
    assert len(val) == cls.VALIDATION and val.stop == explore.start and explore.stop <= cls.train_ids.stop
    assert len(explore) >= 400


def test_paper_test_sizes_and_turn_limits() -> None:
    expected = {"babyai": (90, 20), "webshop": (200, 10), "textcraft": (100, 20), "maze": (25, 15),
                "wordle": (25, 8)}
    got = {n: (len(env_class(n).test_ids), env_class(n).max_turns) for n in NAMES}
    assert got == expected


@pytest.mark.parametrize("name", NAMES)
def test_out_of_range_task_ids_are_refused_with_the_ranges_named(name: str) -> None:
    env = make_env(name)
    with pytest.raises(ValueError, match="outside the test ids"):
        env.reset(env.pretrain_ids().stop + 1)
    with pytest.raises(ValueError, match="outside the test ids"):
        env.reset(-1)


@pytest.mark.parametrize("name", NAMES)
def test_step_after_the_end_is_a_programming_error(name: str) -> None:
    env = make_env(name)
    env.reset(env.test_ids.start)
    while not env.done:
        env.step(env.expert_action())
    with pytest.raises(RuntimeError, match="reset"):
        env.step("anything")


@pytest.mark.parametrize("name", NAMES)
def test_admissible_actions_are_accepted_as_valid(name: str) -> None:
    rng = random.Random(0)
    env = make_env(name)
    for task in list(env.test_ids[:5]) + list(env.train_ids[:5]):
        _, info = env.reset(task)
        while not env.done:
            assert info["admissible_actions"], "a running episode always offers an action"
            _, _, _, _, info = env.step(rng.choice(info["admissible_actions"]))
            assert info["valid_action"]


def test_registry_names_unknown_env() -> None:
    with pytest.raises(KeyError, match="known: babyai"):
        env_class("chess")
    with pytest.raises(ValueError, match="bad environment options"):
        make_env("maze", nonsense=1)


@pytest.mark.parametrize("name", NAMES)
def test_content_keys_hold_test_and_validation_apart_and_never_disturb_an_episode(name: str) -> None:
    env = make_env(name)
    test = {env.content_key(t) for t in env.test_ids}
    val = {env.content_key(t) for t in env.validation_ids()}
    assert test and val and not test & val, "validation is independent of test in content"
    others = [*env.explore_ids()[:200], *env.pretrain_ids()[:200]]
    assert not {env.content_key(t) for t in others} & (test | val)
    playing = make_env(name)
    first, info = playing.reset(env.validation_ids()[3])
    keys = [playing.content_key(t) for t in (env.test_ids[1], env.explore_ids()[5], env.pretrain_ids()[7])]
    action = info["admissible_actions"][0]
    fresh = make_env(name)
    assert fresh.reset(env.validation_ids()[3])[0] == first
    assert playing.step(action)[:4] == fresh.step(action)[:4], "a key computed mid-episode changes nothing"
    assert keys == [env.content_key(t) for t in (env.test_ids[1], env.explore_ids()[5], env.pretrain_ids()[7])]
