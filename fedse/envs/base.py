"""The contract every private text environment of a federation honours.

A client's environment is a black box to the rest of fedse: the policy sees text, types text, and is told
whether it succeeded. Everything that must hold for *every* environment (turn limits, feedback for bad
input, the `info` keys, determinism by task id, disjoint train/test ids) lives here once, so that a new
environment only describes its own world.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")

#: Redraws a seeded environment may take to find an instance whose content is not held out (a collision is
#: rare: a handful per thousand ids), before it admits its generator cannot avoid the held-out set.
MAX_REDRAWS = 64


@dataclass(frozen=True)
class Outcome:
    """What an environment's own rules make of one action, before the shared turn bookkeeping."""

    observation: str
    reward: float = 0.0
    done: bool = False
    success: bool = False
    valid: bool = True


class TextEnv(ABC):
    """A deterministic, text-in/text-out task environment with held-out test tasks.

    Subclasses set the class attributes and implement `_reset`, `_step` and `admissible_actions`.
    Task ids are plain integers: ``test_ids`` and ``train_ids`` are disjoint ranges, and the same id always
    yields the same task, so that results are reproducible from (env, task id, actions) alone. A third range,
    ``pretrain_ids`` (right after the train ids), is for building a base model's general competence: it is
    neither a client's private training data nor held-out evaluation data. The first ``VALIDATION`` train
    ids are held back as a validation split (for choosing hyperparameters without touching test tasks); seeds
    and client exploration draw only from ``explore_ids()``, the rest of the train range.

    Distinct ids are not enough: two ids that give the same secret word, goal item or maze instance are the
    same task to an agent. So every environment also says what a task *is* (``content_key``), and its
    splits are disjoint in that key: no test key is a validation, train or pretrain key, and no validation
    key is a train or pretrain key. Environments whose tasks come from a finite pool (a word list, a goal
    list, a maze's start/goal pairs) partition the pool (``partition``); those that generate a task from a
    seed redraw an instance whose key is held out (``first_free``). `fedse envs audit` checks the result.
    """

    name: ClassVar[str]
    max_turns: ClassVar[int]
    test_ids: ClassVar[range]
    train_ids: ClassVar[range]

    VALIDATION: ClassVar[int] = 100

    @classmethod
    def validation_ids(cls) -> range:
        """Train-distribution tasks nobody trains on: tune on these, report on `test_ids`."""
        return cls.train_ids[:cls.VALIDATION]

    @classmethod
    def explore_ids(cls) -> range:
        """The train ids seeds are written from and clients explore (the train range minus validation).

        An environment may narrow it to the part of its train range that is its clients' actual world.
        """
        return cls.train_ids[cls.VALIDATION:]

    @classmethod
    def pretrain_ids(cls) -> range:
        """Ids after the train range, as many again: never explored by a client, never evaluated on."""
        return range(cls.train_ids.stop, cls.train_ids.stop + len(cls.train_ids))

    def content_key(self, task_id: int) -> str:
        """What task `task_id` is to an agent: what it sees and what solves it, without the id.

        Two ids with the same key are the same task (the key names the secret, the goal item and its recipe
        tree, the layout with its start and goal, the mission and world, the instruction's demands). It may
        depend on the instance's options (Wordle's word list); an environment without options may make it a
        classmethod. It never disturbs the episode the instance is playing.
        """
        raise NotImplementedError(f"{self.name}: no content key")

    @classmethod
    def heldout_keys(cls, split: str) -> frozenset[str]:
        """The content keys of the test or the validation split (computed once per process and class)."""
        return _heldout_keys(cls, split)

    @classmethod
    def banned_keys(cls, task_id: int) -> frozenset[str]:
        """Keys task `task_id` must not take: none for test ids, the test keys for validation ids, the test and
        validation keys for every other id (train, exploration, seeds, pretraining)."""
        split = cls.split_of(task_id)
        if split == "test":
            return frozenset()
        if split == "val":
            return cls.heldout_keys("test")
        return cls.heldout_keys("test") | cls.heldout_keys("val")

    def __init__(self) -> None:
        self.task_id: int | None = None
        self.turn = 0
        self.done = True
        self.success = False
        self.last_reward = 0.0

    # ----------------------------------------------------------------- what subclasses provide
    @abstractmethod
    def _reset(self, task_id: int) -> str:
        """Build task `task_id` and return the first observation (which includes the instruction)."""

    @abstractmethod
    def _step(self, action: str) -> Outcome:
        """Apply one action. Must answer any string with an Outcome (feedback when invalid), never raise."""

    @abstractmethod
    def admissible_actions(self) -> list[str]:
        """Actions that are valid in the current state, in a deterministic order."""

    @abstractmethod
    def instruction(self) -> str:
        """The task statement an agent is given (also contained in the first observation)."""

    @abstractmethod
    def expert_action(self) -> str:
        """What a privileged expert solver does now; it reads the hidden state, so it lives with the world.

        Used to write the seed trajectories (the AgentTraj analogue) and to prove every test task solvable.
        """

    # ----------------------------------------------------------------- the shared contract
    def reset(self, task_id: int) -> tuple[str, dict[str, Any]]:
        """Start task `task_id` (an id of any of the three ranges)."""
        task_id = int(task_id)
        if self.split_of(task_id) is None:
            raise ValueError(
                f"{self.name}: task id {task_id} is outside the test ids {_fmt(self.test_ids)}, the train ids "
                f"{_fmt(self.train_ids)} and the pretrain ids {_fmt(self.pretrain_ids())}"
            )
        self.task_id = task_id
        self.turn = 0
        self.done = False
        self.success = False
        self.last_reward = 0.0
        observation = self._reset(task_id)
        return observation, self._info(valid=True)

    def step(self, action: Any) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Apply `action` (anything; it is read as text) and return obs, reward, terminated, truncated, info.

        An invalid action still consumes a turn and is answered with feedback, so an agent that types
        garbage runs out of turns instead of crashing the rollout.
        """
        if self.done:
            raise RuntimeError(f"{self.name}: step() after the episode ended; call reset() first")
        text = action if isinstance(action, str) else str(action)
        outcome = self._step(text)
        self.turn += 1
        self.success = bool(outcome.success)
        self.last_reward = float(outcome.reward)
        terminated = bool(outcome.done)
        truncated = not terminated and self.turn >= self.max_turns
        self.done = terminated or truncated
        return outcome.observation, self.last_reward, terminated, truncated, self._info(valid=outcome.valid)

    @classmethod
    def split_of(cls, task_id: int) -> str | None:
        """'test', 'val', 'train', 'pretrain', or None for an id in no range."""
        ranges = (("test", cls.test_ids), ("val", cls.validation_ids()), ("train", cls.train_ids),
                  ("pretrain", cls.pretrain_ids()))
        for split, ids in ranges:
            if task_id in ids:
                return split
        return None

    def _info(self, valid: bool) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "turn": self.turn,
            "success": self.success,
            "valid_action": valid,
            "admissible_actions": [] if self.done else self.admissible_actions(),
        }


@cache
def _heldout_keys(cls: type[TextEnv], split: str) -> frozenset[str]:
    ids = {"test": cls.test_ids, "val": cls.validation_ids()}[split]
    scratch = cls()
    return frozenset(scratch.content_key(t) for t in ids)


def partition(pool: Sequence[T], sizes: dict[str, int], salt: str) -> dict[str, list[T]]:
    """Split a finite content pool into disjoint named parts of the given sizes (in that order, the last part
    may be -1 = the rest), after one seeded shuffle, so each part spans the whole pool.

    Held-out parts must come first: they get exactly their size whatever the pool's size later becomes.
    """
    order = list(pool)
    random.Random(salt).shuffle(order)
    parts: dict[str, list[T]] = {}
    at = 0
    for name, size in sizes.items():
        end = len(order) if size < 0 else at + size
        if end > len(order) or end <= at:
            raise ValueError(f"{salt}: a pool of {len(order)} cannot give {name} {size} (sizes {sizes})")
        parts[name] = order[at:end]
        at = end
    return parts


def first_free(task_id: int, banned: frozenset[str], key_of: Callable[[int], str], what: str) -> int:
    """The first redraw r = 0, 1, … whose instance key is not banned: a seeded environment's instance for
    `task_id` is drawn with (task_id, r), so that a train id never repeats a held-out task's content."""
    for redraw in range(MAX_REDRAWS):
        if key_of(redraw) not in banned:
            return redraw
    raise RuntimeError(f"{what}: task {task_id} hit held-out content in {MAX_REDRAWS} redraws")


def _fmt(ids: range) -> str:
    return f"[{ids.start}, {ids.stop})"
