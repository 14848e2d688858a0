from __future__ import annotations

import hashlib
import random

import pytest

from fedse.envs.wordle import (
    LMRL_VOCAB,
    SPLITS,
    WORD_LISTS,
    WordleEnv,
    common_words,
    consistent,
    feedback,
    secrets,
    spaced,
    vocabulary,
)


@pytest.mark.parametrize(("guess", "secret", "expected"), [
    ("shake", "shake", "g g g g g"),
    ("robin", "robot", "g g g b b"),
    ("elder", "other", "b b b g g"),  # the only e of "other" is already green
    ("aloft", "tacit", "y b b b g"),
    ("skill", "swill", "g b g g g"),  # repeated l: both green, no yellow left over
    ("llama", "hello", "y y b b b"),  # two l guessed, two in the secret (neither in place)
    ("lolly", "hello", "b y g g b"),  # both l of the secret are green: the first l is black
])
def test_feedback_follows_wordle_rules_for_repeated_letters(guess: str, secret: str, expected: str) -> None:
    assert feedback(guess, secret) == expected


COMMON_SHA256 = "8d1b9d9c8dc1a4a943af06c06e511c3287189bb145ad79c1c961ad8135f08958"


def test_common_word_list_is_400_plain_words_and_pinned() -> None:
    words = common_words()
    assert len(words) == len(set(words)) == 400
    assert all(len(w) == 5 and w.isascii() and w.isalpha() and w.islower() for w in words)
    assert words[0] == "about" and "gonna" not in words and "years" not in words  # no slang, no plurals
    # the packages are pinned; a release that changes the list changes every Wordle task: re-split knowingly
    assert hashlib.sha256(" ".join(vocabulary("common")).encode()).hexdigest() == COMMON_SHA256


@pytest.mark.parametrize("words", WORD_LISTS)
def test_secret_splits_partition_the_word_list(words: str) -> None:
    parts = secrets(words)
    flat = [w for part in parts.values() for w in part]
    assert len(flat) == len(set(flat)) == len(vocabulary(words)), "disjoint, and together the whole list"
    assert len(parts["test"]) == SPLITS[words]["test"] and len(parts["val"]) == SPLITS[words]["val"]


def test_each_split_draws_its_secrets_only_from_its_own_part() -> None:
    env = WordleEnv()
    test = {env.secret_of(t) for t in env.test_ids}
    assert len(test) == 25 and test == set(secrets("common")["test"]), "25 distinct test secrets"
    for name, ids in (("val", env.validation_ids()), ("train", env.explore_ids()[:2000]),
                      ("pretrain", env.pretrain_ids()[:2000])):
        assert {env.secret_of(t) for t in ids} <= set(secrets("common")[name]), name
    assert env.content_key(0) == f"common:fixed:{env.secret_of(0)}"


def test_common_instruction_states_the_list_size_and_lmrl_lists_its_words() -> None:
    env = WordleEnv()
    obs, info = env.reset(0)
    assert "s h a k e" in obs and "400 common English words" in obs
    assert info["admissible_actions"] == [spaced(w) for w in env.vocab]
    lmrl = WordleEnv(words="lmrl")
    obs, _ = lmrl.reset(0)
    assert all(w in obs for w in LMRL_VOCAB)


def test_unknown_word_list_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown Wordle word list 'huge'"):
        WordleEnv(words="huge")


def test_invalid_word_costs_a_guess_unreadable_text_only_a_turn() -> None:
    env = WordleEnv()
    env.reset(1)
    obs, _, _, _, info = env.step("z z z z z")
    assert obs.startswith("invalid word") and not info["valid_action"] and env.guesses == 1
    obs, _, _, _, info = env.step("hello there")
    assert "Could not read" in obs and env.guesses == 1 and env.turn == 2


def test_six_guesses_end_the_game() -> None:
    env = WordleEnv()
    env.reset(2)
    wrong = [w for w in env.vocab if w != env.secret][:6]
    for i, word in enumerate(wrong):
        _, _, terminated, _, info = env.step(spaced(word))
        assert terminated == (i == 5)
    assert not info["success"]


def test_compact_and_spaced_guesses_are_the_same_guess() -> None:
    a, b = WordleEnv(), WordleEnv()
    a.reset(3)
    b.reset(3)
    assert a.step("shake")[0] == b.step("S H A K E")[0]


@pytest.mark.parametrize(("words", "resample", "chance"), [
    ("common", False, (0.0, 0.08)), ("common", True, (0.0, 0.08)),
    ("lmrl", False, (0.05, 0.3)), ("lmrl", True, (0.05, 0.3)),  # LMRL-Gym anchor ≈ 0.15
])
def test_expert_solves_every_test_task_and_random_is_rare(words: str, resample: bool,
                                                          chance: tuple[float, float]) -> None:
    env = WordleEnv(resample=resample, words=words)
    rng = random.Random(0)
    solved = wins = 0
    tasks = list(env.test_ids) + list(env.train_ids[:200])
    for task in tasks:
        env.reset(task)
        while not env.done:
            env.step(env.expert_action())
        solved += env.success
        _, info = env.reset(task)
        while not env.done:
            _, _, _, _, info = env.step(rng.choice(info["admissible_actions"]))
        wins += env.success
    assert solved == len(tasks)
    assert chance[0] <= wins / len(tasks) < chance[1]


def test_resample_mode_keeps_the_secret_consistent_and_inside_its_split() -> None:
    env = WordleEnv(resample=True)
    rng = random.Random(5)
    for task in range(25):
        env.reset(task)
        while not env.done:
            env.step(spaced(rng.choice(env.vocab)))
            assert env.secret in consistent(list(env.vocab), env.history)
            assert env.secret in secrets("common")["test"], "a held-out game ends on a held-out secret"
