from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedse.aggregate import (
    AggregationError,
    AggregationSpec,
    aggregate,
    average,
    orthonormal_init,
    orthonormal_refresh,
    state_bytes,
)


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


def test_state_bytes_counts_the_tensor_payload() -> None:
    assert state_bytes(adapter(1.0)) == 2 * 6 * 4


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


# ------------------------------------------------------------------ the rules (factors, exact, fedsvd)
A, B = "m.lora_A.weight", "m.lora_B.weight"
OUT, IN = 12, 10


def lora(rank: int, used: int, gen: torch.Generator, a: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A hand-built adapter of `rank` whose first `used` components are non-zero (a rank-`used` update)."""
    b = torch.zeros(OUT, rank)
    b[:, :used] = torch.randn(OUT, used, generator=gen)
    if a is None:
        a = torch.zeros(rank, IN)
        a[:used] = torch.randn(used, IN, generator=gen)
    return {A: a.clone(), B: b}


def delta(state: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    return scale * state[B].double() @ state[A].double()


def test_exact_refactoring_reproduces_the_mean_update_at_rank_k_times_r() -> None:
    """K clients each moved by a rank-r update; at r_g = K·r the SVD re-factoring loses nothing."""
    gen = torch.Generator().manual_seed(0)
    k, r, scale = 3, 2, 2.0
    clients = [(str(i), lora(k * r, r, gen), 1.0) for i in range(k)]
    current = lora(k * r, 0, gen, a=torch.randn(k * r, IN, generator=gen))
    out = aggregate(clients, current, AggregationSpec(rule="exact"), scale)
    mean = sum(delta(s, scale) for _, s, _ in clients) / k
    assert torch.allclose(delta(out.state, scale), mean, atol=1e-5)
    assert out.info["agg_error"] < 1e-6 and out.info["retained_energy"] > 1 - 1e-9
    assert out.state[A].shape == (k * r, IN) and out.state[A].dtype == torch.float32


def test_exact_truncation_logs_the_energy_it_keeps() -> None:
    gen = torch.Generator().manual_seed(1)
    clients = [(str(i), lora(4, 4, gen), 1.0) for i in range(3)]  # mean has rank up to 12 > 4
    out = aggregate(clients, lora(4, 0, gen, a=torch.randn(4, IN, generator=gen)), AggregationSpec(rule="exact"), 1.0)
    assert 0.3 < out.info["retained_energy"] < 1.0
    assert out.info["agg_error"] == pytest.approx((1 - out.info["retained_energy"]) ** 0.5, rel=1e-6)
    mean = sum(delta(s, 1.0) for _, s, _ in clients) / 3
    u, s, vh = torch.linalg.svd(mean)
    best = (u[:, :4] * s[:4]) @ vh[:4]  # Eckart-Young: the truncation is the best rank-4 approximation
    assert torch.allclose(delta(out.state, 1.0), best, atol=1e-4)


def test_factors_error_is_the_cross_term_and_vanishes_when_one_factor_is_shared() -> None:
    gen = torch.Generator().manual_seed(2)
    clients = [(str(i), lora(3, 3, gen), 1.0) for i in range(4)]
    current = lora(3, 0, gen, a=torch.randn(3, IN, generator=gen))
    out = aggregate(clients, current, AggregationSpec(), 2.0)
    mean = sum(delta(s, 2.0) for _, s, _ in clients) / 4
    bbar = sum(s[B].double() for _, s, _ in clients) / 4
    abar = sum(s[A].double() for _, s, _ in clients) / 4
    expected = float((mean - 2.0 * bbar @ abar).norm() / mean.norm())
    assert out.info["rule"] == "factors" and out.info["agg_error"] == pytest.approx(expected, rel=1e-6)
    shared = current[A]
    same_a = [(str(i), lora(3, 3, gen, a=shared), 1.0) for i in range(4)]
    assert aggregate(same_a, current, AggregationSpec(), 2.0).info["agg_error"] < 1e-6


def test_fedsvd_keeps_a_orthonormal_and_the_product_exact() -> None:
    gen = torch.Generator().manual_seed(3)
    start = orthonormal_init(lora(4, 0, gen, a=torch.randn(4, IN, generator=gen)))
    eye = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(start[A].double() @ start[A].double().T, eye, atol=1e-6)
    current = start
    for _ in range(3):  # rounds: clients train B only from the broadcast A
        clients = [(str(i), {A: current[A].clone(), B: current[B] + torch.randn(OUT, 4, generator=gen)}, 1.0)
                   for i in range(3)]
        out = aggregate(clients, current, AggregationSpec(rule="fedsvd"), 2.0)
        bbar = sum(s[B].double() for _, s, _ in clients) / 3
        assert torch.allclose(delta(out.state, 2.0), 2.0 * bbar @ current[A].double(), atol=1e-4)
        assert torch.allclose(out.state[A].double() @ out.state[A].double().T, eye, atol=1e-5)
        assert out.info["agg_error"] < 1e-6
        current = out.state


def test_fedsvd_refuses_clients_that_trained_a() -> None:
    gen = torch.Generator().manual_seed(4)
    current = orthonormal_init(lora(2, 0, gen, a=torch.randn(2, IN, generator=gen)))
    moved = {A: current[A] + 0.1, B: current[B]}
    with pytest.raises(AggregationError, match="client x: fedsvd needs A frozen"):
        aggregate([("x", moved, 1.0)], current, AggregationSpec(rule="fedsvd"), 1.0)


def test_orthonormal_refresh_completes_a_rank_deficient_product() -> None:
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(4, IN, generator=gen, dtype=torch.float64)
    b = torch.zeros(OUT, 4, dtype=torch.float64)
    b[:, 0] = torch.randn(OUT, generator=gen, dtype=torch.float64)  # BA has rank 1
    a2, b2 = orthonormal_refresh(a, b)
    assert torch.allclose(b2 @ a2, b @ a, atol=1e-10)
    assert torch.allclose(a2 @ a2.T, torch.eye(4, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("rule", ["factors", "exact", "fedsvd"])
def test_server_lr_scales_the_step_from_the_current_adapter(rule: str) -> None:
    gen = torch.Generator().manual_seed(6)
    rank = 6
    current = orthonormal_init(lora(rank, 2, gen, a=torch.randn(rank, IN, generator=gen)))
    clients = [(str(i), {A: current[A].clone() if rule == "fedsvd" else current[A] + 0.01 * torch.randn(
        rank, IN, generator=gen), B: current[B] + torch.randn(OUT, rank, generator=gen) * 0.1}, 1.0) for i in range(2)]
    one = aggregate(clients, current, AggregationSpec(rule=rule), 1.0)
    two = aggregate(clients, current, AggregationSpec(rule=rule, server_lr=2.0), 1.0)
    if rule == "factors":  # per factor: current + 2·(mean − current)
        for key in (A, B):
            assert torch.allclose(two.state[key], current[key] + 2 * (one.state[key] - current[key]), atol=1e-5)
    else:  # in ΔW space (up to the rank-r truncation, exact here for fedsvd)
        want = delta(current, 1.0) + 2 * (delta(one.state, 1.0) - delta(current, 1.0))
        tol = 1e-4 if rule == "fedsvd" else 0.05 * float(want.norm())
        assert float((delta(two.state, 1.0) - want).norm()) <= tol


def test_momentum_carries_the_previous_step() -> None:
    current = {A: torch.zeros(1, 2), B: torch.zeros(2, 1)}
    up = {A: torch.ones(1, 2), B: torch.ones(2, 1)}
    spec = AggregationSpec(momentum=0.5)
    first = aggregate([("c", up, 1.0)], current, spec, 1.0)
    assert torch.allclose(first.state[A], torch.ones(1, 2)) and first.momentum is not None
    second = aggregate([("c", up, 1.0)], first.state, spec, 1.0, first.momentum)
    # step 2: m = 0.5·1 + (1 − 1) = 0.5 → 1.5
    assert torch.allclose(second.state[A], torch.full((1, 2), 1.5))
    with pytest.raises(ValueError, match="momentum is only supported with rule factors"):
        AggregationSpec(rule="exact", momentum=0.9)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 10_000))
def test_exact_does_not_depend_on_the_order_clients_arrive_in(k: int, r: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    clients = [(str(i), lora(k * r, r, gen), 1.0 + i) for i in range(k)]
    current = lora(k * r, 0, gen, a=torch.randn(k * r, IN, generator=gen))
    one = aggregate(clients, current, AggregationSpec(rule="exact"), 1.5)
    two = aggregate(clients[::-1], current, AggregationSpec(rule="exact"), 1.5)
    assert torch.allclose(delta(one.state, 1.5), delta(two.state, 1.5), atol=1e-4)
    total = sum(w for _, _, w in clients)
    mean = sum(w * delta(s, 1.5) for _, s, w in clients) / total
    assert torch.allclose(delta(one.state, 1.5), mean, atol=1e-4)


# ------------------------------------------------------------------ robust rules
def test_median_and_trimmed_mean_ignore_one_extreme_client() -> None:
    current = adapter(0.0)
    honest = [("a", adapter(1.0), 1.0), ("b", adapter(2.0), 1.0), ("c", adapter(3.0), 1.0)]
    wild = ("x", adapter(1000.0), 1.0)
    median = aggregate([*honest, wild], current, AggregationSpec(rule="median"), 1.0).state
    assert torch.allclose(median["a.lora_A.weight"], torch.full((2, 3), 2.5))  # even K: mean of the middle two
    trimmed = aggregate([*honest, wild, ("y", adapter(-1000.0), 1.0)], current,
                        AggregationSpec(rule="trimmed_mean", trim=0.2), 1.0).state
    assert torch.allclose(trimmed["a.lora_A.weight"], torch.full((2, 3), 2.0))  # 1 dropped at each end of 5
    assert torch.allclose(trimmed["a.lora_B.weight"], torch.full((3, 2), -2.0))


def test_trimmed_mean_of_three_is_their_median_and_odd_median_is_the_middle() -> None:
    ups = [("a", adapter(1.0), 1.0), ("b", adapter(5.0), 1.0), ("c", adapter(2.0), 1.0)]
    spec = AggregationSpec(rule="trimmed_mean", trim=0.1)
    assert torch.equal(aggregate(ups, adapter(0.0), spec, 1.0).state["a.lora_A.weight"], torch.full((2, 3), 2.0))
    med = aggregate(ups, adapter(0.0), AggregationSpec(rule="median"), 1.0)
    assert torch.equal(med.state["a.lora_A.weight"], torch.full((2, 3), 2.0)) and med.info["rule"] == "median"


def test_momentum_is_refused_with_a_robust_rule() -> None:
    with pytest.raises(ValueError, match="momentum is only supported with rule factors"):
        AggregationSpec(rule="median", momentum=0.5)
