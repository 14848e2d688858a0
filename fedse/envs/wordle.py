"""Wordle: guess a 5-letter word in 6 guesses from green/yellow/black feedback (after LMRL-Gym).

A task *is* its secret word (and the mode): two games with the same secret are the same game to an agent,
whatever their ids. So the splits are held out by secret. LMRL-Gym's vocabulary has 40 words, too few to hold
out secrets and still train: its test games repeat the training secrets, and a test success cannot tell a
player that reasons from the feedback from one that recalls a seen game. The default word list is therefore
larger (``words="common"``): the 400 most frequent 5-letter English words, read from maintained registry
packages rather than typed here — frequencies from ``pyspellchecker``'s English dictionary, kept only if
Webster's 2nd (``english-words``' ``web2``) lists them in lower case (which drops names, plurals and
inflections, like the answer lists of real Wordle) and ``better-profanity`` does not flag them. Its secrets
are partitioned once: 25 test, 25 validation, 175 for the clients (train: seeds and exploration) and 175 for
pretraining the embedded base; every word is a valid guess. ``words="lmrl"`` keeps LMRL-Gym's 40 words
(partitioned the same way, 8/8/12/12) for comparison with published numbers.

``resample=True`` is LMRL-Gym's adversarial mode: after each guess the secret is redrawn among the words still
consistent with the feedback. It was not chosen as the default because with 40 words the adversary's game tree
has at most 40 leaves, so the expert's test games still occur in training; here it is an option on either
list, and its redraws stay inside the task's own split, so held-out games stay held out.
"""

from __future__ import annotations

import random
import re
from functools import cache
from typing import ClassVar

from fedse.envs.base import Outcome, TextEnv, partition

#: LMRL-Gym's 40 words, for `words="lmrl"`.
LMRL_VOCAB: tuple[str, ...] = (
    "panic", "solar", "shire", "proxy", "point", "robot", "prick", "wince", "crimp", "knoll",
    "sugar", "whack", "mount", "perky", "could", "wrung", "light", "those", "moist", "shard",
    "pleat", "aloft", "skill", "elder", "frame", "humor", "pause", "ulcer", "ultra", "robin",
    "cynic", "aroma", "caulk", "shake", "dodge", "swill", "tacit", "other", "thorn", "trove",
)
COMMON_SIZE = 400
#: Secrets per split, held-out parts first (fedse.envs.base.partition); the last part takes the rest.
SPLITS: dict[str, dict[str, int]] = {
    "common": {"test": 25, "val": 25, "train": 175, "pretrain": -1},
    "lmrl": {"test": 8, "val": 8, "train": 12, "pretrain": -1},
}
WORD_LISTS = tuple(SPLITS)


@cache
def common_words(size: int = COMMON_SIZE) -> tuple[str, ...]:
    """The `size` most frequent common 5-letter words (frequency, then alphabetical), in that order."""
    from better_profanity import profanity
    from english_words import get_english_words_set
    from spellchecker import SpellChecker

    web2 = {w for w in get_english_words_set(["web2"], lower=False, alpha=True) if w.islower()}
    profanity.load_censor_words()
    counts = SpellChecker(language="en").word_frequency
    words = [(w, n) for w, n in counts.items() if len(w) == 5 and w.isascii() and w.isalpha() and w in web2
             and not profanity.contains_profanity(w)]
    words.sort(key=lambda wn: (-wn[1], wn[0]))
    if len(words) < size:
        raise RuntimeError(f"the word-list packages give only {len(words)} common 5-letter words, not {size}")
    return tuple(w for w, _ in words[:size])


def vocabulary(words: str) -> tuple[str, ...]:
    """Every valid guess of a word list (also its secret pool), alphabetical."""
    if words not in SPLITS:
        raise ValueError(f"unknown Wordle word list {words!r}; known: {', '.join(SPLITS)}")
    return tuple(sorted(LMRL_VOCAB if words == "lmrl" else common_words()))


