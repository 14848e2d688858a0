"""The contract every private text environment of a federation honours.

A client's environment is a black box to the rest of fedse: the policy sees text, types text, and is told
whether it succeeded. Everything that must hold for *every* environment (turn limits, feedback for bad
input, the `info` keys, determinism by task id, disjoint train/test ids) lives here once, so that a new
environment only describes its own world.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar


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


def _fmt(ids: range) -> str:
    return f"[{ids.start}, {ids.stop})"
