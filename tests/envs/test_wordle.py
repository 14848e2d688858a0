from __future__ import annotations

import random

import pytest

from fedse.envs.wordle import VOCAB, WordleEnv, consistent, feedback, spaced


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


def test_instruction_lists_the_vocabulary_and_action_format() -> None:
    env = WordleEnv()
    obs, info = env.reset(0)
    assert "s h a k e" in obs and all(w in obs for w in VOCAB)
    assert info["admissible_actions"] == [spaced(w) for w in VOCAB]


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
    wrong = [w for w in VOCAB if w != env.secret][:6]
    for i, word in enumerate(wrong):
        _, _, terminated, _, info = env.step(spaced(word))
        assert terminated == (i == 5)
    assert not info["success"]


def test_compact_and_spaced_guesses_are_the_same_guess() -> None:
    a, b = WordleEnv(), WordleEnv()
    a.reset(3)
    b.reset(3)
    assert a.step("solar")[0] == b.step("S O L A R")[0]


@pytest.mark.parametrize("resample", [False, True])
def test_expert_solves_every_test_task_and_random_is_near_anchor(resample: bool) -> None:
    env = WordleEnv(resample=resample)
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
    assert 0.05 < wins / len(tasks) < 0.3  # LMRL-Gym anchor ≈ 0.15


def test_resample_mode_keeps_the_secret_consistent_with_all_feedback() -> None:
    env = WordleEnv(resample=True)
    rng = random.Random(5)
    for task in range(25):
        env.reset(task)
        while not env.done:
            env.step(spaced(rng.choice(VOCAB)))
            assert env.secret in consistent(list(VOCAB), env.history)