@cache
def secrets(words: str) -> dict[str, tuple[str, ...]]:
    """Split name (test, val, train, pretrain) -> its secrets: disjoint, fixed by the word list alone."""
    parts = partition(vocabulary(words), SPLITS[words], salt=f"wordle-secrets-{words}")
    return {name: tuple(part) for name, part in parts.items()}


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
    VALIDATION: ClassVar[int] = 100

    def __init__(self, resample: bool = False, words: str = "common") -> None:
        super().__init__()
        self.resample = resample
        self.words = words
        self.vocab = vocabulary(words)
        self._valid = frozenset(self.vocab)
        self.secret = self.vocab[0]
        self.pool: tuple[str, ...] = self.vocab
        self.history: list[tuple[str, str]] = []
        self.guesses = 0
        self._rng = random.Random(0)

    def split_pool(self, task_id: int) -> tuple[str, ...]:
        """The secrets of the task's split: train ids draw from the clients' part, never a held-out one."""
        split = self.split_of(task_id)
        if split is None:
            raise ValueError(f"wordle: task id {task_id} is in no split")
        return secrets(self.words)[split]

    def secret_of(self, task_id: int) -> str:
        """Test ids walk the test secrets in order (25 distinct on the common list); other ids draw by seed."""
        pool = self.split_pool(task_id)
        if task_id in self.test_ids:
            return pool[(task_id - self.test_ids.start) % len(pool)]
        return random.Random(f"wordle-{task_id}").choice(pool)

    def content_key(self, task_id: int) -> str:
        """Word list, mode and (first) secret: the whole game a fixed-secret agent faces."""
        return f"{self.words}:{'resample' if self.resample else 'fixed'}:{self.secret_of(task_id)}"

    def _reset(self, task_id: int) -> str:
        self._rng = random.Random(f"wordle-resample-{task_id}")
        self.pool = self.split_pool(task_id)
        self.secret = self.secret_of(task_id)
        self.history = []
        self.guesses = 0
        return self.instruction()

    def instruction(self) -> str:
        if self.words == "lmrl":
            listing = f"The word is one of: {', '.join(self.vocab)}."
        else:
            listing = f"The word is one of {len(self.vocab)} common English words, and only those are valid guesses."
        return ("Let's play Wordle. Guess the secret 5-letter word in 6 guesses. Type a guess as 5 letters "
                "separated by spaces, e.g. 's h a k e'. After each guess you get one letter per position: "
                f"g = right letter in the right place, y = in the word but elsewhere, b = not in the word. {listing}")

    def _step(self, action: str) -> Outcome:
        match = _GUESS_RE.match(action) if len(action) < 80 else None
        if match is None:
            return Outcome(f"Could not read a guess in {action[:60]!r}: type 5 letters separated by spaces, "
                           "e.g. 's h a k e'.", valid=False)
        guess = re.sub(r"\s+", "", match.group(1)).lower()
        self.guesses += 1
        left = MAX_GUESSES - self.guesses
        if guess not in self._valid:
            done = left == 0
            return Outcome(f"invalid word: {spaced(guess)} is not in the word list. {left} guesses left.",
                           done=done, valid=False)
        if self.resample:
            # LMRL's adversary, inside the task's own split so a held-out game stays held out
            candidates = consistent(list(self.pool), self.history)
            self.secret = self._rng.choice(candidates)
        colours = feedback(guess, self.secret)
        self.history.append((guess, colours))
        if guess == self.secret:
            return Outcome(f"{colours}\nCorrect! The word was {guess}.", reward=1.0, done=True, success=True)
        if left == 0:
            return Outcome(f"{colours}\nOut of guesses.", done=True)
        return Outcome(f"{colours}\n{left} guesses left.")

    def admissible_actions(self) -> list[str]:
        return [spaced(w) for w in self.vocab]

    def expert_action(self) -> str:
        """Consistent-candidate solver: guess the word that best splits the remaining candidates.

        It knows what the agent knows, the word list, and not the split's secrets: its seed trajectories
        show reasoning that carries over to held-out secrets, not a preference for the training ones. It
        scores every valid word by the size of the largest feedback bucket it leaves among the words still
        consistent; ties go to a candidate, then to alphabetical order. The opening is the same for every
        game, so it is computed once.
        """
        if not self.history:
            return spaced(_opening(self.vocab))
        return spaced(_best_split(self.vocab, consistent(list(self.vocab), self.history)))


@cache
def _opening(vocab: tuple[str, ...]) -> str:
    return _best_split(vocab, list(vocab))


def _best_split(vocab: tuple[str, ...], candidates: list[str]) -> str:
    if len(candidates) <= 2:
        return candidates[0]
    members = set(candidates)

    def worst_bucket(word: str) -> tuple[int, int]:
        buckets: dict[str, int] = {}
        for c in candidates:
            key = feedback(word, c)
            buckets[key] = buckets.get(key, 0) + 1
        return max(buckets.values()), 0 if word in members else 1

    return min(vocab, key=worst_bucket)
