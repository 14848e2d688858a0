from __future__ import annotations

import pytest
import torch

from fedse.envs.pool import EnvPool
from fedse.envs.registry import make_env
from fedse.model import Agent
from fedse.policy import ConstrainedPolicy, episode_tokens, parse_reply, score_naive


@pytest.mark.parametrize(("env", "keep"), [("maze", None), ("wordle", None), ("webshop", None), ("maze", 2),
                                           ("webshop", 4)])
def test_cached_scores_equal_padded_naive_scores(micro_agent: Agent, env: str, keep: int | None) -> None:
    """The shared-cache scorer is an optimisation only: same log-probs as scoring prompt+candidate rows."""
    torch.manual_seed(0)
    for p in micro_agent.model.parameters():  # make LoRA non-trivial so the adapter is in the numbers too
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    policy = ConstrainedPolicy(micro_agent, temperature=1.0, seed=0, keep_turns=keep)
    worst = 0.0
    decisions = 0

    def act(envs, slots):
        nonlocal worst, decisions
        prompts = [episode_tokens(micro_agent, s, policy.budget, True, keep) for s in slots]
        cands = [[micro_agent.renderer.candidate(a) for a in s.info["admissible_actions"]] for s in slots]
        actions = policy(envs, slots)
        for cached, naive in zip(policy.last_scores, score_naive(micro_agent, prompts, cands), strict=True):
            worst = max(worst, float((cached - naive).abs().max()))
        decisions += len(slots)
        return actions

    EnvPool(lambda: make_env(env), [0, 1, 2]).run(act)
    assert decisions >= 3 and worst < 1e-4


def test_greedy_is_deterministic_and_sampling_follows_the_seed(micro_agent: Agent) -> None:
    def play(temperature: float, seed: int) -> list[list[str]]:
        pool = EnvPool(lambda: make_env("maze"), [0, 1, 2, 3])
        pool.run(ConstrainedPolicy(micro_agent, temperature, seed))
        return [[a for a, _ in s.history] for s in pool.slots]

    assert play(0.0, 0) == play(0.0, 1)
    assert play(1.0, 7) == play(1.0, 7)
    assert play(1.0, 7) != play(1.0, 8)


def test_long_episodes_are_refitted_to_the_window(micro_agent: Agent) -> None:
    policy = ConstrainedPolicy(micro_agent, temperature=1.0, seed=0, context=400)
    pool = EnvPool(lambda: make_env("webshop"), [0, 1])
    rebuilds = []
    original = policy._reset_cache

    def spy(slots: list) -> None:
        rebuilds.append(len(slots))
        original(slots)

    policy._reset_cache = spy  # type: ignore[method-assign]
    lengths = []

    def act(envs, slots):
        choice = policy(envs, slots)
        lengths.append(max(policy.length))
        return choice

    pool.run(act)
    assert all(s.done for s in pool.slots)
    assert max(lengths) <= 400
    turns = max(len(s.history) for s in pool.slots)
    assert 1 < len(rebuilds) < turns  # overflow rebuilds happen, but not at every turn


@pytest.mark.parametrize(("text", "thought", "action"), [
    ("Thought: go left first.\nAction: move left<|im_end|>", "go left first.", "move left"),
    ("Action: click[buy now]\nmore text", "", "click[buy now]"),
    ("just words", "", "just words"),
    ("Thought: hmm\nAction:", "hmm", "Thought: hmm\nAction:"),
])
def test_parse_reply(text: str, thought: str, action: str) -> None:
    assert parse_reply(text) == (thought, action)


@pytest.mark.parametrize("score", ["sum", "mean"])
def test_greedy_choice_is_the_argmax_of_the_configured_score(micro_agent: Agent, score: str) -> None:
    """`mean` divides each candidate's summed log-prob by its token count (no bias towards short actions)."""
    policy = ConstrainedPolicy(micro_agent, temperature=0.0, seed=0, score=score)
    checked = 0

    def act(envs, slots):
        nonlocal checked
        actions = policy(envs, slots)
        for slot, scores, action in zip(slots, policy.last_scores, actions, strict=True):
            cands = slot.info["admissible_actions"]
            lengths = torch.tensor([len(micro_agent.renderer.candidate(a)) for a in cands], dtype=scores.dtype)
            value = scores / lengths if score == "mean" else scores
            assert action == cands[int(torch.argmax(value))]
            checked += 1
        return actions

    EnvPool(lambda: make_env("textcraft"), [0, 1]).run(act)
    assert checked >= 2


def test_evaluation_plays_at_the_evaluation_temperature(micro_agent: Agent) -> None:
    from fedse.policy import PolicySpec, make_policy

    spec = PolicySpec(temperature=1.0, eval_temperature=0.0)
    assert make_policy(micro_agent, spec, evaluation=True).temperature == 0.0
    assert make_policy(micro_agent, spec, evaluation=False).temperature == 1.0
    sampled = PolicySpec(temperature=1.0, eval_temperature=0.7)
    assert make_policy(micro_agent, sampled, evaluation=True).temperature == 0.7
