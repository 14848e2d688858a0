"""Policies that need no model: the privileged expert, uniform random valid actions, and a human.

They share the batched signature of `EnvPool.run` (running envs and slots in, one action each out), so the
same pool code drives them and, later, the LLM policy.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from fedse.envs.base import TextEnv
from fedse.envs.pool import Slot

Act = Callable[[list[TextEnv], list[Slot]], list[str]]
POLICIES = ("expert", "random", "human")


def expert_policy() -> Act:
    """Each env's own solver (reads hidden state): the AgentTraj analogue for seed data."""
    return lambda envs, _slots: [env.expert_action() for env in envs]


def random_policy(seed: int) -> Act:
    """A uniformly random admissible action — the 'random valid action' baseline of the paper's anchors."""
    rng = random.Random(seed)
    return lambda _envs, slots: [rng.choice(slot.info["admissible_actions"]) for slot in slots]


def human_policy(ask: Callable[[str], str] = input) -> Act:
    """Whatever the person at the terminal types (one episode at a time)."""
    return lambda _envs, slots: [ask("> ") for _ in slots]


def make_policy(name: str, seed: int = 0) -> Act:
    """Policy by name; an unknown name gets one line listing the known ones."""
    if name == "expert":
        return expert_policy()
    if name == "random":
        return random_policy(seed)
    if name == "human":
        return human_policy()
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
