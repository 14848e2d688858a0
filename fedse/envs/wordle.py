"""Wordle (LMRL-Gym): guess a 5-letter word in 6 guesses from green/yellow/black feedback.

The vocabulary is LMRL-Gym's 40 words, so the random-guess anchor (≈15%) is comparable. With 40 words the
secrets of train and test tasks necessarily repeat; what is held out is the task id, which seeds the secret
and, in LMRL's ``resample`` mode, the choice of the secret among the words still consistent with the
feedback after every guess (an adversary that cannot be memorised, only reasoned with).
"""

from __future__ import annotations

import random
import re

from fedse.envs.base import Outcome, TextEnv

VOCAB: tuple[str, ...] = (
    "panic", "solar", "shire", "proxy", "point", "robot", "prick", "wince", "crimp", "knoll",
    "sugar", "whack", "mount", "perky", "could", "wrung", "light", "those", "moist", "shard",
    "pleat", "aloft", "skill", "elder", "frame", "humor", "pause", "ulcer", "ultra", "robin",
    "cynic", "aroma", "caulk", "shake", "dodge", "swill", "tacit", "other", "thorn", "trove",
)
MAX_GUESSES = 6
_GUESS_RE = re.compile(r"^\s*(?:guess\s*:?\s*)?((?:[a-z]\s*){5})\s*$", re.IGNORECASE)


def feedback(guess: str, secret: str) -> str:
    """Wordle colouring, duplicate letters handled as the real game: greens first, then yellows by count."""
    colours = ["b"] * 5
    remaining: dict[str, int] = {}
    for i, (g, s) in enumerate(zip(guess, secret, strict=True)):
        if g == s:
            colours[i] = "g"
        else:
            remaining[s] = remaining.get(s, 0) + 1
    for i, g in enumerate(guess):
        if colours[i] != "g" and remaining.get(g, 0) > 0:
            colours[i] = "y"
            remaining[g] -= 1
    return " ".join(colours)


def spaced(word: str) -> str:
    """The action form the agent types: letters separated by spaces."""
    return " ".join(word)


def consistent(words: list[str], history: list[tuple[str, str]]) -> list[str]:
    """Words that would have produced every feedback seen so far."""
    return [w for w in words if all(feedback(g, w) == f for g, f in history)]


class WordleEnv(TextEnv):
    """Six guesses; an unknown word costs a guess, unparseable text costs only a turn (of 8)."""

    name = "wordle"
    max_turns = 8
    test_ids = range(0, 25)
    train_ids = range(10_000, 10_000 + 1_000_000)

    def __init__(self, resample: bool = False) -> None:
        super().__init__()
        self.resample = resample
        self.secret = VOCAB[0]
        self.history: list[tuple[str, str]] = []
        self.guesses = 0
        self._rng = random.Random(0)

    def _reset(self, task_id: int) -> str:
        self._rng = random.Random(f"wordle-{task_id}")
        self.secret = self._rng.choice(VOCAB)
        self.history = []
        self.guesses = 0
        return self.instruction()

    def instruction(self) -> str:
        return ("Let's play Wordle. Guess the secret 5-letter word in 6 guesses. Type a guess as 5 letters "
                "separated by spaces, e.g. 's h a k e'. After each guess you get one letter per position: "
                "g = right letter in the right place, y = in the word but elsewhere, b = not in the word. "
                f"The word is one of: {', '.join(VOCAB)}.")

    def _step(self, action: str) -> Outcome:
        match = _GUESS_RE.match(action) if len(action) < 80 else None
        if match is None:
            return Outcome(f"Could not read a guess in {action[:60]!r}: type 5 letters separated by spaces, "
                           "e.g. 's h a k e'.", valid=False)
        guess = re.sub(r"\s+", "", match.group(1)).lower()
        self.guesses += 1
        left = MAX_GUESSES - self.guesses
        if guess not in VOCAB:
            done = left == 0
            return Outcome(f"invalid word: {spaced(guess)} is not in the word list. {left} guesses left.",
                           done=done, valid=False)
        if self.resample:
            candidates = consistent(list(VOCAB), self.history)
            self.secret = self._rng.choice(candidates)
        colours = feedback(guess, self.secret)
        self.history.append((guess, colours))
        if guess == self.secret:
            return Outcome(f"{colours}\nCorrect! The word was {guess}.", reward=1.0, done=True, success=True)
        if left == 0:
            return Outcome(f"{colours}\nOut of guesses.", done=True)
        return Outcome(f"{colours}\n{left} guesses left.")

    def admissible_actions(self) -> list[str]:
        return [spaced(w) for w in VOCAB]

    def expert_action(self) -> str:
        """Consistent-candidate solver: guess the word that best splits the remaining candidates.

        Scoring over all 40 words (not just candidates) by the size of the largest feedback bucket solves
        every secret within 6 guesses; ties go to a candidate, then to vocabulary order.
        """
        candidates = consistent(list(VOCAB), self.history)
        if len(candidates) <= 2:
            return spaced(candidates[0])

        def worst_bucket(word: str) -> tuple[int, int]:
            buckets: dict[str, int] = {}
            for c in candidates:
                key = feedback(word, c)
                buckets[key] = buckets.get(key, 0) + 1
            return max(buckets.values()), 0 if word in candidates else 1

        return spaced(min(VOCAB, key=worst_bucket))
