"""Typed configuration, read once from params.yaml (the same file DVC tracks as parameters).

Every field has the default that params.yaml ships with, so fedse also runs outside the repository; unknown
keys are errors so that a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedse.learner import LearnerSpec
from fedse.model import ModelSpec
from fedse.policy import PolicySpec

PAPER_SEED_COUNTS = {"babyai": 810, "webshop": 3930, "textcraft": 374, "maze": 215, "wordle": 955}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnvsConfig(Strict):
    """Which environments form the federation (one client each) and their constructor options."""

    names: list[str] = Field(default_factory=lambda: ["babyai", "webshop", "textcraft", "maze", "wordle"])
    options: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"wordle": {"resample": False}})

    @model_validator(mode="after")
    def _known(self) -> EnvsConfig:
        from fedse.envs.registry import ENVS

        unknown = [n for n in [*self.names, *self.options] if n not in ENVS]
        if unknown:
            raise ValueError(f"unknown environment(s) {unknown}; known: {list(ENVS)}")
        return self


class SeedDataConfig(Strict):
    """Expert seed trajectories per environment (the paper's AgentTraj counts by default)."""

    dir: Path = Path("data/seed")
    counts: dict[str, int] = Field(default_factory=lambda: dict(PAPER_SEED_COUNTS))

    @model_validator(mode="after")
    def _non_negative(self) -> SeedDataConfig:
        bad = {k: v for k, v in self.counts.items() if v < 0}
        if bad:
            raise ValueError(f"seed counts must be ≥ 0, got {bad}")
        return self


class CheckConfig(Strict):
    """`fedse envs check`: how many test tasks per environment."""

    episodes: int = Field(default=25, ge=1)


class EvalConfig(Strict):
    """`fedse eval`: test tasks per environment (null = the whole test set)."""

    episodes: int | None = Field(default=None, ge=1)


class Config(Strict):
    seed: int = 0
    envs: EnvsConfig = Field(default_factory=EnvsConfig)
    seed_data: SeedDataConfig = Field(default_factory=SeedDataConfig)
    check: CheckConfig = Field(default_factory=CheckConfig)
    model: ModelSpec = Field(default_factory=ModelSpec)
    policy: PolicySpec = Field(default_factory=PolicySpec)
    learner: LearnerSpec = Field(default_factory=LearnerSpec)
    eval: EvalConfig = Field(default_factory=EvalConfig)


class ConfigError(ValueError):
    """A params file that cannot be used; the message is one line naming the file and the field."""


def load_config(path: Path | str | None = "params.yaml") -> Config:
    """Config from `path`; a missing default file means built-in defaults, a missing named file is an error."""
    if path is None:
        return Config()
    path = Path(path)
    if not path.exists():
        if path == Path("params.yaml"):
            return Config()
        raise ConfigError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{path}: {field}: {err['msg']}{more}") from None
