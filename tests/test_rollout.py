"""Common random numbers: an episode's draws are fixed by its key, not by its round, batch or neighbours."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedse.config import load_config
from fedse.envs.registry import env_class
from fedse.federation import evaluate_adapter
from fedse.model import Agent, adapter_state
from fedse.policy import PolicySpec
from fedse.rollout import Episodes, episode_key, rollout

TASKS = [0, 1, 2, 3, 4]


def actions(records: list) -> list[tuple[int, list[str]]]:
    return [(r.task_id, [t.action for t in r.turns]) for r in records]


def nontrivial_lora(agent: Agent) -> None:
    """A LoRA with an effect, so the adapter is in the numbers (a fresh one is zero)."""
    torch.manual_seed(0)
    for p in agent.model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)


def test_evaluation_keys_name_the_task_and_pass_only() -> None:
    assert episode_key(0, "maze", 7, True, round=0) == episode_key(0, "maze", 7, True, round=3)
    assert episode_key(0, "maze", 7, True, pass_=0) != episode_key(0, "maze", 7, True, pass_=1)
    assert episode_key(0, "maze", 7, False, round=0) != episode_key(0, "maze", 7, False, round=3)
    assert episode_key(0, "maze", 7, True) != episode_key(1, "maze", 7, True)


def test_an_episode_does_not_depend_on_its_batch(micro_agent: Agent) -> None:
    """Batch size 2 and 4 (other chunking, other neighbours) play the very same episodes, at temperature 1."""
    nontrivial_lora(micro_agent)
    played = {b: rollout(micro_agent, "maze", TASKS, PolicySpec(batch_size=b, eval_temperature=1.0), True, seed=0)
              for b in (2, 4)}
    assert actions(played[2]) == actions(played[4])
    reordered = rollout(micro_agent, "maze", TASKS[::-1], PolicySpec(batch_size=3, eval_temperature=1.0), True, 0)
    assert sorted(actions(reordered)) == sorted(actions(played[2]))


def test_rounds_are_scored_on_the_same_draws(micro_agent: Agent, micro_params: Path) -> None:
    """The same adapter evaluated as round 0 and as round 3: identical per-task results and actions."""
    nontrivial_lora(micro_agent)
    cfg = load_config(micro_params, profile="smoke", overrides=[
        "federation.eval_episodes=4", "federation.rounds=6", "policy.eval_temperature=1.0", "policy.batch_size=3",
        "eval.passes=2", "federation.curve_split=test"])  # round 3 on the test tasks too, as round 0
    state = adapter_state(micro_agent)
    first, later = (evaluate_adapter(micro_agent, cfg, state, "maze", cfg.seed, round) for round in (0, 3))
    assert first.task_ids == later.task_ids and first.task_success == later.task_success
    assert first.passes == 2 and first.as_dict()["episodes"] == 8
    assert first.decisions > 0 and first.seconds > 0
    played = [rollout(micro_agent, "maze", TASKS, cfg.policy, True, seed=0, round=round) for round in (0, 3)]
    assert actions(played[0]) == actions(played[1])
    explored = [rollout(micro_agent, "maze", TASKS, cfg.policy, False, seed=0, round=round) for round in (0, 3)]
    assert actions(explored[0]) != actions(explored[1])  # exploration draws afresh every round


def test_passes_of_a_task_use_different_draws(micro_agent: Agent) -> None:
    nontrivial_lora(micro_agent)
    played = rollout(micro_agent, "maze", TASKS, PolicySpec(batch_size=4, eval_temperature=1.0), True, 0, passes=2)
    assert [r.task_id for r in played] == [t for t in TASKS for _ in range(2)]
    pairs = [(actions(played[2 * i:2 * i + 1]), actions(played[2 * i + 1:2 * i + 2])) for i in range(len(TASKS))]
    assert any(a != b for a, b in pairs)


def test_greedy_play_ignores_the_keys(micro_agent: Agent) -> None:
    """At temperature 0 the noise is not used: every pass and every seed plays the argmax."""
    nontrivial_lora(micro_agent)
    spec = PolicySpec(batch_size=4, eval_temperature=0.0)
    played = rollout(micro_agent, "maze", TASKS, spec, True, 0, passes=2)
    assert actions(played[0::2]) == actions(played[1::2])
    assert actions(rollout(micro_agent, "maze", TASKS, spec, True, seed=5)) == actions(played[0::2])


def test_rollout_reports_its_pace(micro_agent: Agent) -> None:
    played = rollout(micro_agent, "wordle", [0, 1], PolicySpec(batch_size=2, threads=1), False, 0, round=0)
    assert isinstance(played, Episodes)
    assert played.pace.decisions == sum(len(r.turns) for r in played) and played.pace.seconds > 0
    with pytest.raises(ValueError, match="passes"):
        rollout(micro_agent, "wordle", [0], PolicySpec(), False, 0, passes=0)


def test_exploration_attempts_of_a_task_are_distinct_draws_and_the_first_keeps_its_old_key() -> None:
    assert episode_key(0, "maze", 7, False, round=2) == "explore/seed=0/env=maze/round=2/task=7"
    keys = {episode_key(0, "maze", 7, False, round=2, pass_=p) for p in range(4)}
    assert len(keys) == 4


@pytest.mark.parametrize(("mode", "env"), [("constrained", "textcraft"), ("react", "wordle")])
def test_continuous_batching_plays_the_episodes_of_chunked_batching(tiny_agent: Agent, mode: str, env: str) -> None:
    """An episode that ends is replaced at once by the next queued one (continuous), or chunks of batch_size run
    to their longest episode (chunked): each episode plays the same actions either way and at any batch size,
    sampled at temperature 1 (the records come in the same order too)."""
    spec = PolicySpec(mode=mode, eval_temperature=1.0, max_new_tokens=24)
    tasks = list(env_class(env).explore_ids()[:8])
    played = {(batching, size): rollout(tiny_agent, env, tasks, spec.model_copy(update={
        "batching": batching, "batch_size": size}), True, seed=0) for batching, size in [
        ("chunked", 3), ("continuous", 3), ("continuous", 1)]}
    reference = actions(played["chunked", 3])
    assert len({len(turns) for _, turns in reference}) > 1  # episodes of different lengths: places were refilled
    for key, records in played.items():
        assert actions(records) == reference, key
