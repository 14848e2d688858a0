"""Record-level DP (fedse/dpsgd.py): each trajectory's gradient from Opacus's per-row gradients, its clipping
measured, the noise's standard deviation measured, the accountant composed over rounds against Opacus's own,
and a DP run's ε carried across a kill and a resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedse import dpsgd
from fedse.config import load_config
from fedse.learner import LearnerSpec, collate, labelled_logits
from fedse.model import Agent
from fedse.privacy import PrivacyError, RecordDP, composed, epsilon, record_epsilon, record_plan
from fedse.seed import expert_trajectories


def experts(env: str, n: int) -> list:
    return expert_trajectories(env, n, seed=0)[0]


def lora_params(agent: Agent) -> list[torch.nn.Parameter]:
    return [p for p in agent.model.parameters() if p.requires_grad]


def plain_gradient(agent: Agent, rows: list, spec: LearnerSpec) -> list[torch.Tensor]:
    """One trajectory's gradient by plain autograd, no Opacus: its mean token loss over all its rows."""
    params = lora_params(agent)
    for p in params:
        p.grad = None
    ids, labels, mask = collate(rows, agent.tokenizer.pad_token_id or 0)
    logits, targets, _ = labelled_logits(agent.model, ids, mask, labels)
    torch.nn.functional.cross_entropy(logits, targets, reduction="sum").div(len(targets)).backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def test_each_trajectorys_gradient_is_opacus_rows_summed_and_equals_autograd(micro_agent: Agent) -> None:
    from opacus import GradSampleModule

    spec = LearnerSpec(batch_size=3, max_len=160)  # short windows: a trajectory is several rows
    data = dpsgd.trajectory_rows(micro_agent, experts("maze", 3), spec.max_len, None)
    assert max(len(rows) for rows in data) > 1
    micro_agent.model.train()  # Opacus records activations in training mode only; dropout off, so the two
    for module in micro_agent.model.modules():  # computations see the same function
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    expected = [plain_gradient(micro_agent, rows, spec) for rows in data]
    wrapped = GradSampleModule(micro_agent.model, batch_first=True, loss_reduction="sum")
    try:
        grads, _ = dpsgd.trajectory_gradients(micro_agent, lora_params(micro_agent), data, spec)
    finally:
        wrapped.cleanup()
    for i, mine in enumerate(expected):
        for got, want in zip(grads, mine, strict=True):
            assert torch.allclose(got[i], want, atol=1e-6, rtol=1e-4)
    assert not any(hasattr(p, "grad_sample") for p in lora_params(micro_agent))  # hooks and attributes gone


def test_clipping_bounds_each_trajectorys_contribution(micro_agent: Agent) -> None:
    from opacus import GradSampleModule

    spec = LearnerSpec(batch_size=4, max_len=400)
    data = dpsgd.trajectory_rows(micro_agent, experts("wordle", 4), spec.max_len, None)
    params = lora_params(micro_agent)
    wrapped = GradSampleModule(micro_agent.model, batch_first=True, loss_reduction="sum")
    micro_agent.model.train()
    try:
        grads, _ = dpsgd.trajectory_gradients(micro_agent, params, data, spec)
    finally:
        wrapped.cleanup()
    micro_agent.model.eval()
    raw = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in grads], dim=1).norm(dim=1)
    clip = float(raw.median())  # half of them above the bound, half below
    for i in range(len(data)):  # each trajectory alone through Opacus's optimizer, no noise, batch 1
        opt = dpsgd.optimizer(torch.optim.SGD(params, lr=1.0), {"noise": 0.0, "clip": clip}, 1.0, seed=0)
        dpsgd.privatise(opt, params, [g[i:i + 1].clone() for g in grads])
        out = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
        assert out <= clip * (1 + 1e-5)
        assert out == pytest.approx(min(float(raw[i]), clip), rel=1e-4)  # clipped to C, or passed as it was
        opt.zero_grad(set_to_none=True)


