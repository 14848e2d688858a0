"""Server-side aggregation of client adapters (FedAvg over LoRA tensors).

φ_{t+1} = Σ_k w_k φ_k / Σ_k w_k, element-wise: w_k = 1 is the paper's unweighted mean (its default), and
w_k = the number of successful trajectories client k trained on is the "weighted" ablation. Averaging the A
and B factors separately is what the paper does (it is not the average of the products B·A).

Adapters arrive one at a time (an iterable, e.g. a generator that downloads them), and only a running sum is
kept, so memory stays at about two adapters whatever the number of clients. Every adapter is validated
against the first before it is used: a client that sends a wrong key, shape, dtype or a NaN is named in the
error, and nothing is averaged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

State = Mapping[str, torch.Tensor]


class AggregationError(ValueError):
    """A client adapter that cannot be averaged; the message names the client and the tensor."""


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


def average(adapters: Iterable[tuple[str, State, float]]) -> dict[str, torch.Tensor]:
    """Weighted mean of `(client, state, weight)` triples, consumed one at a time.

    Sums are kept in float64 so the order clients arrive in does not change the result beyond rounding of
    the final cast back to each tensor's dtype.
    """
    total: dict[str, torch.Tensor] | None = None
    reference: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    weight_sum = 0.0
    count = 0
    for client, state, weight in adapters:
        if not weight >= 0 or weight != weight:
            raise AggregationError(f"client {client}: weight {weight} must be a finite number ≥ 0")
        check_state(client, state, _template(reference) if total is not None else None)
        if total is None:
            reference = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
            total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in state.items()}
        for key, tensor in state.items():
            total[key].add_(tensor.detach().to("cpu", torch.float64), alpha=float(weight))
        weight_sum += float(weight)
        count += 1
    if total is None:
        raise AggregationError("no client adapters to average")
    if weight_sum <= 0:
        raise AggregationError(f"the weights of all {count} clients are 0: nothing to average")
    return {k: (v / weight_sum).to(reference[k][1]) for k, v in total.items()}


def _template(reference: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """Zero-stride stand-ins carrying only shape and dtype, so validation never holds a second adapter."""
    return {k: torch.zeros((), dtype=dtype).expand(shape) for k, (shape, dtype) in reference.items()}


def state_bytes(state: State) -> int:
    """What sending this adapter costs on the wire (tensor payload only)."""
    return sum(t.numel() * t.element_size() for t in state.values())
