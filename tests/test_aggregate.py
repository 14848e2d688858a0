from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedse.aggregate import AggregationError, average, state_bytes


def adapter(value: float, shape: tuple[int, ...] = (2, 3)) -> dict[str, torch.Tensor]:
    return {"a.lora_A.weight": torch.full(shape, value), "a.lora_B.weight": torch.full(shape[::-1], -value)}


def test_unweighted_mean_matches_hand_computed() -> None:
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([[0.0, 4.0]])}
    b = {"x": torch.tensor([3.0, 6.0]), "y": torch.tensor([[2.0, 0.0]])}
    c = {"x": torch.tensor([5.0, 1.0]), "y": torch.tensor([[1.0, 2.0]])}
    out = average([("0", a, 1), ("1", b, 1), ("2", c, 1)])
    assert torch.equal(out["x"], torch.tensor([3.0, 3.0]))
    assert torch.equal(out["y"], torch.tensor([[1.0, 2.0]]))


def test_weighted_mean_matches_hand_computed() -> None:
    a, b = {"x": torch.tensor([1.0, 10.0])}, {"x": torch.tensor([4.0, 0.0])}
    out = average([("0", a, 1), ("1", b, 2)])  # (1·a + 2·b) / 3
    assert torch.allclose(out["x"], torch.tensor([3.0, 10.0 / 3]))


def test_zero_weight_client_is_ignored_and_dtype_is_kept() -> None:
    a, b = {"x": torch.ones(3, dtype=torch.bfloat16)}, {"x": torch.zeros(3, dtype=torch.bfloat16)}
    out = average([("0", a, 5), ("1", b, 0)])
    assert out["x"].dtype == torch.bfloat16 and torch.equal(out["x"], a["x"])


@pytest.mark.parametrize(("bad", "needle"), [
    ({"a.lora_A.weight": torch.full((2, 3), float("nan")), "a.lora_B.weight": torch.zeros(3, 2)},
     "client site-b: tensor a.lora_A.weight holds NaN"),
    ({"a.lora_A.weight": torch.zeros(2, 4), "a.lora_B.weight": torch.zeros(3, 2)},
     "client site-b: tensor a.lora_A.weight has shape (2, 4), expected (2, 3)"),
    ({"a.lora_A.weight": torch.zeros(2, 3)}, "client site-b: tensor a.lora_B.weight is missing"),
    ({**adapter(1.0), "extra": torch.zeros(1)}, "client site-b: unexpected tensor extra"),
    ({"a.lora_A.weight": torch.zeros(2, 3, dtype=torch.float16), "a.lora_B.weight": torch.zeros(3, 2)},
     "client site-b: tensor a.lora_A.weight is torch.float16, expected torch.float32"),
])
def test_bad_client_adapter_is_rejected_with_its_name(bad: dict, needle: str) -> None:
    with pytest.raises(AggregationError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        average([("site-a", adapter(1.0), 1), ("site-b", bad, 1), ("site-c", adapter(2.0), 1)])


def test_nan_in_first_client_and_bad_weights_are_rejected() -> None:
    with pytest.raises(AggregationError, match=r"client first: tensor a\.lora_B\.weight holds NaN"):
        average([("first", {**adapter(1.0), "a.lora_B.weight": torch.tensor([[float("inf")]])}, 1)])
    with pytest.raises(AggregationError, match="weight -1"):
        average([("0", adapter(1.0), -1)])
    with pytest.raises(AggregationError, match="are 0"):
        average([("0", adapter(1.0), 0), ("1", adapter(2.0), 0)])
    with pytest.raises(AggregationError, match="no client adapters"):
        average([])


def test_adapters_are_consumed_one_at_a_time() -> None:
    """A generator is read lazily: the aggregator never asks for all K adapters at once."""
    live = []

    def stream():
        for k in range(6):
            live.append(k)
            yield str(k), adapter(float(k)), 1.0

    out = average(stream())
    assert live == list(range(6)) and torch.allclose(out["a.lora_A.weight"], torch.full((2, 3), 2.5))
    assert state_bytes(out) == 2 * 6 * 4


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(finite, min_size=4, max_size=4), st.integers(0, 50)), min_size=1, max_size=8)
       .filter(lambda xs: sum(w for _, w in xs) > 0))
def test_average_is_the_weighted_mean_and_stays_in_the_hull(clients: list[tuple[list[float], int]]) -> None:
    states = [(f"c{i}", {"t": torch.tensor(v, dtype=torch.float32)}, float(w)) for i, (v, w) in enumerate(clients)]
    out = average(states)["t"].double()
    stacked = torch.tensor([v for v, _ in clients], dtype=torch.float64)
    weights = torch.tensor([w for _, w in clients], dtype=torch.float64)
    expected = (stacked * weights[:, None]).sum(0) / weights.sum()
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-3)
    used = stacked[weights > 0]
    assert bool((out >= used.min(0).values - 1e-3).all() and (out <= used.max(0).values + 1e-3).all())
    # order of arrival does not matter
    assert torch.allclose(average(states[::-1])["t"].double(), out, rtol=1e-6, atol=1e-4)
