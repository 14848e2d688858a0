"""`fedse envs audit`: does any held-out task occur, in content, among what is trained or tuned on?

A test task is held out only if its content is: distinct ids that give the same secret, goal item or maze
instance are the same task to an agent (`TextEnv.content_key`). For every environment this counts how many
test content keys, and how many validation keys, occur among

* the validation tasks (test keys only: validation must be independent of test),
* the expert seed ids every run seed's writer can draw (`fedse.seed`: the first ids of its stream, as many as
  it may try, so a superset of any seed file it writes) and the task ids of the seed files found on disk,
* the exploration draws of a profile (every client, round and run seed),
* the embedded base's pretraining corpus (the corpus recipe of the configured tiny spec).

Every cell must be 0; a non-zero cell names the source that repeats held-out content.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from fedse.envs.base import TextEnv
from fedse.envs.registry import make_env

SOURCES = ("seed draws", "seed files", "exploration", "pretraining")


@dataclass
class Overlap:
    """One environment's audit: its held-out keys and, per source, the held-out keys found there."""

    env: str
    test_keys: int
    val_keys: int
    val_in_test: list[str] = field(default_factory=list)
    sources: dict[str, tuple[int, list[str], list[str]]] = field(default_factory=dict)  # (ids, test hits, val hits)

    @property
    def clean(self) -> bool:
        return not self.val_in_test and not any(t or v for _, t, v in self.sources.values())

    def as_dict(self) -> dict[str, Any]:
        return {"env": self.env, "test_keys": self.test_keys, "val_keys": self.val_keys,
                "val_in_test": len(self.val_in_test), "clean": self.clean,
                "sources": {name: {"tasks": n, "test": len(t), "val": len(v), "examples": (t + v)[:3]}
                            for name, (n, t, v) in self.sources.items()}}


def seed_draws(env: str, count: int, seed: int) -> list[int]:
    """Every id the seed writer of (env, run seed) may draw: the first distinct ids of its stream, as many as it
    tries at most (`fedse.seed.expert_trajectories` stops there), so a superset of the ids it writes."""
    from fedse.envs.registry import env_class
    from fedse.seed import BATCH, task_id_rng

    train = env_class(env).explore_ids()
    rng = task_id_rng(env, seed)
    limit = min(2 * count + 2 * BATCH, len(train))
    seen: dict[int, None] = {}
    while len(seen) < limit:
        seen.setdefault(train[rng.randrange(len(train))])
    return list(seen)


def seed_file_ids(root: Path, env: str) -> list[int]:
    """Task ids of every run seed's seed file of `env` under `root` (`s<seed>/<env>.jsonl`)."""
    from fedse.trajectory import read_jsonl

    return [t.task_id for path in sorted(Path(root).glob(f"s*/{env}.jsonl")) for t in read_jsonl(path)]


def hits(game: TextEnv, ids: Iterable[int], keys: frozenset[str]) -> list[str]:
    """The held-out keys among the tasks `ids` (each once)."""
    found: dict[str, None] = {}
    for task in ids:
        key = game.content_key(task)
        if key in keys:
            found.setdefault(key)
    return list(found)


def audit_env(env: str, options: dict[str, Any], sources: dict[str, Callable[[], list[int]]]) -> Overlap:
    """Audit one environment against named id sources (each a thunk: ids are drawn only when audited)."""
    game = make_env(env, **options)
    test = frozenset(game.content_key(t) for t in game.test_ids)
    val = frozenset(game.content_key(t) for t in game.validation_ids())
    report = Overlap(env, len(test), len(val), val_in_test=sorted(val & test))
    for name, draw in sources.items():
        ids = list(dict.fromkeys(draw()))
        report.sources[name] = (len(ids), hits(game, ids, test), hits(game, ids, val))
    return report


def exploration_ids(cfg: Any, env: str, seeds: Iterable[int]) -> list[int]:
    """Every train task the profile's clients of `env` may explore, over all rounds and the given run seeds
    (with `explore_unsolved`, every candidate they choose from)."""
    from fedse.federation import explore_candidates

    fed = cfg.federation
    if env not in cfg.client_envs():
        return []
    clients = [c for c in cfg.client_names() if c == env or c.startswith(f"{env}-")]
    count = fed.explore_episodes // fed.explore_attempts
    return [t for seed in seeds for client in clients for r in range(fed.rounds)
            for t in explore_candidates(env, r, count, seed, client, fed.explore_unsolved)]


def audit(cfg: Any, seeds: list[int], seed_root: Path) -> list[Overlap]:
    """Every environment of the config against every source (see the module docstring)."""
    from fedse.corpus import task_ids

    corpus = cfg.model.tiny.corpus
    reports = []
    for env in cfg.envs.names:
        count = cfg.seed_data.counts.get(env, 0)
        sources: dict[str, Callable[[], list[int]]] = {
            "seed draws": lambda env=env, count=count: [t for s in seeds for t in seed_draws(env, count, s)],
            "seed files": lambda env=env: seed_file_ids(seed_root, env),
            "exploration": lambda env=env: exploration_ids(cfg, env, seeds),
            "pretraining": lambda env=env: task_ids(corpus, env) if env in corpus.envs else [],
        }
        reports.append(audit_env(env, cfg.envs.options.get(env, {}), sources))
    return reports


def first(items: Iterable[str], n: int = 2) -> str:
    """A couple of examples of offending keys, for the one line that names them."""
    return ", ".join(islice(items, n))
