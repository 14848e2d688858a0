"""Typed configuration, read once from params.yaml (the same file DVC tracks as parameters).

Every field has the default that params.yaml ships with, so fedse also runs outside the repository; unknown
keys are errors so that a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedse.aggregate import AggregationSpec
from fedse.learner import LearnerSpec
from fedse.model import LoraSpec, ModelSpec
from fedse.policy import PolicySpec
from fedse.privacy import NEEDS_STEPS, PrivacySpec
from fedse.transport import TransportSpec

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
    """`fedse eval`: test tasks per environment (null = the whole test set); and, there and in the round loop,
    how many times each evaluation task is played (different sampling draws of the same task)."""

    episodes: int | None = Field(default=None, ge=1)
    passes: int = Field(1, ge=1, description="plays of each evaluation task (seeded per task and pass)")


class FederationConfig(Strict):
    """The round loop (fedse/federation.py): how many rounds, how much exploring, how much evaluating."""

    method: str = "fedse"
    clients: list[str] | None = Field(default=None, description="the environments that take part, one client "
                                      "each; null = all of envs.names")
    rounds: int = Field(default=20, ge=1)
    explore_episodes: int = Field(default=64, ge=0, description="episodes each client plays per round")
    explore_attempts: int = Field(default=1, ge=1, description="plays of each explored train task: 1 = the "
                                  "paper (explore_episodes fresh tasks, every success kept); k > 1 = "
                                  "explore_episodes / k tasks played k times each, and only the shortest success "
                                  "of each task is kept (best-of-k, label-free: success and length only)")
    explore_unsolved: bool = Field(default=False, description="explore tasks (by content) the client's buffer "
                                   "holds no success on yet, each once a round; false = a fresh random sample "
                                   "(the paper)")
    seeds_per_client: int | None = Field(default=None, ge=0, description="first N seed trajectories; null = all")
    own_cap: float | None = Field(default=None, ge=0, description="train on at most this many of the agent's own "
                                  "records per expert seed (the newest); null = all (the paper)")
    eval_episodes: int | None = Field(default=None, ge=1, description="evaluation tasks per env per round; null = "
                                      "all")
    eval_split: Literal["test", "val"] = Field(default="test", description="val: calibrate a profile without "
                                              "touching test tasks")
    final_eval_episodes: Annotated[int, Field(ge=1)] | Literal["all"] | None = Field(
        default=None, description="test tasks per env after the first and the last round: a number, all (the "
        "whole test set) or null (as eval_episodes)")
    curve_split: Literal["test", "val"] = Field(default="val", description="what the rounds between the first "
                                               "and the last are scored on: val = the first eval_episodes "
                                               "validation tasks, so test tasks are played only for the two "
                                               "reported rounds; test = the first eval_episodes test tasks")
    max_buffer: int | None = Field(default=None, ge=1, description="train on at most the newest N; null = all")
    client_timeout: float | None = Field(default=None, gt=0, description="seconds the Prefect flow waits for a "
                                         "client's upload in a round before counting it missing; null = no limit")
    quorum: int | None = Field(default=None, ge=1, description="usable uploads a round needs to aggregate (a "
                               "client that failed, timed out or was screened out is missing); null = a majority "
                               "of the round's participants")
    clients_per_round: int | None = Field(default=None, ge=1, description="partial participation: this many "
                                          "clients, drawn afresh each round (seeded), take part; null = all")
    orgs_per_env: int = Field(default=1, ge=1, description="client organisations per environment: 1 = one "
                              "client named after its environment (the paper); n > 1 = clients <env>-1 .. "
                              "<env>-n, each with its own share of the env's seed file and its own explored "
                              "tasks (simulating a larger federation)")
    out: Path = Path("runs")

    @model_validator(mode="after")
    def _known_method(self) -> FederationConfig:
        from fedse.methods import method

        method(self.method)
        if self.explore_episodes % self.explore_attempts:
            raise ValueError(f"explore_episodes {self.explore_episodes} is not a multiple of explore_attempts "
                             f"{self.explore_attempts}")
        return self


class BufferConfig(Strict):
    """What a client's buffer keeps (fedse/buffer.py)."""

    keep: Literal["all", "shortest"] = Field(default="all", description="all: every success (the paper); "
                                             "shortest: per task (by content), the success with the fewest turns, "
                                             "a later shorter one replacing an older one")
    prune: bool = Field(default=False, description="replay each own success without its loops and no-op steps "
                        "in the client's own environment, keeping the shorter episode if it still succeeds "
                        "(fedse/prune.py)")


