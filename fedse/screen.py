"""Screening the clients' uploads on the server, before anything is aggregated.

A federation meets broken and hostile clients: a crashed trainer that uploads NaN, a client on another model
revision (wrong keys or shapes), a bug or an attacker that scales or flips its update. Averaging takes every
upload at face value, so one such adapter moves the global one arbitrarily far. The server therefore checks
each upload against the global adapter it broadcast, not against another client (the first to arrive may be
the broken one):

* the same tensor names, shapes and dtypes, and only finite values;
* an update norm ‖φ_k − φ_global‖ (over all factors) at most `max_norm_ratio` times the median norm of the
  *other* clients. Leave-one-out: with 2 or 3 clients a plain median includes the outlier itself, and a 100×
  update would pass. A sign-flipped adapter is about twice its own norm away from the broadcast adapter: that
  fails the test only when honest updates are small next to the adapter itself. Measured: on the test suite's
  micro model it is rejected; on the tiny model's smoke run (bench/faults.py) it passes, because Adam moves
  the LoRA factors further in a round than their initial scale. A robust rule (`median`, `trimmed_mean`) is
  the defence for what a norm bound cannot tell from an honest update.

A rejected client is reported with its reason and treated as missing: the round goes on with the rest if a
quorum remains (the caller decides), and the rejected adapter never reaches the average.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fedse.aggregate import AggregationError, State, Update, check_state, check_weight


@dataclass(frozen=True)
class Rejection:
    """One upload the server refused, and why (logged in metrics.json, MLflow and the Prefect artifact)."""

    client: str
    reason: str


def update_norm(state: State, current: State) -> float:
    """‖φ_k − φ_global‖ over every tensor of the adapter, in float64."""
    total = sum(float(((state[k].detach().double() - current[k].detach().double()) ** 2).sum()) for k in current)
    return total ** 0.5


def well_formed(client: str, state: State, weight: float, current: State) -> str | None:
    """Why this upload cannot be aggregated at all, or None."""
    try:
        check_weight(client, weight)
        check_state(client, state, current)
    except AggregationError as exc:
        return str(exc).removeprefix(f"client {client}: ")
    return None


def outliers(norms: Mapping[str, float], max_ratio: float) -> dict[str, str]:
    """Clients whose update norm exceeds max_ratio × the median of the others' (needs 2 clients or more).

    When the others did not move at all (a round without new data for them: `no_history`) there is no scale
    to compare with, and nobody is rejected for it."""
    out: dict[str, str] = {}
    if len(norms) < 2:
        return out
    for client, norm in norms.items():
        others = statistics.median(n for c, n in norms.items() if c != client)
        if others > 0 and norm > max_ratio * others:  # others that did not move (no new data) set no scale
            out[client] = (f"update norm {norm:.3g} is {norm / others:.1f}x the median of the other clients' "
                           f"({others:.3g}); bound aggregation.max_norm_ratio = {max_ratio:g}")
    return out


def screen(updates: Iterable[Update], current: State, max_norm_ratio: float | None,
           ) -> tuple[list[Update], list[Rejection]]:
    """(the uploads that may be aggregated, the rejected ones with reasons), in arrival order."""
    arrived = list(updates)
    rejected = {client: why for client, state, weight in arrived
                if (why := well_formed(client, state, weight, current)) is not None}
    if max_norm_ratio is not None:
        norms = {client: update_norm(state, current) for client, state, _ in arrived if client not in rejected}
        rejected |= outliers(norms, max_norm_ratio)
    kept = [(c, s, float(w)) for c, s, w in arrived if c not in rejected]
    return kept, [Rejection(c, rejected[c]) for c, _, _ in arrived if c in rejected]


def with_quorum(kept: list[Update], rejected: list[Rejection], missing: Mapping[str, str], quorum: int,
                round: int) -> None:
    """Raise, naming every absent client and why, when fewer than `quorum` uploads remain."""
    if len(kept) >= quorum:
        return
    absent = [f"{r.client} (rejected: {r.reason})" for r in rejected]
    absent += [f"{client} ({why})" for client, why in missing.items()]
    raise AggregationError(f"round {round}: {len(kept)} usable upload(s), below the quorum of {quorum}; "
                           f"missing: {'; '.join(absent) or 'none'}")