def test_the_noise_standard_deviation_is_the_configured_one() -> None:
    weight = torch.nn.Parameter(torch.zeros(400, 500))
    plan = {"noise": 1.3, "clip": 0.7}
    opt = dpsgd.optimizer(torch.optim.SGD([weight], lr=1.0), plan, 2.5, seed=4)
    dpsgd.privatise(opt, [weight], [torch.zeros(1, 400, 500)])  # an empty sample: noise alone
    assert float(weight.grad.std()) == pytest.approx(1.3 * 0.7 / 2.5, rel=0.01)
    assert abs(float(weight.grad.mean())) < 0.005
    first = weight.grad.clone()
    again = dpsgd.optimizer(torch.optim.SGD([weight], lr=1.0), plan, 2.5, seed=4)
    dpsgd.privatise(again, [weight], [torch.zeros(1, 400, 500)])
    assert torch.equal(weight.grad, first)  # seeded: a resumed round draws the same noise


def test_the_accountant_composes_rounds_as_opacus_does_step_by_step() -> None:
    from opacus.accountants import RDPAccountant

    history = [(1.1, 0.25, 16), (1.1, 0.1, 16), (0.9, 0.5, 8)]
    stepped = RDPAccountant()
    for z, q, n in history:
        for _ in range(n):
            stepped.step(noise_multiplier=z, sample_rate=q)
    assert composed(history, 1e-5) == pytest.approx(stepped.get_epsilon(delta=1e-5), rel=1e-9)
    both = record_epsilon({"maze": history[:2], "wordle": history}, 1e-5)
    assert both["epsilon"] == both["clients"]["wordle"] > both["clients"]["maze"]
    assert composed([], 1e-5) == 0.0 and composed([(0.0, 0.1, 3)], 1e-5) == math.inf


def test_the_plan_meets_its_target_and_settings_that_cannot_are_refused_in_one_line() -> None:
    plan = record_plan(RecordDP(enabled=True, epsilon=8.0, sample_rate=0.25), rounds=4, steps=16)
    assert epsilon(plan["noise"], 0.25, 64, 1e-5) <= 8.0 < epsilon(plan["noise"] * 0.95, 0.25, 64, 1e-5)
    for bad, why in (({"epsilon": 0.01, "sample_rate": 1.0}, "cannot be met|leaves no signal"),):
        with pytest.raises(PrivacyError, match=why) as refused:
            record_plan(RecordDP(enabled=True, **bad), rounds=20, steps=100)
        assert "\n" not in str(refused.value)
    with pytest.raises(PrivacyError, match=r"learner\.steps"):
        record_plan(RecordDP(enabled=True, noise=1.0), rounds=4, steps=None)
    for overrides, why in ((["privacy.record.enabled=true", "privacy.record.noise=1"], "learner.steps"),
                           (["privacy.record.enabled=true", "privacy.record.noise=1", "learner.steps=4",
                             "aggregation.fedprox_mu=0.1"], "fedprox_mu"),
                           (["privacy.record.enabled=true", "learner.steps=4"], "exactly one of noise")):
        with pytest.raises(ValueError, match=why):
            load_config("params.yaml", profile="smoke", overrides=overrides)


def test_dp_sgd_trains_only_the_adapter_and_reports_what_the_accountant_needs(micro_agent: Agent) -> None:
    frozen = {n: p.clone() for n, p in micro_agent.model.named_parameters() if not p.requires_grad}
    before = [p.clone() for p in lora_params(micro_agent)]
    trajs = experts("maze", 8)
    plan = {"noise": 0.5, "clip": 1.0, "sample_rate": 0.5, "steps": 6, "delta": 1e-5}
    stats = dpsgd.train(micro_agent, trajs, LearnerSpec(lr=5e-3, steps=6, batch_size=4), plan, seed=1)
    assert stats.steps == 6 and stats.privacy is not None
    assert {k: stats.privacy[k] for k in ("noise", "sample_rate", "steps", "trajectories")} == \
        {"noise": 0.5, "sample_rate": 0.5, "steps": 6, "trajectories": 8}
    assert 0 < stats.privacy["mean_batch"] <= 8 and 0 <= stats.privacy["clipped_share"] <= 1
    assert any(not torch.equal(a, b) for a, b in zip(before, lora_params(micro_agent), strict=True))
    assert all(torch.equal(p, frozen[n]) for n, p in micro_agent.model.named_parameters() if not p.requires_grad)
    assert not micro_agent.model.training and not any(hasattr(p, "grad_sample") for p in lora_params(micro_agent))


