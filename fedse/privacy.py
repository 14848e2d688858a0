"""Differential privacy for what leaves an organisation: the settings, the accountants, and client-level DP.

Two units of privacy, two mechanisms (docs/privacy.md):

* **client level** (`privacy.client`, DP-FedAvg, McMahan et al. 2018): the server clips each client's update
  φ_k − φ_global to an L2 norm S, sums the clipped updates, adds Gaussian noise N(0, z²S²) and divides by the
  expected number of participants; what any observer of the global adapters learns about whether one client
  took part, and what it held, is bounded by (ε, δ). Rounds compose; a round's participants are a sample of the
  clients at rate q = clients_per_round / K (1 when every client takes part), and the RDP accountant (Opacus)
  takes q into account. With 3–5 clients, q is large and the noise a single client's update must hide in is
  large against the signal: the guarantee costs much utility (docs/privacy.md says how much was measured).
* **record level** (`privacy.record`, DP-SGD at each organisation): each trajectory's gradient clipped and
  noised inside the organisation's own training (fedse/learner.py with Opacus), accounted over every step of
  every round, since the buffer is reused each round.

The accountant is Opacus's RDP accountant (never a hand-written one); its history — (noise multiplier, sample
rate, steps) — follows from the rounds completed, so a resumed run continues the accounting instead of
restarting it. A target ε that the settings cannot meet is refused in one line before any round runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

State = Mapping[str, torch.Tensor]
Update = tuple[str, State, float]
NEEDS_STEPS = ("privacy.record: set learner.steps (optimizer steps per round): DP-SGD is accounted per step, so an "
               "epoch count that grows with the buffer has no fixed privacy cost")
MAX_NOISE = 100.0  # a noise multiplier above this buries every update: refused as "cannot be met"


class PrivacyError(ValueError):
    """DP settings that cannot be used (one line naming the setting and why)."""


class ClientDP(BaseModel):
    """`privacy.client`: DP-FedAvg on the clients' updates (server-side clipping and noise)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    clip: float = Field(1.0, gt=0, description="S: each client's update φ_k − φ_global is clipped to this L2 norm")
    noise: float | None = Field(None, ge=0, description="z: noise standard deviation in units of S; null = "
                                "calibrated to reach `epsilon` after all rounds")
    epsilon: float | None = Field(None, gt=0, description="target ε after all rounds (with delta); used when "
                                  "noise is null")
    delta: float = Field(1e-5, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_of(self) -> ClientDP:
        if self.enabled and (self.noise is None) == (self.epsilon is None):
            raise ValueError("privacy.client: set exactly one of noise (z) and epsilon (a target)")
        return self


class RecordDP(BaseModel):
    """`privacy.record`: DP-SGD inside each organisation's training, one trajectory the unit protected."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    clip: float = Field(1.0, gt=0, description="C: each trajectory's gradient is clipped to this L2 norm")
    sample_rate: float = Field(0.25, gt=0, le=1, description="q: each step trains on a Poisson sample of the "
                               "client's trajectories, each taken with probability q (expected batch q·N)")
    noise: float | None = Field(None, ge=0, description="z: noise standard deviation in units of C; null = "
                                "calibrated to reach `epsilon` after all rounds")
    epsilon: float | None = Field(None, gt=0, description="target ε per organisation after all rounds (with "
                                  "delta); used when noise is null")
    delta: float = Field(1e-5, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_of(self) -> RecordDP:
        if self.enabled and (self.noise is None) == (self.epsilon is None):
            raise ValueError("privacy.record: set exactly one of noise (z) and epsilon (a target)")
        return self


class PrivacySpec(BaseModel):
    """`privacy:` in params.yaml."""

    model_config = ConfigDict(extra="forbid")

    client: ClientDP = Field(default_factory=ClientDP)
    record: RecordDP = Field(default_factory=RecordDP)


# ------------------------------------------------------------------ accounting (Opacus RDP)
def epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε after `steps` Gaussian steps of noise multiplier `noise` at sampling rate `sample_rate` (Opacus RDP)."""
    return composed([(noise, sample_rate, steps)], delta)


def composed(history: Iterable[tuple[float, float, int]], delta: float) -> float:
    """ε of a sequence of subsampled Gaussian mechanisms [(noise multiplier, sampling rate, steps), …]: Opacus's
    RDP accountant over the whole history, so rounds of different rates compose (0 for no step, ∞ for no noise)."""
    from opacus.accountants import RDPAccountant

    entries = [(float(z), float(q), int(n)) for z, q, n in history if n > 0]
    if not entries:
        return 0.0
    if any(z <= 0 for z, _, _ in entries):
        return math.inf
    accountant = RDPAccountant()
    accountant.history = entries
    return float(accountant.get_epsilon(delta=delta))


def calibrate(target: float, delta: float, sample_rate: float, steps: int, what: str) -> float:
    """The noise multiplier that reaches (target, delta) after `steps` steps; refused in one line when no
    multiplier up to MAX_NOISE reaches it."""
    from opacus.accountants.utils import get_noise_multiplier

    if steps <= 0:
        raise PrivacyError(f"{what}: no step to account for")
    try:
        noise = float(get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=sample_rate,
                                           steps=steps, accountant="rdp", epsilon_tolerance=0.005))
    except ValueError as exc:  # Opacus: the target is out of reach
        raise PrivacyError(f"{what}: ε = {target:g} at δ = {delta:g} cannot be met with sampling rate "
                           f"{sample_rate:.3g} over {steps} steps ({exc})") from None
    if noise > MAX_NOISE:
        raise PrivacyError(f"{what}: ε = {target:g} at δ = {delta:g} needs noise multiplier {noise:.1f} over "
                           f"{steps} steps at sampling rate {sample_rate:.3g}, which leaves no signal; raise "
                           "epsilon, or take fewer rounds or a lower participation rate")
    return noise


