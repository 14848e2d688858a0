"""Fed-SE, its baselines and its ablations as switches of one round loop (never copies of it).

Each method is a handful of booleans read by `fedse/federation.py`:

| method      | explores | filter | history | aggregation | clients            |
|-------------|----------|--------|---------|-------------|--------------------|
| fedse       | yes      | yes    | yes     | mean        | one per env        |
| fedit       | no       | -      | -       | mean        | one per env (seeds only: FedAvg + LoRA) |
| local       | no       | -      | -       | none        | one per env, each evaluated on its own env |
| centralized | no       | -      | -       | none        | one, holding every env's seeds |
| pretrained  | no training at all: the base model is evaluated once |
| no_filter   | yes      | no     | yes     | mean        | failures enter the buffer too |
| no_history  | yes      | yes    | no      | mean        | trains only on this round's data |
| weighted    | yes      | yes    | yes     | weighted    | mean weighted by each client's successes |
| local_se    | yes      | yes    | yes     | none        | each client self-evolves alone (the diagnostic row) |

`local_se` separates "self-evolution does not work at this scale" from "averaging undoes it": the same
explore → filter → buffer → SFT loop with no server, each client evaluated on its own environment.

How the server combines adapters (the paper's factor mean, or an exact rule, a server step, FedProx) is
`aggregation:` in params.yaml (fedse/aggregate.py); a method only names its default rule. The LoRA rank
sweep is not a method either: it is `model.lora.r`, set with `fedse run --set model.lora.r=4`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    train: bool = True
    explore: bool = True
    keep_failures: bool = False
    history: bool = True
    aggregation: Literal["mean", "weighted", "none"] = "mean"
    pooled: bool = False
    rule: Literal["factors", "exact", "fedsvd"] = "factors"  # used when params' aggregation.rule is null

    @property
    def federated(self) -> bool:
        return self.aggregation != "none"


METHODS: dict[str, Method] = {m.name: m for m in [
    Method(name="fedse"),
    Method(name="fedit", explore=False),
    Method(name="local", explore=False, aggregation="none"),
    Method(name="centralized", explore=False, aggregation="none", pooled=True),
    Method(name="pretrained", train=False, explore=False, aggregation="none"),
    Method(name="no_filter", keep_failures=True),
    Method(name="no_history", history=False),
    Method(name="weighted", aggregation="weighted"),
    Method(name="local_se", aggregation="none"),
]}


def method(name: str) -> Method:
    """The named method; an unknown name is one line listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None
