"""How much of a client's experience is its own, and how good it is.

Self-evolution only teaches if the agent's successes are worth imitating: a near-random policy's successes
are lucky walks, long and meandering, unlike the expert seeds. Two numbers per client and round say which
regime a run is in: the share of the buffer the agent generated itself, and the length of this round's new
self-generated successes relative to the expert's on the very same tasks (1.0 = as direct as the expert).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from fedse.envs.pool import EnvPool
from fedse.envs.registry import make_env
from fedse.scripted import expert_policy
from fedse.trajectory import Trajectory


@lru_cache(maxsize=65_536)
def expert_length(env: str, task_id: int, options: tuple[tuple[str, Any], ...] = ()) -> int | None:
    """Turns the privileged expert needs on this task (None when it fails); environments are deterministic
    by task id, so this is computed once per task."""
    pool = EnvPool(lambda: make_env(env, **dict(options)), [task_id])
    (slot,) = pool.run(expert_policy())
    return len(slot.history) if slot.info["success"] else None


def length_ratio(records: list[Trajectory], options: dict[str, Any] | None = None) -> float | None:
    """Mean over the agent's successful records of (its turns / the expert's turns on the same task)."""
    ratios = []
    frozen = tuple(sorted((options or {}).items()))
    for traj in records:
        if traj.policy != "agent" or not traj.success:
            continue
        best = expert_length(traj.env, traj.task_id, frozen)
        if best:
            ratios.append(len(traj.turns) / best)
    return sum(ratios) / len(ratios) if ratios else None


def experience(buffer: list[Trajectory], added: list[Trajectory], options: dict[str, Any] | None = None,
               ) -> dict[str, Any]:
    """The client-round numbers: self-generated share of the buffer, and the quality of what was added."""
    own = sum(t.policy == "agent" for t in buffer)
    return {"self_share": own / len(buffer) if buffer else 0.0,
            "self_added": sum(t.policy == "agent" for t in added),
            "length_ratio": length_ratio(added, options)}
