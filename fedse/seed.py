"""Expert seed trajectories: the per-client starting buffer (the paper's AgentTraj analogue).

Only train task ids outside the validation split are ever used, and the environments keep those ids'
content apart from every test and validation task, so nothing an agent is later trained on is a held-out
task. The ids are a seeded sample of that range rather than its first N, so a client's seeds cover its whole
task space. Each run seed has its own draw (`<dir>/s<seed>/<env>.jsonl`): the spread of results over run
seeds then includes which expert trajectories a client happened to start with.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedse.envs.pool import EnvPool
from fedse.envs.registry import env_class, make_env
from fedse.scripted import expert_policy
from fedse.trajectory import Trajectory, write_jsonl

BATCH = 64


@dataclass(frozen=True)
class SeedSummary:
    env: str
    path: Path
    written: int
    tried: int
    mean_turns: float

    @property
    def expert_success(self) -> float:
        return self.written / self.tried if self.tried else 0.0


def seed_dir(root: Path, seed: int) -> Path:
    """The folder of run seed `seed`'s expert seed files under the seed-data root."""
    return Path(root) / f"s{seed}"


def seed_file(root: Path, seed: int, env_name: str) -> Path:
    """Where run seed `seed` finds the expert seeds of `env_name`."""
    return seed_dir(root, seed) / f"{env_name}.jsonl"


def task_id_rng(env_name: str, seed: int) -> random.Random:
    """The id stream for one env's seeds (a function of env and seed only, so reruns write the same file)."""
    return random.Random(f"seed-data-{env_name}-{seed}")


def expert_trajectories(env_name: str, count: int, seed: int, options: dict[str, Any] | None = None,
                        advance: Callable[[int], None] | None = None) -> tuple[list[Trajectory], int]:
    """`count` successful expert episodes on distinct train ids; returns them and how many were tried.

    Failed expert episodes (rare) are dropped, as the success filter would, and more ids are drawn; the
    number tried bounds the loop so a broken solver cannot spin forever.
    """
    train = env_class(env_name).explore_ids()
    rng = task_id_rng(env_name, seed)
    kept: list[Trajectory] = []
    seen: set[int] = set()
    tried = 0
    while len(kept) < count:
        if tried > 2 * count + BATCH:
            raise RuntimeError(f"{env_name}: the expert solved only {len(kept)} of {tried} train tasks")
        want = min(BATCH, count - len(kept))
        ids = []
        while len(ids) < want:
            task_id = train[rng.randrange(len(train))]
            if task_id not in seen:
                seen.add(task_id)
                ids.append(task_id)
        pool = EnvPool(lambda: make_env(env_name, **(options or {})), ids)
        pool.run(expert_policy())
        batch = pool.trajectories(env_name, policy="expert", seed=seed)
        tried += len(batch)
        good = [t for t in batch if t.success]
        kept.extend(good)
        if advance:
            advance(len(good))
    return kept[:count], tried


def write_seed_file(env_name: str, count: int, root: Path, seed: int,
                    options: dict[str, Any] | None = None,
                    advance: Callable[[int], None] | None = None) -> SeedSummary:
    """Write `<root>/s<seed>/<env>.jsonl` atomically and summarise it."""
    records, tried = expert_trajectories(env_name, count, seed, options, advance)
    path = seed_file(root, seed, env_name)
    write_jsonl(path, records)
    turns = sum(len(t.turns) for t in records) / len(records) if records else 0.0
    return SeedSummary(env=env_name, path=path, written=len(records), tried=tried, mean_turns=turns)
