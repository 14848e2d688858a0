from __future__ import annotations

import torch

from fedse.envs.pool import EnvPool
from fedse.envs.registry import make_env
from fedse.learner import IGNORE, LearnerSpec, encode, train
from fedse.model import Agent
from fedse.scripted import expert_policy


def expert_trajectories(env: str, ids: list[int]):
    pool = EnvPool(lambda: make_env(env), ids)
    pool.run(expert_policy())
    return pool.trajectories(env, policy="expert")


def test_labels_cover_exactly_the_agent_replies(micro_agent: Agent) -> None:
    traj = expert_trajectories("maze", [10_001])[0]
    (example,) = encode(micro_agent, traj, max_len=4096)
    trained = [t for t in example.labels if t != IGNORE]
    text = micro_agent.tokenizer.decode(trained)
    assert text.count("Action: ") == len(traj.turns) == text.count("<|im_end|>")
    for turn in traj.turns:
        assert f"Action: {turn.action}" in text


def test_long_episodes_split_but_every_reply_is_trained_once(micro_agent: Agent) -> None:
    traj = expert_trajectories("webshop", [10_003])[0]
    whole = encode(micro_agent, traj, max_len=100_000)
    pieces = encode(micro_agent, traj, max_len=400)
    assert len(whole) == 1 and len(pieces) > 1
    count = lambda exs: sum(sum(1 for t in e.labels if t != IGNORE) for e in exs)  # noqa: E731
    assert count(pieces) == count(whole)
    assert all(len(e.ids) <= 400 for e in pieces)


def test_sft_lowers_the_loss_and_touches_only_the_adapter(micro_agent: Agent) -> None:
    trajs = expert_trajectories("maze", list(range(10_000, 10_016)))
    frozen = {n: p.clone() for n, p in micro_agent.model.named_parameters() if not p.requires_grad}
    stats = train(micro_agent, trajs, LearnerSpec(lr=5e-3, epochs=4, batch_size=4), seed=0)
    assert stats.steps == 16 and stats.examples == 16 and stats.agent_tokens > 0
    assert stats.loss_last < stats.loss_first
    for name, p in micro_agent.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name


def test_gradient_accumulation_counts_optimizer_steps(micro_agent: Agent) -> None:
    trajs = expert_trajectories("wordle", list(range(10_000, 10_008)))
    stats = train(micro_agent, trajs, LearnerSpec(epochs=1, batch_size=2, grad_accum=2), seed=0)
    assert stats.steps == 2


def test_freeze_a_trains_only_b_so_averaging_adapters_averages_the_updates(micro_spec) -> None:
    from fedse.model import adapter_state, load_agent, set_adapter_state

    spec = micro_spec.model_copy(update={"lora": micro_spec.lora.model_copy(update={"freeze_a": True})})
    agent = load_agent(spec)
    start = adapter_state(agent)
    deltas, states = [], []
    for env in ("maze", "wordle"):  # two clients from the same broadcast adapter
        set_adapter_state(agent, start, origin="start")
        train(agent, expert_trajectories(env, list(range(10_000, 10_004))), LearnerSpec(lr=5e-3, epochs=1), seed=0)
        states.append(adapter_state(agent))
    for key in start:
        if "lora_A" in key:
            assert all(torch.equal(s[key], start[key]) for s in states), key
    assert any(not torch.equal(states[0][k], start[k]) for k in start if "lora_B" in k)
    # with A shared, (mean of B_k) A == mean of (B_k A): the average adapter is the average weight update
    a_keys = sorted(k for k in start if "lora_A" in k)
    for a_key in a_keys:
        b_key = a_key.replace("lora_A", "lora_B")
        a = start[a_key]
        for s in states:
            deltas.append(s[b_key] @ a)
        mean_b = (states[0][b_key] + states[1][b_key]) / 2
        assert torch.allclose(mean_b @ a, (deltas[-2] + deltas[-1]) / 2, atol=1e-6)


def test_head_only_loss_equals_the_models_own_loss(micro_agent: Agent) -> None:
    from fedse.learner import collate, lm_loss

    trajs = expert_trajectories("maze", [10_010, 10_011, 10_012])
    ids, labels, mask = collate([e for t in trajs for e in encode(micro_agent, t, 4096)], 0)
    with torch.no_grad():
        plain = micro_agent.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert torch.allclose(lm_loss(micro_agent.model, ids, mask, labels), plain, atol=1e-5)