# ------------------------------------------------------------------ record level (DP-SGD, fedse/dpsgd.py)
def record_plan(spec: RecordDP, rounds: int, steps: int | None) -> dict[str, float]:
    """An organisation's record-level DP plan, fixed before its first round: clip C, noise z, sampling rate q,
    steps per round. The rate is fixed (not the batch), so the plan's ε is exact whatever the buffer grows to;
    refused in one line when the target cannot be met, or when training has no fixed number of steps."""
    if steps is None:
        raise PrivacyError(NEEDS_STEPS)
    noise = spec.noise if spec.noise is not None else calibrate(spec.epsilon or 0.0, spec.delta, spec.sample_rate,
                                                                rounds * steps, "privacy.record")
    return {"clip": spec.clip, "noise": noise, "sample_rate": spec.sample_rate, "steps": steps,
            "delta": spec.delta}


def record_epsilon(histories: Mapping[str, list[tuple[float, float, int]]], delta: float | Mapping[str, float],
                   ) -> dict[str, Any]:
    """(ε, δ) of each organisation's trajectories after the DP-SGD steps in its history (at its own δ: each
    organisation sets its own), and the largest of each: what any one trajectory of any organisation is
    protected by."""
    deltas = {name: delta if isinstance(delta, float | int) else delta[name] for name in histories}
    per = {name: composed(history, deltas[name]) for name, history in sorted(histories.items())}
    return {"epsilon": max(per.values(), default=0.0), "delta": max(deltas.values(), default=0.0), "clients": per}


# ------------------------------------------------------------------ client level (DP-FedAvg)
def client_plan(spec: ClientDP, rounds: int, clients: int, per_round: int | None) -> dict[str, float]:
    """The run's client-level DP plan, fixed before round 0: clip S, noise z, sampling rate q, expected
    participants; refused in one line when the target cannot be met."""
    expected = per_round or clients
    rate = expected / clients
    noise = spec.noise if spec.noise is not None else calibrate(spec.epsilon or 0.0, spec.delta, rate, rounds,
                                                                "privacy.client")
    return {"clip": spec.clip, "noise": noise, "sample_rate": rate, "expected": expected, "delta": spec.delta}


def client_epsilon(plan: Mapping[str, float], rounds_done: int) -> dict[str, float]:
    """(ε, δ) after `rounds_done` rounds, and one round's alone: what every report shows."""
    cumulative = epsilon(plan["noise"], plan["sample_rate"], rounds_done, plan["delta"])
    single = epsilon(plan["noise"], plan["sample_rate"], 1, plan["delta"])
    return {"epsilon": cumulative, "round_epsilon": single, "delta": plan["delta"]}


def update_norm(state: State, current: State) -> float:
    """‖φ_k − φ_global‖ over every tensor of the adapter (fp64, in key order: the same bits however the
    adapter's dict was built)."""
    return math.sqrt(sum(float(((state[k].double() - current[k].double()) ** 2).sum()) for k in sorted(current)))


def noise_generator(seed: int, round: int) -> torch.Generator:
    """The noise's generator, seeded by run seed and round so a resumed round draws the same noise (research
    reproducibility; the draws are not secret from whoever knows the seed)."""
    return torch.Generator().manual_seed(1_000_003 * (seed + 1) + round)


def dp_fedavg(updates: Iterable[Update], current: State, plan: Mapping[str, float], server_lr: float,
              generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The server step under client-level DP: current + η · (Σ_k clip_S(φ_k − current) + N(0, z²S²)) / m, m the
    expected participants (a fixed denominator: one client's presence changes the sum by at most S). Every
    client weighs 1. Returns the new global adapter and what to log (norms before clipping, how many clipped)."""
    clip, noise, expected = plan["clip"], plan["noise"], plan["expected"]
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in current.items()}
    norms: dict[str, float] = {}
    for client, state, _ in updates:
        norm = update_norm(state, current)
        norms[client] = norm
        factor = min(1.0, clip / norm) if norm > 0 else 1.0
        for k in current:
            total[k] += (state[k].double() - current[k].double()) * factor
    new = {}
    for k in sorted(current):  # key order, not the dict's: a restored adapter draws the same noise per tensor
        v = current[k]
        noisy = total[k] + torch.randn(v.shape, generator=generator, dtype=torch.float64) * (noise * clip)
        new[k] = (v.double() + server_lr * noisy / expected).to(v.dtype)
    info = {"clip": clip, "noise": noise, "expected": expected, "update_norms": norms,
            "clipped": sum(n > clip for n in norms.values())}
    return new, info