class OrchestrationConfig(Strict):
    """How the Prefect flow runs the round (read by flows/, never by the library's algorithm)."""

    mode: Literal["inprocess", "workers", "dask"] = Field(
        default="inprocess", description="where each client's round runs: as tasks of the server's flow run on "
        "`task_runner` (inprocess), on the organisation's own worker, on a signed request through the store "
        "(workers), or as tasks on a Dask cluster (dask: a local cluster of `workers` processes, or "
        "`dask_address`)")
    task_runner: Literal["thread", "process"] = Field(
        default="thread", description="inprocess mode: a thread pool (one model in memory) or a process pool (a "
        "model per worker)")
    workers: int = Field(default=4, ge=1)
    dask_address: str | None = Field(default=None, description="scheduler of an existing Dask cluster, e.g. "
                                     "tcp://10.0.0.5:8786 (mode dask; default: a local cluster)")
    gpus: list[str] | None = Field(default=None, description="devices the process pool or Dask workers "
                                   "are placed on, one client per device (then shared in turn), as "
                                   "CUDA_VISIBLE_DEVICES entries; null: the GPUs this machine shows; []: "
                                   "none (fedse/placement.py)")
    gpu_slots: int = Field(default=1, ge=1, description="train tasks (tag gpu) running at once, at least one per "
                           "placed device")
    retries: int = Field(default=0, ge=0, description="retries of a client's rollout, train and transfer tasks")
    retry_delay: float = Field(default=2.0, ge=0, description="backoff factor (s): retry i waits delay·2^i")

    @field_validator("gpus", mode="before")
    @classmethod
    def _devices(cls, value: Any) -> Any:
        """Ordinals may be written as numbers (`gpus: [0, 1]`); each entry checked (fedse/placement.py)."""
        from fedse.placement import checked

        return checked(value) if isinstance(value, list) else value


class Config(Strict):
    seed: int = 0
    profile: str | None = None
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    envs: EnvsConfig = Field(default_factory=EnvsConfig)
    seed_data: SeedDataConfig = Field(default_factory=SeedDataConfig)
    check: CheckConfig = Field(default_factory=CheckConfig)
    model: ModelSpec = Field(default_factory=ModelSpec)
    policy: PolicySpec = Field(default_factory=PolicySpec)
    learner: LearnerSpec = Field(default_factory=LearnerSpec)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    transport: TransportSpec = Field(default_factory=TransportSpec)
    aggregation: AggregationSpec = Field(default_factory=AggregationSpec)
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)

    @model_validator(mode="after")
    def _clients_are_envs(self) -> Config:
        unknown = [c for c in self.federation.clients or [] if c not in self.envs.names]
        if unknown:
            raise ValueError(f"federation.clients: {', '.join(unknown)} not in envs.names {self.envs.names}")
        per_round, clients = self.federation.clients_per_round, len(self.client_names())
        if per_round is not None and per_round > clients:
            raise ValueError(f"federation.clients_per_round: {per_round} is more than the {clients} clients")
        if self.aggregation.personal != "none" and (self.orchestration.mode == "workers"
                                                    or self.federation.orgs_per_env > 1):
            raise ValueError("aggregation.personal: each environment is evaluated with its one client's own part, "
                             "which the server holds in inprocess and dask modes with one client per environment")
        if self.privacy.client.enabled:
            self._client_dp_fits()
        if self.privacy.record.enabled:
            self._record_dp_fits()
        return self

    def _record_dp_fits(self) -> None:
        """DP-SGD is accounted per step of a known rate: a fixed step count, and no loss term outside it; its
        per-row gradients come from Opacus's hooks, which recomputed (checkpointed) layers would confuse."""
        if self.learner.steps is None:
            raise ValueError(NEEDS_STEPS)
        if self.aggregation.fedprox_mu:
            raise ValueError("privacy.record: aggregation.fedprox_mu is not supported with DP-SGD (its term "
                             "would be added outside Opacus's clipped gradient)")
        if self.learner.gradient_checkpointing:
            raise ValueError("privacy.record: learner.gradient_checkpointing is not supported with DP-SGD (Opacus "
                             "records each layer's input in its forward hooks, and a recomputed layer would record "
                             "it twice); use learner.batch_tokens to bound its memory instead")

    def _client_dp_fits(self) -> None:
        """Client-level DP sums clipped updates with weight 1: the factor mean's own arithmetic, nothing else."""
        from fedse.methods import method

        how, spec = method(self.federation.method), self.aggregation
        if not how.federated:
            raise ValueError(f"privacy.client: method {how.name} has no server step to make private")
        if how.aggregation == "weighted" or self.rule() != "factors" or spec.momentum or spec.personal != "none":
            raise ValueError("privacy.client: DP-FedAvg needs the plain factor mean (rule factors, no weights, no "
                             "momentum, no personal part)")

    def client_envs(self) -> list[str]:
        """The environments of this federation, in envs.names order (one client each)."""
        chosen = self.federation.clients
        return [n for n in self.envs.names if chosen is None or n in chosen]

    def client_names(self) -> list[str]:
        """The federation's clients: one per environment named after it, or `orgs_per_env` per environment
        (<env>-1 .. <env>-n)."""
        n = self.federation.orgs_per_env
        return [env if n == 1 else f"{env}-{k}" for env in self.client_envs() for k in range(1, n + 1)]

    def rule(self) -> str:
        """The server's aggregation rule: `aggregation.rule` when set, else the method's own default."""
        from fedse.methods import method

        return self.aggregation.rule or method(self.federation.method).rule

    def global_rank(self) -> int | None:
        """The adapters' rank under the exact rule (r_g, default K·r so K rank-r updates lose nothing);
        None for the other rules, whose adapters keep `model.lora.r`."""
        from fedse.methods import method

        if self.rule() != "exact" or not method(self.federation.method).federated:
            return None
        return self.aggregation.rank or len(self.client_names()) * self.model.lora.r

    def agent_spec(self) -> ModelSpec:
        """The model the run's clients hold: `model`, with the LoRA the aggregation rule needs (rank r_g at the
        same scale alpha/r for `exact`; A frozen for `fedsvd`, whose clients train B only)."""
        from fedse.methods import method

        lora: LoraSpec = self.model.lora
        rank = self.global_rank()
        if rank is not None:
            lora = lora.model_copy(update={"r": rank, "alpha": lora.alpha * rank / lora.r})
        if self.rule() == "fedsvd" and method(self.federation.method).federated:
            lora = lora.model_copy(update={"freeze_a": True})
        return self.model.model_copy(update={"lora": lora})

    def aggregation_info(self) -> dict[str, Any]:
        """What metrics.json and MLflow say about the server's rule (so runs of different rules never pool)."""
        spec = self.aggregation
        info = {"rule": self.rule(), "server_lr": spec.server_lr, "momentum": spec.momentum,
                "fedprox_mu": spec.fedprox_mu, "rank": self.global_rank(), "max_norm_ratio": spec.max_norm_ratio}
        info |= {"personal": spec.personal} if spec.personal != "none" else {}
        return info | ({"trim": spec.trim} if info["rule"] == "trimmed_mean" else {})

    def quorum(self, clients: int) -> int:
        """Usable uploads a round of `clients` needs: `federation.quorum`, else a strict majority."""
        need = self.federation.quorum or clients // 2 + 1
        if need > clients:
            raise ConfigError(f"federation.quorum {need} exceeds the {clients} client(s) of this run")
        return need


