"""Server-side aggregation of client LoRA adapters: the paper's factor mean and two exact alternatives.

A LoRA adapter changes a weight by ΔW = s·B·A (s = alpha / r). The paper averages A and B separately
(rule ``factors``), which is not the mean of the updates: mean_k(B_k A_k) − B̄ Ā = (1/K) Σ (B_k − B̄)(A_k − Ā),
a cross term that grows with how far the clients moved. Two rules remove it and still produce a plain PEFT
adapter:

* ``exact`` — the mean of the clients' ΔW_k, re-factored by SVD at the global rank r_g (every client then
  trains at r_g; the default K·r keeps every direction of K rank-r updates). The SVD never forms a dense
  ΔW: the stacked factors are reduced by QR and only a (K·r)×(K·r) core is decomposed, so it is cheap for
  7B models too. The share of spectral energy kept by the truncation is logged.
* ``fedsvd`` — clients train B only (A frozen and shared, so mean_k(B_k) A is exact); the server then
  refreshes A from the SVD of B̄A, which keeps A's rows orthonormal and the adapter's product unchanged.

Even exact averaging hands each environment 1/K of its own update. A server step (``server_lr`` η > 1 undoes
that dilution, FedExP/FedOpt style) moves the global adapter from the current one toward the clients' mean:
new = current + η (mean − current), in ΔW space for the exact rules and per factor for ``factors``;
``momentum`` (FedAvgM) is offered for ``factors``. Client weights are 1 (the paper) or, for the
``weighted`` ablation, each client's number of successful trajectories.

Every round reports the relative aggregation error ‖mean_k ΔW_k − ΔW_agg‖ / ‖mean_k ΔW_k‖ of the rule itself
(before the server step), computed from Gram matrices of the factors, never from dense products.

Two robust rules replace the factor mean by a coordinate-wise statistic that one extreme client cannot drag
(both unweighted): ``median``, and ``trimmed_mean`` (drop the ⌈trim·K⌉ largest and smallest values of each
coordinate, average the rest). Before any rule the server screens the uploads (fedse/screen.py); here every
adapter is still validated against the first, so a direct caller that sends a wrong key, shape, dtype or a NaN
gets the client named in the error, and nothing is aggregated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

State = Mapping[str, torch.Tensor]
Update = tuple[str, State, float]  # (client, adapter tensors, weight)
RULES = ("factors", "median", "trimmed_mean", "exact", "fedsvd")


class AggregationError(ValueError):
    """A client adapter that cannot be aggregated; the message names the client and the tensor."""


class AggregationSpec(BaseModel):
    """`aggregation:` in params.yaml: how the server combines the clients' adapters."""

    model_config = ConfigDict(extra="forbid")

    rule: Literal["factors", "median", "trimmed_mean", "exact", "fedsvd"] | None = Field(
        None, description="null = the method's own rule (factors for the paper's methods)")
    trim: float = Field(0.2, gt=0, lt=0.5, description="trimmed_mean: share of clients dropped at each end of "
                        "every coordinate (at least one)")
    max_norm_ratio: float | None = Field(10.0, gt=1, description="screening: reject an upload whose update norm "
                                         "exceeds this multiple of the other clients' median; null = off")
    rank: int | None = Field(None, ge=1, description="exact: the global adapter's rank r_g; null = K·r")
    server_lr: float = Field(1.0, gt=0, description="server step η: 1 = FedAvg, > 1 undoes the 1/K dilution")
    momentum: float = Field(0.0, ge=0, lt=1, description="FedAvgM momentum (rule factors only)")
    fedprox_mu: float = Field(0.0, ge=0, description="client-side proximal term μ/2·‖φ − φ_global‖² (FedProx)")
    personal: Literal["none", "b"] = Field("none", description="b: every client keeps its own LoRA B factors "
                                           "(FedSA-LoRA): it starts each round from the global A and its own B, "
                                           "and each environment is evaluated with its own client's B; the server "
                                           "averages as usual (its B is only the registry's summary)")

    @model_validator(mode="after")
    def _momentum_needs_factors(self) -> AggregationSpec:
        if self.momentum and self.rule not in (None, "factors"):
            raise ValueError(f"momentum is only supported with rule factors, not {self.rule}")
        if self.personal != "none" and self.rule not in (None, "factors"):
            raise ValueError(f"personal {self.personal} keeps each client's B factors: only rule factors averages "
                             f"A alone, not {self.rule}")
        return self


@dataclass
class Aggregate:
    """What one server step produces: the next global adapter, the server's carried state, and its log."""

    state: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ validation and the weighted mean
