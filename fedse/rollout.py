"""Episodes of one environment played by the agent, as trajectory records with provenance.

Episodes run on an `EnvPool` in chunks of `batch_size`, so one forward pass serves every running episode of
a chunk; the records say which adapter, temperature and seed produced them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fedse.envs.pool import EnvPool
from fedse.envs.registry import make_env
from fedse.model import Agent
from fedse.policy import PolicySpec, make_policy
from fedse.trajectory import Trajectory


def rollout(agent: Agent, env_name: str, task_ids: Sequence[int], spec: PolicySpec, evaluation: bool, seed: int,
            adapter_hash: str | None = None, round: int | None = None, env_options: dict[str, Any] | None = None,
            advance: Callable[[int], None] | None = None) -> list[Trajectory]:
    """Play each task once; `advance(n)` is called as chunks of n episodes finish."""
    records: list[Trajectory] = []
    temperature = spec.temperature_for(evaluation)
    for start in range(0, len(task_ids), spec.batch_size):
        chunk = list(task_ids[start:start + spec.batch_size])
        pool = EnvPool(lambda: make_env(env_name, **(env_options or {})), chunk)
        pool.run(make_policy(agent, spec, evaluation, seed + start))
        records.extend(pool.trajectories(env_name, policy="agent", adapter_hash=adapter_hash, round=round,
                                         seed=seed, temperature=temperature))
        if advance:
            advance(len(chunk))
    return records
