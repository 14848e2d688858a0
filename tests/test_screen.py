"""Server-side screening of uploads (fedse/screen.py): malformed and outlying adapters are refused by name."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedse.aggregate import AggregationError
from fedse.screen import Rejection, outliers, screen, update_norm, with_quorum

A, B = "m.lora_A.weight", "m.lora_B.weight"


def state(a: float, b: float) -> dict[str, torch.Tensor]:
    return {A: torch.full((2, 4), a), B: torch.full((4, 2), b)}


GLOBAL = state(1.0, 0.0)


def honest(name: str, step: float) -> tuple[str, dict[str, torch.Tensor], float]:
    return name, state(1.0 + step, step), 1.0


def test_update_norm_is_the_distance_from_the_broadcast_adapter() -> None:
    assert update_norm(state(1.0, 0.5), GLOBAL) == pytest.approx((8 * 0.25) ** 0.5)
    assert update_norm(GLOBAL, GLOBAL) == 0.0


@pytest.mark.parametrize(("bad", "needle"), [
    ({A: torch.full((2, 4), float("nan")), B: torch.zeros(4, 2)}, "NaN"),
    ({A: torch.zeros(3, 4), B: torch.zeros(4, 2)}, "shape"),
    ({A: torch.zeros(2, 4)}, "missing"),
    ({A: torch.zeros(2, 4, dtype=torch.float64), B: torch.zeros(4, 2)}, "float64"),
])
def test_a_malformed_upload_is_rejected_with_its_reason_and_the_rest_kept(bad: dict, needle: str) -> None:
    kept, rejected = screen([honest("maze", 0.1), ("wordle", bad, 1.0), honest("textcraft", 0.2)], GLOBAL, 10.0)
    assert [c for c, _, _ in kept] == ["maze", "textcraft"]
    assert len(rejected) == 1 and rejected[0].client == "wordle" and needle in rejected[0].reason


def test_the_first_client_being_broken_does_not_reject_the_honest_ones() -> None:
    kept, rejected = screen([("maze", state(1.0, float("inf")), 1.0), honest("wordle", 0.1)], GLOBAL, None)
    assert [c for c, _, _ in kept] == ["wordle"] and [r.client for r in rejected] == ["maze"]


@pytest.mark.parametrize("clients", [2, 3, 5])
def test_a_scaled_update_is_rejected_even_among_two_or_three_clients(clients: int) -> None:
    ups = [honest(f"c{i}", 0.1 * (1 + i / 10)) for i in range(clients - 1)]
    bad = ("evil", {k: GLOBAL[k] + 100 * (v - GLOBAL[k]) for k, v in state(1.1, 0.1).items()}, 1.0)
    kept, rejected = screen([*ups, bad], GLOBAL, 10.0)
    assert [r.client for r in rejected] == ["evil"] and "max_norm_ratio = 10" in rejected[0].reason
    assert len(kept) == clients - 1


def test_a_sign_flipped_adapter_is_far_from_the_broadcast_one() -> None:
    flipped = ("evil", {k: -v for k, v in state(1.1, 0.1).items()}, 1.0)
    _, rejected = screen([honest("a", 0.1), honest("b", 0.12), flipped], GLOBAL, 10.0)
    assert [r.client for r in rejected] == ["evil"]


def test_a_client_that_did_not_move_sets_no_scale_for_the_others() -> None:
    # no_history: a client without new data this round uploads the broadcast adapter unchanged
    kept, rejected = screen([honest("maze", 0.3), ("wordle", GLOBAL, 1.0)], GLOBAL, 10.0)
    assert rejected == [] and len(kept) == 2
    assert outliers({"a": 0.0, "b": 0.0}, 10.0) == {}


def test_screening_off_keeps_every_well_formed_upload() -> None:
    big = ("big", state(500.0, 500.0), 1.0)
    kept, rejected = screen([honest("a", 0.1), big], GLOBAL, None)
    assert len(kept) == 2 and rejected == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.5, 2.0), min_size=2, max_size=8))
def test_honest_clients_within_a_factor_of_each_other_are_never_rejected(norms: list[float]) -> None:
    # the clean quick runs measured a largest-to-others ratio of at most 1.7; 4x spread stays far below 10x
    assert outliers({f"c{i}": n for i, n in enumerate(norms)}, 10.0) == {}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.5, 2.0), min_size=2, max_size=8), st.floats(25.0, 1e6))
def test_one_client_far_beyond_the_others_is_always_rejected(norms: list[float], factor: float) -> None:
    found = outliers({**{f"c{i}": n for i, n in enumerate(norms)}, "evil": factor * max(norms)}, 10.0)
    assert list(found) == ["evil"]


def test_below_quorum_the_round_fails_naming_every_absent_client() -> None:
    kept = [honest("maze", 0.1)]
    with pytest.raises(AggregationError) as err:
        with_quorum(kept, [Rejection("wordle", "tensor x holds NaN")], {"textcraft": "timed out after 60 s"}, 2, 3)
    msg = str(err.value)
    assert "round 3" in msg and "below the quorum of 2" in msg and "wordle (rejected" in msg and "textcraft" in msg
    with_quorum(kept, [], {}, 1, 3)  # enough: no error