def test_fedprox_keeps_the_client_near_the_broadcast_adapter(micro_spec) -> None:
    from fedse.model import adapter_state, load_agent, set_adapter_state

    agent = load_agent(micro_spec)
    start = adapter_state(agent)
    trajs = expert_trajectories("maze", list(range(10_000, 10_008)))

    def drift(mu: float) -> float:
        set_adapter_state(agent, start, origin="start")
        train(agent, trajs, LearnerSpec(lr=5e-3, epochs=2), seed=0, prox_mu=mu)
        return sum(float(((v - start[k]) ** 2).sum()) for k, v in adapter_state(agent).items()) ** 0.5

    free, held = drift(0.0), drift(1e4)
    assert held < 0.5 * free


def test_training_runs_on_its_own_thread_count_and_restores_the_process_count(micro_agent: Agent) -> None:
    """learner.threads: two client processes side by side each train on one thread; the count they ran with
    must not leak into the acting or aggregation that follow in the same process."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # a process default unlike the training count, so a leak would show
    seen: list[int] = []
    try:
        train(micro_agent, expert_trajectories("maze", [0, 1]), LearnerSpec(lr=1e-3, epochs=1, threads=1),
              advance=lambda step, total, loss: seen.append(torch.get_num_threads()))
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def labelled_runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each contiguous run of trained tokens (one agent reply each)."""
    runs, start = [], None
    for i, x in enumerate([*labels, IGNORE]):
        if x != IGNORE and start is None:
            start = i
        elif x == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_each_reply_is_learned_in_exactly_the_prompt_the_policy_acted_on(micro_agent: Agent) -> None:
    """Issue 26: the learner's windows are the policy's. Replay a 15-turn Maze episode: at every decision the
    policy's prompt (its window, minus the `Action: ` it commits to) is the prefix of the one example that
    trains that decision's reply, and every reply is trained once."""
    import random

    from fedse.envs.pool import Slot
    from fedse.policy import ConstrainedPolicy, PolicySpec, acting_window, episode_window
    from fedse.prompt import ACTION_PREFIX

    pool = EnvPool(lambda: make_env("maze"), [10_007])
    rng = random.Random(3)
    pool.run(lambda envs, slots: ["move up" if rng.random() < 0.5 else "move left" for _ in slots])
    (traj,) = pool.trajectories("maze", policy="random")
    assert len(traj.turns) == 15
    for spec in (PolicySpec(mode="constrained", context=300, history_turns=4),
                 PolicySpec(mode="constrained", context=200, history_turns=None)):
        policy = ConstrainedPolicy(micro_agent, context=spec.context, keep_turns=spec.history_turns)
        examples = encode(micro_agent, traj, 4096, acting_window(micro_agent, spec))
        assert len(examples) > 1, "the window dropped turns, so the episode needs several examples"
        prefix = micro_agent.renderer.const(ACTION_PREFIX)
        history = [(t.action, obs) for t, obs in zip(traj.turns, [*[x.observation for x in traj.turns[1:]],
                                                                   traj.final_observation], strict=True)]
        spans = [(e, a, b) for e in examples for a, b in labelled_runs(e.labels)]  # in decision order
        assert len(spans) == len(traj.turns)
        for t, (turn, (example, a, b)) in enumerate(zip(traj.turns, spans, strict=True)):
            slot = Slot(traj.task_id, traj.turns[0].observation, "", {}, history=history[:t])
            prompt, _ = episode_window(micro_agent, slot, policy.budget, True, policy.keep_turns)
            assert example.ids[:a] == prompt[:-len(prefix)], (spec, t)  # the context it acted in
            assert example.ids[a:b] == micro_agent.renderer.reply(turn.action)[0], (spec, t)
        labelled = sum(sum(1 for x in e.labels if x != IGNORE) for e in examples)
        reply_tokens = sum(len(micro_agent.renderer.reply(t.action)[0]) for t in traj.turns)
        assert labelled == reply_tokens, "every reply once, nothing else"