def test_a_record_dp_run_reports_epsilon_per_round_and_a_resumed_run_goes_on_counting(
        dp_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedse import federation
    from fedse.federation import Federation
    from fedse.model import load_agent

    cfg = dp_config(["privacy.record.enabled=true", "privacy.record.epsilon=8", "privacy.record.sample_rate=0.5",
                     "learner.steps=3"])
    whole = Federation(load_agent(cfg.agent_spec(), seed=0), cfg, tmp_path / "whole").run()
    plan = federation.record_dp_plan(cfg)
    spent = [r["privacy"]["record"]["epsilon"] for r in whole["rounds"]]
    assert spent == [pytest.approx(epsilon(plan["noise"], 0.5, 3 * t, 1e-5)) for t in (1, 2)]
    assert spent[0] < spent[1] <= 8.0
    assert set(whole["rounds"][1]["privacy"]["record"]["clients"]) == {"maze", "wordle"}
    reported_everywhere(whole, tmp_path / "whole")

    real, calls = dpsgd.train, []

    def dies_in_round_1(agent, data, spec, plan_, seed=0, **kw):
        calls.append(seed)
        if len(calls) == 3:  # round 1's first client
            raise KeyboardInterrupt("killed")
        return real(agent, data, spec, plan_, seed=seed, **kw)

    monkeypatch.setattr(dpsgd, "train", dies_in_round_1)
    with pytest.raises(KeyboardInterrupt):
        Federation(load_agent(cfg.agent_spec(), seed=0), cfg, tmp_path / "killed").run()
    resumed = Federation(load_agent(cfg.agent_spec(), seed=0), cfg, tmp_path / "killed", resume=True).run()
    assert [r["privacy"]["record"]["epsilon"] for r in resumed["rounds"]] == spent
    assert [r["global"]["sha256"] for r in resumed["rounds"]] == [r["global"]["sha256"] for r in whole["rounds"]]
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["rounds"] == resumed["rounds"]


def reported_everywhere(doc: dict, folder: Path) -> None:
    """The ε of each round where a user looks: the round line, MLflow's metrics, the registry's tags, and each
    organisation's egress log (counted there from its own earlier uploads)."""
    from fedse import audit
    from fedse.report import round_line
    from tasks.register import version_tags
    from tasks.track import Tracking, round_metrics

    experiment = doc["exchange"]["experiment"]
    logs = {p.stem: audit.entries(p) for p in (folder / "egress" / experiment).glob("client_*.jsonl")}
    assert len(logs) == 2
    for record in doc["rounds"]:
        spent = record["privacy"]["record"]
        assert f"record ε {spent['epsilon']:.2f} (δ 1e-05)" in round_line(record, 2)
        metrics = round_metrics(record)
        assert metrics["privacy.record.epsilon"] == spent["epsilon"]
        assert metrics["privacy.record.maze.epsilon"] == spent["clients"]["maze"]
        assert 0 < metrics["client.maze.dp_mean_batch"]
        tags = version_tags(Tracking("u", "1", "r", "e"), "fedse", record["round"], 0,
                            {"sha256": "x", "bytes": 1}, record, {}, "test")
        assert float(tags["privacy.record.epsilon"]) == pytest.approx(spent["epsilon"], rel=1e-5)
        for sender, entries in logs.items():
            (line,) = [e for e in entries if e["round"] == record["round"]]
            assert line["privacy"]["record"]["epsilon"] == pytest.approx(spent["clients"][sender.split("_", 1)[1]])
