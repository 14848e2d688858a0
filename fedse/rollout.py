"""Episodes of one environment played by the agent, as trajectory records with provenance.

Episodes run on an `EnvPool` at most `batch_size` at a time, so one forward pass serves every running
episode. `policy.batching: continuous` (the default) starts the next queued episode as soon as one ends, so
the batch stays full until the queue runs dry; `chunked` (as before issue 29) runs chunks of `batch_size`,
each until its longest episode ends. The records come in the same order either way, and say which adapter,
temperature and seed produced them.

Every episode carries a key that fixes its sampling noise (common random numbers, see `fedse.policy`):
evaluation episodes are keyed by (run seed, env, task, pass) only, never by the round or the method, so every
round and every method is scored on the same draws; exploration episodes by (run seed, env, round, task). With
either policy an episode therefore plays the same whatever else shares its batch, and the batch size and
the batching are a matter of speed alone (up to floating-point rounding, which differs with the batch's
shapes and can tip a near-tie).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fedse.envs.base import TextEnv
from fedse.envs.pool import EnvPool, Slot
from fedse.envs.registry import make_env
from fedse.model import Agent
from fedse.policy import PolicySpec, make_policy
from fedse.threads import torch_threads
from fedse.trajectory import Trajectory


@dataclass
class Pace:
    """How much acting a rollout did and in how long: decisions (policy calls × episodes acted on) and
    wall-clock seconds (environment steps included), measured inside real rounds rather than in a benchmark."""

    decisions: int = 0
    seconds: float = 0.0
    generated: int = 0  # tokens the policy wrote (ReAct's replies; 0 for the constrained policy, which scores)

    @property
    def per_second(self) -> float:
        return self.decisions / self.seconds if self.seconds else 0.0


class Episodes(list[Trajectory]):
    """A rollout's trajectory records — a plain list to every consumer — that also carry its `pace`."""

    def __init__(self, records: Iterable[Trajectory] = (), pace: Pace | None = None) -> None:
        super().__init__(records)
        self.pace = pace or Pace()


def episode_key(seed: int, env: str, task_id: int, evaluation: bool, round: int | None = None, pass_: int = 0,
                ) -> str:
    """The name of an episode's sampling noise. Evaluation: (run seed, env, task, pass) and nothing else, so
    two rounds or two methods scoring the same task face the same draws; exploration: (run seed, env, round,
    task, and the attempt when a task is tried more than once), fresh draws every round."""
    if evaluation:
        return f"eval/seed={seed}/env={env}/task={task_id}/pass={pass_}"
    return f"explore/seed={seed}/env={env}/round={round}/task={task_id}" + (f"/attempt={pass_}" if pass_ else "")


def rollout(agent: Agent, env_name: str, task_ids: Sequence[int], spec: PolicySpec, evaluation: bool, seed: int,
            adapter_hash: str | None = None, round: int | None = None, env_options: dict[str, Any] | None = None,
            advance: Callable[[int], None] | None = None, passes: int = 1) -> Episodes:
    """Play each task `passes` times, each pass on its own draws (evaluation: `eval.passes`; exploration:
    `federation.explore_attempts`); `advance(n)` is called as n episodes finish. The records come
    task by task, passes of a task together."""
    if passes < 1:
        raise ValueError(f"passes={passes}: every task is played at least once")
    started = time.perf_counter()
    episodes = [(task, p) for task in task_ids for p in range(passes)]
    keys = [episode_key(seed, env_name, task, evaluation, round, p) for task, p in episodes]
    records = Episodes()
    policy = make_policy(agent, spec, evaluation, seed)

    def act(envs: list[TextEnv], slots: list[Slot]) -> list[str]:
        records.pace.decisions += len(slots)
        return policy(envs, slots)

    def make() -> TextEnv:
        return make_env(env_name, **(env_options or {}))

    provenance = {"policy": "agent", "adapter_hash": adapter_hash, "round": round, "seed": seed,
                  "temperature": spec.temperature_for(evaluation)}
    with torch_threads(spec.threads):
        if spec.batching == "continuous":
            pool = EnvPool(make, [t for t, _ in episodes], keys, capacity=spec.batch_size)
            pool.run(act, ended=advance)
            records.extend(pool.trajectories(env_name, **provenance))
        else:
            for start in range(0, len(episodes), spec.batch_size):
                chunk = slice(start, start + spec.batch_size)
                pool = EnvPool(make, [t for t, _ in episodes[chunk]], keys[chunk])
                pool.run(act)
                records.extend(pool.trajectories(env_name, **provenance))
                if advance:
                    advance(len(pool.slots))
    records.pace.seconds = time.perf_counter() - started
    records.pace.generated = getattr(policy, "generated", 0)
    return records
