"""The base model's pretraining corpus: transcripts of players of mixed skill on the **pretrain** task ids.

A web-pretrained LLM has read people solving tasks like these, badly and well; that latent competence is what
self-evolution unlocks. The embedded model gets the same kind of prior from play we generate offline: each
episode draws a skill s (uniform in ``[skill_low, skill_high]``, or 0 for the ``random_share`` of episodes
that are pure random play), and at every step the player takes the environment's expert action with
probability s, else a uniformly random admissible action. The skill is never written into the transcript,
so the model must infer it from how the player has played so far: sampling from the model then behaves like
a player of middling skill, and training on its own *successes* (which come mostly from its more skilful
behaviour) shifts it toward the expert — the mechanism Fed-SE relies on.

Only pretrain ids are played (a range disjoint from every client's train, validation and test ids), so the
base never sees a client's private data or an evaluation task.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedse.envs.base import TextEnv
from fedse.envs.pool import EnvPool, Slot
from fedse.trajectory import Trajectory

CHUNK = 64  # episodes stepped together in one pool


class CorpusSpec(BaseModel):
    """Who plays, how well, and how much (all of it goes into the base model's cache key)."""

    model_config = ConfigDict(extra="forbid")

    envs: list[str] = Field(default_factory=lambda: ["babyai", "webshop", "textcraft", "maze", "wordle"])
    episodes: int = Field(2000, ge=1, description="episodes per environment")
    skill_low: float = Field(0.0, ge=0, le=1)
    skill_high: float = Field(1.0, ge=0, le=1)
    random_share: float = Field(0.0, ge=0, le=1, description="share of episodes played at skill 0")
    seed: int = 0
    splits: str = Field("content-v1", description="the environments' split scheme the pretrain ids come from: "
                        "content-v1 = pretrain content disjoint from every test and validation task (base v3); "
                        "a change of what a pretrain id plays must change this, and the committed base's "
                        "corpus fingerprint (corpus_fingerprint) catches one that does not")

    @model_validator(mode="after")
    def _ordered(self) -> CorpusSpec:
        if self.skill_low > self.skill_high:
            raise ValueError(f"skill_low {self.skill_low} > skill_high {self.skill_high}")
        return self


def episode_skill(spec: CorpusSpec, env: str, task_id: int) -> float:
    """The hidden skill of the player of one episode: a pure function of (spec seed, env, task)."""
    rng = random.Random(f"skill-{spec.seed}-{env}-{task_id}")
    if rng.random() < spec.random_share:
        return 0.0
    return rng.uniform(spec.skill_low, spec.skill_high)


def mixed_skill_policy(skills: dict[int, float], seed: int | str) -> Callable[[list[TextEnv], list[Slot]], list[str]]:
    """Each running episode's player acts at its own skill: expert with probability s, else random."""
    rng = random.Random(seed)

    def act(envs: list[TextEnv], slots: list[Slot]) -> list[str]:
        actions = []
        for env, slot in zip(envs, slots, strict=True):
            if rng.random() < skills[slot.task_id]:
                actions.append(env.expert_action())
            else:
                actions.append(rng.choice(slot.info["admissible_actions"]))
        return actions

    return act


def task_ids(spec: CorpusSpec, env: str) -> list[int]:
    """A seeded sample of the environment's pretrain range (never a train, validation or test id)."""
    from fedse.envs.registry import env_class

    ids = env_class(env).pretrain_ids()
    rng = random.Random(f"corpus-{spec.seed}-{env}")
    return [ids.start + i for i in rng.sample(range(len(ids)), spec.episodes)]


def play(spec: CorpusSpec, env: str) -> list[Trajectory]:
    """Every corpus episode of one environment, in task order (deterministic)."""
    from fedse.envs.registry import make_env

    ids = task_ids(spec, env)
    skills = {t: episode_skill(spec, env, t) for t in ids}
    records: list[Trajectory] = []
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        pool = EnvPool(lambda: make_env(env), chunk)
        pool.run(mixed_skill_policy(skills, f"corpus-act-{spec.seed}-{env}-{start}"))
        records.extend(pool.trajectories(env, policy="mixed", seed=spec.seed))
    return records


def _play_one(args: tuple[str, str]) -> list[Trajectory]:
    spec_json, env = args
    return play(CorpusSpec.model_validate_json(spec_json), env)


def build_corpus(spec: CorpusSpec, workers: int = 1) -> dict[str, list[Trajectory]]:
    """env → its transcripts; environments are played in parallel processes when `workers` > 1."""
    if workers <= 1 or len(spec.envs) == 1:
        return {env: play(spec, env) for env in spec.envs}
    with ProcessPoolExecutor(max_workers=min(workers, len(spec.envs))) as pool:
        results = pool.map(_play_one, [(spec.model_dump_json(), env) for env in spec.envs])
        return dict(zip(spec.envs, results, strict=True))


def corpus_fingerprint(spec: CorpusSpec) -> str:
    """sha256 over the content keys of every corpus task, env by env: what the base was pretrained on, so a
    stored base can be checked against what today's environments would play (ids alone say nothing)."""
    import hashlib

    from fedse.envs.registry import make_env

    digest = hashlib.sha256()
    for env in spec.envs:
        game = make_env(env)
        for task in task_ids(spec, env):
            digest.update(f"{env}\t{game.content_key(task)}\n".encode())
    return digest.hexdigest()


def summary(corpus: dict[str, list[Trajectory]]) -> dict[str, dict[str, float]]:
    """Per environment: episodes, success rate and mean turns of the corpus (written beside the model)."""
    out = {}
    for env, records in corpus.items():
        n = len(records)
        out[env] = {"episodes": n, "success": sum(t.success for t in records) / n if n else 0.0,
                    "mean_turns": sum(len(t.turns) for t in records) / n if n else 0.0}
    return out