class ConfigError(ValueError):
    """A params file that cannot be used; the message is one line naming the file and the field."""


def run_config(path: Path | str | None, profile: str | None, method: str | None, seed: int | None,
               sets: list[str] | None) -> Config:
    """The config of one run: `load_config` with the run's method and seed as the last overrides (what
    `fedse run` and the flow both take)."""
    extra = list(sets or [])
    if method is not None:
        extra.append(f"federation.method={method}")
    if seed is not None:
        extra.append(f"seed={seed}")
    return load_config(path, profile=profile, overrides=extra)


def load_config(path: Path | str | None = "params.yaml", profile: str | None = None,
                overrides: list[str] | None = None) -> Config:
    """Config from `path`, then the profile's settings, then `key.path=value` overrides, validated once.

    The profile is `profile` if given, else the file's own `profile:` key; its mapping under `profiles:` is
    merged over the rest of the file (nested keys merge, lists and scalars replace). A missing default file
    means built-in defaults; a missing named file is an error.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.exists():
            data = _read_yaml(path)
        elif path != Path("params.yaml"):
            raise ConfigError(f"{path}: params file not found")
    where = path or "params"
    if profile is not None:
        data["profile"] = profile
    chosen = data.get("profile")
    if chosen is not None:
        profiles = data.get("profiles") or {}
        if chosen not in profiles:
            raise ConfigError(f"{where}: profile {chosen!r} is not defined; defined: {', '.join(profiles) or 'none'}")
        if not isinstance(profiles[chosen], dict):
            raise ConfigError(f"{where}: profiles.{chosen} must be a mapping")
        data = _merge(data, profiles[chosen])
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. model.lora.r=4")
        data = _merge(data, _nested(key.strip().split("."), yaml.safe_load(raw)))
    return _validate(data, where)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (update wins); returns a new dict and leaves both inputs untouched."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _nested(keys: list[str], value: Any) -> dict[str, Any]:
    for key in reversed(keys):
        value = {key: value}
    return value


def _validate(data: dict[str, Any], path: Path | str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{path}: {field}: {err['msg']}{more}") from None