def check_state(client: str, state: State, reference: State | None) -> None:
    """Same keys, shapes and dtypes as the reference adapter, and only finite values."""
    if reference is not None:
        missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
        if missing:
            raise AggregationError(f"client {client}: tensor {missing[0]} is missing ({len(missing)} missing)")
        if extra:
            raise AggregationError(f"client {client}: unexpected tensor {extra[0]} ({len(extra)} unexpected)")
    for key, tensor in state.items():
        if reference is not None:
            ref = reference[key]
            if tuple(tensor.shape) != tuple(ref.shape):
                raise AggregationError(f"client {client}: tensor {key} has shape {tuple(tensor.shape)}, "
                                       f"expected {tuple(ref.shape)}")
            if tensor.dtype != ref.dtype:
                raise AggregationError(f"client {client}: tensor {key} is {tensor.dtype}, expected {ref.dtype}")
        if not torch.isfinite(tensor).all():
            raise AggregationError(f"client {client}: tensor {key} holds NaN or infinite values")


def check_weight(client: str, weight: float) -> None:
    """A finite, non-negative client weight (NaN compares false, so it fails too)."""
    if not weight >= 0 or weight != weight:
        raise AggregationError(f"client {client}: weight {weight} must be a finite number ≥ 0")


def collect(adapters: Iterable[Update]) -> list[Update]:
    """Validate every upload against the first and every weight; returns them as a list."""
    out: list[Update] = []
    for client, state, weight in adapters:
        check_weight(client, weight)
        check_state(client, state, out[0][1] if out else None)
        out.append((client, state, float(weight)))
    if not out:
        raise AggregationError("no client adapters to average")
    if sum(w for _, _, w in out) <= 0:
        raise AggregationError(f"the weights of all {len(out)} clients are 0: nothing to average")
    return out


def average(adapters: Iterable[Update]) -> dict[str, torch.Tensor]:
    """Weighted element-wise mean of `(client, state, weight)` triples (the paper's FedAvg over tensors).

    Sums are kept in float64 so the order clients arrive in does not change the result beyond rounding of
    the final cast back to each tensor's dtype.
    """
    updates = collect(adapters)
    total = sum(w for _, _, w in updates)
    first = updates[0][1]
    return {key: (sum(state[key].detach().to("cpu", torch.float64) * (w / total) for _, state, w in updates)
                  ).to(first[key].dtype) for key in first}


def personalised(global_state: State, own: State | None) -> dict[str, torch.Tensor]:
    """The global adapter with a client's own LoRA B factors (`aggregation.personal: b`): the A factors are
    what the federation shares, the B factors what the client keeps; None = the global adapter as it is."""
    if own is None:
        return dict(global_state)
    return {k: (own[k] if ".lora_B." in k and k in own else v) for k, v in global_state.items()}


def state_bytes(state: State) -> int:
    """What sending this adapter costs on the wire (tensor payload only)."""
    return sum(t.numel() * t.element_size() for t in state.values())


