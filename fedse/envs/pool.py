"""Many episodes of one environment stepped together, so a batched policy makes one decision per batch.

A rollout of N episodes asks the policy for actions only for the episodes still running; finished ones keep
their final state and are never stepped again. With a `capacity`, at most that many run at once and the
others wait in order: each starts as soon as a running one ends (continuous batching), so the policy's batch
stays full until the queue is empty. Environments are pure Python and cheap, so the pool is sequential; the
batching pays off on the policy side (one forward pass for all running episodes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedse.envs.base import TextEnv
from fedse.trajectory import Trajectory, Turn


@dataclass
class Slot:
    """One episode's running state inside a pool."""

    task_id: int
    first_observation: str
    observation: str
    info: dict[str, Any]
    reward: float = 0.0
    done: bool = False
    history: list[tuple[str, str]] = field(default_factory=list)  # (action, observation after it)
    thoughts: list[str] = field(default_factory=list)  # the policy's reasoning per action (ReAct), if any
    key: str = ""  # names the episode's sampling noise (fedse.policy); "" = the policy's own fallback


class EnvPool:
    """Runs one episode per task id, each on its own environment instance.

    `keys` (one per task id) name each episode's sampling noise, so that what an episode draws depends on the
    episode alone and not on which others share its pool (see `fedse.policy.gumbel`). `capacity`: at most this
    many episodes run at once, the next queued one starting when one ends (None: all from the start).
    """

    def __init__(self, make: Callable[[], TextEnv], task_ids: Sequence[int], keys: Sequence[str] | None = None,
                 capacity: int | None = None) -> None:
        keys = list(keys) if keys is not None else [""] * len(task_ids)
        if len(keys) != len(task_ids):
            raise ValueError(f"EnvPool: {len(keys)} keys for {len(task_ids)} task ids")
        if capacity is not None and capacity < 1:
            raise ValueError(f"EnvPool: capacity {capacity}; at least one episode must run")
        self.make, self.queue = make, list(zip(task_ids, keys, strict=True))
        self.capacity = capacity or max(len(task_ids), 1)
        self.envs: list[TextEnv] = []
        self.slots: list[Slot] = []  # the episodes started so far, in task order
        self.admit()

    def admit(self) -> int:
        """Start queued episodes while fewer than `capacity` run; returns how many started."""
        started = 0
        while len(self.slots) < len(self.queue) and len(self.running()) < self.capacity:
            task_id, key = self.queue[len(self.slots)]
            env = self.make()
            observation, info = env.reset(task_id)
            self.envs.append(env)
            self.slots.append(Slot(task_id, observation, observation, info, key=key))
            started += 1
        return started

    def running(self) -> list[int]:
        """Indices of the episodes that still need an action."""
        return [i for i, slot in enumerate(self.slots) if not slot.done]

    def step(self, actions: dict[int, str]) -> list[int]:
        """Apply one action to each named running episode, start queued ones in the places of those that ended;
        return the indices running afterwards."""
        for i, action in actions.items():
            slot = self.slots[i]
            if slot.done:
                raise ValueError(f"episode {i} (task {slot.task_id}) has already ended")
            observation, reward, terminated, truncated, info = self.envs[i].step(action)
            slot.history.append((action, observation))
            slot.observation, slot.reward, slot.info = observation, reward, info
            slot.done = terminated or truncated
        self.admit()
        return self.running()

    def run(self, act: Callable[[list[TextEnv], list[Slot]], list[str]],
            ended: Callable[[int], None] | None = None) -> list[Slot]:
        """Step until every episode ends; `act` gets the running envs and slots and returns their actions;
        `ended(n)` is told after each step how many episodes it ended."""
        live = self.running()
        while live:
            actions = act([self.envs[i] for i in live], [self.slots[i] for i in live])
            after = self.step(dict(zip(live, actions, strict=True)))
            if ended is not None and (count := sum(self.slots[i].done for i in live)):
                ended(count)
            live = after
        return self.slots

    def trajectories(self, env_name: str, **provenance: Any) -> list[Trajectory]:
        """The finished episodes as trajectory records; `provenance` fills policy, round, seed, …"""
        if len(self.slots) < len(self.queue):
            raise ValueError(f"{len(self.queue) - len(self.slots)} episodes have not started")
        records = []
        for env, slot in zip(self.envs, self.slots, strict=True):
            if not slot.done:
                raise ValueError(f"episode of task {slot.task_id} is still running")
            observations = [slot.first_observation] + [obs for _, obs in slot.history]
            # observation i is what action i answered; the last observation is the final one, not a turn
            thoughts = slot.thoughts + [""] * (len(slot.history) - len(slot.thoughts))
            turns = [Turn(observation=o, action=a, thought=t)
                     for o, (a, _), t in zip(observations, slot.history, thoughts, strict=False)]
            records.append(Trajectory(
                env=env_name, task_id=slot.task_id, instruction=env.instruction(), turns=turns,
                final_observation=slot.observation, reward=slot.reward, success=bool(slot.info["success"]),
                **provenance,
            ))
        return records
