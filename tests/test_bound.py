"""bench/bound.py counts the FLOPs our models execute on a CPU, attention included."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import flop_counter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bound import _count_cpu_attention, counted, peak_gflops


def test_a_matrix_product_counts_two_flops_per_multiply_add() -> None:
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    flops, out = counted(lambda: a @ b)
    assert flops == 2 * 8 * 16 * 4 and out.shape == (8, 4)


def test_cpu_attention_forward_and_backward_are_counted() -> None:
    _count_cpu_attention()
    _count_cpu_attention()  # registering twice is harmless
    q = torch.randn(2, 4, 32, 16, requires_grad=True)
    forward, _ = counted(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
    assert forward == flop_counter.sdpa_flop_count(q.shape, q.shape, q.shape) > 0
    both, _ = counted(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward())
    assert both > forward


def test_the_bound_is_a_positive_rate() -> None:
    assert peak_gflops(torch.float32, size=64, seconds=0.05) > 0


def test_walking_wordle_computes_a_fraction_of_scoring_every_guess(micro_agent) -> None:
    """bench/walk.py's figures on one episode each: every key present, and on Wordle (400 guesses, a 1624-token
    tree) the walk counts far fewer FLOPs per decision than scoring the whole tree; on Maze (10 tree tokens,
    below walk_nodes) both are the scored path."""
    from walk import acting

    from fedse.config import load_config

    cfg = load_config(overrides=["policy.mode=constrained", "policy.score=trie"])
    out = acting(micro_agent, cfg, ["maze", "wordle"], 1, walk_nodes=64)
    for env in ("maze", "wordle", "all"):
        for how in ("score", "walk"):
            assert out[f"{env}.{how}.decisions_per_sec"] > 0
    assert out["wordle.walk.gflop_per_decision"] < 0.2 * out["wordle.score.gflop_per_decision"]
    assert out["maze.walk.gflop_per_decision"] == out["maze.score.gflop_per_decision"]