# ------------------------------------------------------------------ LoRA structure
def lora_pairs(state: State) -> list[tuple[str, str]]:
    """(A key, B key) of every adapted layer, in a stable order; a lone factor is an error."""
    pairs = []
    for key in sorted(state):
        if ".lora_A." in key:
            b = key.replace(".lora_A.", ".lora_B.")
            if b not in state:
                raise AggregationError(f"tensor {key} has no matching {b}")
            pairs.append((key, b))
    if not pairs and state:
        raise AggregationError("no LoRA factor pairs (…lora_A… / …lora_B…) in the adapter")
    return pairs


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def _stack(updates: list[Update], a_key: str, b_key: str, coef: list[float],
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """X = [c_1 B_1 … c_K B_K] and Y = [A_1; …; A_K], so that X·Y = Σ c_k B_k A_k without forming it."""
    xs = [_f64(state[b_key]) * c for (_, state, _), c in zip(updates, coef, strict=True)]
    ys = [_f64(state[a_key]) for _, state, _ in updates]
    return torch.cat(xs, dim=1), torch.cat(ys, dim=0)


def _gram_norm2(x: torch.Tensor, y: torch.Tensor) -> float:
    """‖X·Y‖²_F = trace((XᵀX)(YYᵀ)), from two small Gram matrices."""
    return float(torch.sum((x.T @ x) * (y @ y.T)))


def _lowrank_svd(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vᵀ of X·Y via QR of both factors and an SVD of the small core (exact, never dense)."""
    qx, rx = torch.linalg.qr(x)
    qy, ry = torch.linalg.qr(y.T)
    u, s, vh = torch.linalg.svd(rx @ ry.T)
    return qx @ u, s, vh @ qy.T


def _refactor(x: torch.Tensor, y: torch.Tensor, rank: int, scale: float, filler: torch.Tensor,
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """B, A of rank `rank` with scale·B·A = the best rank-`rank` approximation of X·Y, and the squared norm
    it drops.

    A gets orthonormal rows (the top right-singular vectors) and B the magnitudes, the same shape of start
    as a fresh LoRA (A spread out, B carrying the update). When X·Y has lower rank than `rank`, A's spare
    rows are completed from `filler` (the current A) made orthogonal to the rest, with zero B columns: the
    product is unchanged and no direction is left with both factors at zero, where training could not
    revive it.
    """
    u, s, vh = _lowrank_svd(x, y)
    top = float(s.max()) if s.numel() else 0.0
    k = min(rank, int((s > top * 1e-9).sum()) if top > 0 else 0)
    b = torch.zeros(x.shape[0], rank, dtype=torch.float64)
    b[:, :k] = u[:, :k] * (s[:k] / scale)
    rows = _complete(vh[:k], filler, rank)
    return b, rows.contiguous(), float((s[k:] ** 2).sum())


def _complete(rows: torch.Tensor, filler: torch.Tensor, rank: int) -> torch.Tensor:
    """`rows` (orthonormal) extended to `rank` orthonormal rows: first by the directions of `filler` not yet
    spanned (strongest first), then, if still short, by fixed pseudo-random ones."""
    sources = [filler, torch.randn(rank, filler.shape[1], generator=torch.Generator().manual_seed(0),
                                   dtype=torch.float64)]
    for source in sources:
        need = rank - rows.shape[0]
        if need <= 0:
            break
        rest = source - (source @ rows.T) @ rows if rows.shape[0] else source
        _, s, vh = torch.linalg.svd(rest, full_matrices=False)
        good = int((s > 1e-6 * float(source.norm())).sum())  # what is left of a spanned row is rounding
        rows = torch.cat([rows, vh[:min(need, good)]], dim=0)
    if rows.shape[0] < rank:  # a rank above the layer's width: the spare rows have no direction left
        rows = torch.cat([rows, torch.zeros(rank - rows.shape[0], filler.shape[1], dtype=torch.float64)], dim=0)
    return rows


# ------------------------------------------------------------------ the rules
def aggregate(adapters: Iterable[Update], current: State, spec: AggregationSpec, scale: float,
              momentum: State | None = None, rule: str | None = None) -> Aggregate:
    """One server step of `rule` (default `spec.rule`, else factors) from the current global adapter.

    `scale` is the LoRA scale alpha / r shared by clients and server. Returns the new global adapter in the
    current adapter's dtypes, the momentum buffer to carry to the next round, and what to log.
    """
    rule = rule or spec.rule or "factors"
    updates = collect(adapters)
    check_state("server (current global adapter)", current, updates[0][1])
    total = sum(w for _, _, w in updates)
    weights = [w / total for _, _, w in updates]
    if rule in ("factors", "median", "trimmed_mean"):
        out = _factors(updates, current, spec, scale, weights, momentum, rule)
    elif rule == "exact":
        out = _exact(updates, current, spec, scale, weights)
    elif rule == "fedsvd":
        out = _fedsvd(updates, current, spec, scale, weights)
    else:
        raise AggregationError(f"unknown aggregation rule {rule!r}; known: {', '.join(RULES)}")
    out.state = {k: v.to(current[k].dtype) for k, v in out.state.items()}
    out.info = {"rule": rule, "clients": len(updates), "server_lr": spec.server_lr, **out.info}
    return out


def center(values: list[torch.Tensor], weights: list[float], rule: str, trim: float) -> torch.Tensor:
    """The per-coordinate centre of the clients' values of one tensor: weighted mean (factors), median, or
    trimmed mean (the ⌈trim·K⌉ extremes at each end dropped, at least one, at most leaving one value)."""
    if rule == "factors":
        return sum(v * w for v, w in zip(values, weights, strict=True))
    k = len(values)
    ordered = torch.stack(values).sort(dim=0).values
    if rule == "median":
        return ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2
    cut = min(max(1, math.ceil(trim * k)), (k - 1) // 2)
    return ordered[cut:k - cut].mean(dim=0)


def _factors(updates: list[Update], current: State, spec: AggregationSpec, scale: float, weights: list[float],
             momentum: State | None, rule: str = "factors") -> Aggregate:
    """The paper's rule: element-wise mean of A and of B (or a robust centre of them), then the server step
    (and FedAvgM momentum)."""
    mean = {k: center([_f64(s[k]) for _, s, _ in updates], weights, rule, spec.trim) for k in current}
    err2 = norm2 = 0.0
    for a_key, b_key in lora_pairs(current):
        x, y = _stack(updates, a_key, b_key, [scale * w for w in weights])
        true2 = _gram_norm2(x, y)
        diff_x = torch.cat([x, -scale * mean[b_key]], dim=1)
        diff_y = torch.cat([y, mean[a_key]], dim=0)
        err2 += max(0.0, _gram_norm2(diff_x, diff_y))
        norm2 += true2
    step = {k: mean[k] - _f64(current[k]) for k in current}
    new_momentum = None
    if spec.momentum:
        previous = momentum or {}
        new_momentum = {k: spec.momentum * _f64(previous[k]) + step[k] if k in previous else step[k].clone()
                        for k in step}
        step = new_momentum
    if spec.server_lr == 1.0 and new_momentum is None:  # plain FedAvg: the mean itself, bit for bit
        state = mean
    else:
        state = {k: _f64(current[k]) + spec.server_lr * step[k] for k in current}
    info = {"agg_error": (err2 / norm2) ** 0.5 if norm2 > 0 else 0.0, "momentum": spec.momentum}
    moved = {k: v.float() for k, v in new_momentum.items()} if new_momentum is not None else None
    return Aggregate(state, moved, info)


def _exact(updates: list[Update], current: State, spec: AggregationSpec, scale: float,
           weights: list[float]) -> Aggregate:
    """Mean of ΔW_k (with the server step applied in ΔW space), re-factored at the adapters' own rank."""
    state: dict[str, torch.Tensor] = {}
    err2 = norm2 = 0.0
    eta = spec.server_lr
    for a_key, b_key in lora_pairs(current):
        rank = current[a_key].shape[0]
        x, y = _stack(updates, a_key, b_key, [scale * w for w in weights])
        norm2 += _gram_norm2(x, y)
        b, a, lost = _refactor(x, y, rank, scale, _f64(current[a_key]))
        err2 += lost  # the rule's own error: what truncating the plain mean to rank r_g drops
        if eta != 1.0:  # the stored target is (1 − η)·ΔW_current + η·mean ΔW_k, re-factored the same way
            x = torch.cat([x * eta, _f64(current[b_key]) * scale * (1 - eta)], dim=1)
            y = torch.cat([y, _f64(current[a_key])], dim=0)
            b, a, _ = _refactor(x, y, rank, scale, _f64(current[a_key]))
        state[a_key], state[b_key] = a, b
    for key in current:  # anything that is not a LoRA factor (none in PEFT adapters today) is averaged
        if key not in state:
            state[key] = sum(_f64(s[key]) * w for (_, s, _), w in zip(updates, weights, strict=True))
    info = {"agg_error": (err2 / norm2) ** 0.5 if norm2 > 0 else 0.0,
            "retained_energy": 1 - err2 / norm2 if norm2 > 0 else 1.0,
            "rank": next((current[a].shape[0] for a, _ in lora_pairs(current)), None)}
    return Aggregate(state, None, info)


def _fedsvd(updates: list[Update], current: State, spec: AggregationSpec, scale: float,
            weights: list[float]) -> Aggregate:
    """B̄ (A is shared), the server step on B, then A refreshed from the SVD of B̄A (rows orthonormal)."""
    state: dict[str, torch.Tensor] = {}
    err2 = norm2 = 0.0
    for a_key, b_key in lora_pairs(current):
        a_now = _f64(current[a_key])
        for client, s, _ in updates:
            if not torch.equal(_f64(s[a_key]), a_now):
                raise AggregationError(f"client {client}: fedsvd needs A frozen, but {a_key} differs from the "
                                       "broadcast one (train with model.lora.freeze_a)")
        b_mean = sum(_f64(s[b_key]) * w for (_, s, _), w in zip(updates, weights, strict=True))
        x, y = _stack(updates, a_key, b_key, [scale * w for w in weights])
        norm2 += _gram_norm2(x, y)
        err2 += max(0.0, _gram_norm2(torch.cat([x, -scale * b_mean], dim=1), torch.cat([y, a_now], dim=0)))
        b_new = _f64(current[b_key]) + spec.server_lr * (b_mean - _f64(current[b_key]))
        state[a_key], state[b_key] = orthonormal_refresh(a_now, b_new)
    info = {"agg_error": (err2 / norm2) ** 0.5 if norm2 > 0 else 0.0}
    return Aggregate(state, None, info)


def orthonormal_refresh(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with orthonormal rows in A' and B'A' = BA exactly (A' spans the top right-singular vectors of
    BA, completed from A's own directions when BA has lower rank, e.g. B = 0 at the start)."""
    b_new, a_new, _ = _refactor(b, a, a.shape[0], 1.0, a)
    return a_new, b_new


def orthonormal_init(state: State) -> dict[str, torch.Tensor]:
    """The fedsvd starting adapter: each A with orthonormal rows (same span as its random init), B unchanged."""
    out = {k: v.clone() for k, v in state.items()}
    for a_key, b_key in lora_pairs(state):
        q, _ = torch.linalg.qr(_f64(state[a_key]).T)
        out[a_key] = q.T.contiguous().to(state[a_key].dtype)
        out[b_key] = state[b_key].clone()
    return out
