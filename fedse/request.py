"""What the server may ask of an organisation each round, and nothing more: a typed, bounded round request.

In workers mode the server does not hand an organisation its settings. It posts a `RoundRequest` (signed,
through the object store: fedse/transport.py) naming the experiment, the round, the client, and the *terms*
of the round: the profile of the organisation's own params file to run under, the method, the seed and the
hyperparameters that must agree across clients for their adapters to be averaged. Everything that decides
where the organisation's data goes or what code it runs — store endpoint, bucket, credentials, keys, model
source and paths, caches, seed and buffer locations — is not a field here, so it cannot be asked for:
`extra="forbid"` refuses the request whole, and the worker records the refusal in its egress log.

A term is a `key.path=value` override of the organisation's own config, allowed only under the keys in
`TERMS` (hyperparameters, never a path: the config models validate each value's range once applied), with
scalar values of bounded size; the organisation can narrow the list further (`org.yaml: accept`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedse.config import Config

# keys of the config a round request may set (globs over dotted paths): what training and acting depend on
TERMS = (
    "seed", "federation.method", "federation.explore_episodes", "federation.explore_attempts",
    "federation.explore_unsolved", "federation.seeds_per_client", "federation.own_cap", "federation.max_buffer",
    "buffer.keep", "buffer.prune", "seed_data.counts.*",
    "learner.lr", "learner.epochs", "learner.steps", "learner.batch_size", "learner.grad_accum", "learner.max_len",
    "learner.warmup_ratio", "learner.weight_decay", "learner.max_grad_norm", "learner.autocast",
    "policy.mode", "policy.temperature", "policy.max_new_tokens", "policy.context", "policy.batch_size",
    "policy.score", "policy.history_turns", "policy.walk_nodes",
    "model.lora.r", "model.lora.alpha", "model.lora.dropout",
    "aggregation.rule", "aggregation.rank", "aggregation.fedprox_mu",
    "transport.dtype",
)
MAX_TERMS = 64
_PROFILE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
Scalar = bool | int | float | str | None


class RequestError(ValueError):
    """A round request an organisation refuses: one line naming the field and why."""


class RoundRequest(BaseModel):
    """One round of one client, as the server asks for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = Field("fedse-round-request/1", pattern=r"^fedse-round-request/1$")
    experiment: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    round: int = Field(ge=0, le=100_000)
    client: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,56}$")
    profile: str | None = Field(None, description="a profile of the organisation's own params file")
    terms: dict[str, Scalar] = Field(default_factory=dict, description="key.path -> value, keys in TERMS")
    issued: float = Field(ge=0, description="server clock (s since the epoch), for the worker's log only")

    @field_validator("profile")
    @classmethod
    def _profile(cls, value: str | None) -> str | None:
        if value is not None and not _PROFILE.match(value):
            raise ValueError(f"profile {value[:40]!r}: letters, digits, '.', '_' and '-' only")
        return value

    @field_validator("terms")
    @classmethod
    def _terms(cls, terms: dict[str, Scalar]) -> dict[str, Scalar]:
        if len(terms) > MAX_TERMS:
            raise ValueError(f"{len(terms)} terms, at most {MAX_TERMS}")
        for key, value in terms.items():
            if not allowed(key, TERMS):
                raise ValueError(f"term {key[:80]!r} is not a hyperparameter a round request may set")
            if isinstance(value, str) and len(value) > 64:
                raise ValueError(f"term {key}: a string of {len(value)} characters (at most 64)")
        return terms


def allowed(key: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """Whether a dotted key matches one of the globs (`*` stands for one name, never a dot)."""
    parts = key.split(".")
    return any(len(p.split(".")) == len(parts) and all(fnmatch.fnmatchcase(a, b) for a, b in
                                                       zip(parts, p.split("."), strict=True)) for p in patterns)


def terms_of(cfg: Config) -> dict[str, Scalar]:
    """The server's side: the values of every allowed key in its run's config (what each client must share)."""
    flat = _flatten(json.loads(cfg.model_dump_json()))
    return {k: v for k, v in sorted(flat.items()) if allowed(k, TERMS) and not isinstance(v, list | dict)}


def apply(request: RoundRequest, accept: list[str] | None) -> list[str]:
    """The organisation's side: the request's terms as `--set` overrides of its own config, each key within
    what the organisation accepts (`accept`: globs; None = every key in TERMS)."""
    refused = [k for k in request.terms if accept is not None and not allowed(k, accept)]
    if refused:
        raise RequestError(f"term {refused[0]} is not accepted by this organisation (org.yaml: accept)")
    return [f"{k}={json.dumps(v)}" for k, v in request.terms.items()]


def agreement(cfg: Config) -> str:
    """A digest of what must agree between the server and a client (the allowed keys' values and the model):
    a client reports its own, and the server refuses an upload trained under other terms."""
    doc = {"terms": terms_of(cfg), "model": cfg.model.preset, "rule": cfg.rule(), "rank": cfg.global_rank()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
