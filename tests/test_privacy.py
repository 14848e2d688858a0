"""Client-level DP (fedse/privacy.py): the accountant against Opacus's own, calibration and its refusal, the
clipping bound and the noise's standard deviation measured, and the accounting carried across a resumed run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedse.config import load_config
from fedse.privacy import (
    ClientDP,
    PrivacyError,
    calibrate,
    client_epsilon,
    client_plan,
    dp_fedavg,
    epsilon,
    noise_generator,
    update_norm,
)


@pytest.mark.parametrize(("noise", "rate", "steps"), [(1.0, 1.0, 10), (0.8, 0.6, 20), (2.0, 0.01, 1000)])
def test_the_accountant_is_opacus_own_step_by_step(noise: float, rate: float, steps: int) -> None:
    from opacus.accountants import RDPAccountant

    stepped = RDPAccountant()
    for _ in range(steps):
        stepped.step(noise_multiplier=noise, sample_rate=rate)
    assert epsilon(noise, rate, steps, 1e-5) == pytest.approx(stepped.get_epsilon(delta=1e-5), rel=1e-9)
    assert epsilon(noise, rate, 0, 1e-5) == 0.0 and epsilon(0.0, rate, steps, 1e-5) == math.inf


@pytest.mark.parametrize("target", [8.0, 1.0])
def test_calibration_reaches_the_target_and_an_unreachable_one_is_one_line(target: float) -> None:
    z = calibrate(target, 1e-5, 1.0, 4, "privacy.client")
    assert epsilon(z, 1.0, 4, 1e-5) <= target and epsilon(z * 0.98, 1.0, 4, 1e-5) > target * 0.98
    with pytest.raises(PrivacyError) as refused:
        calibrate(0.01, 1e-5, 1.0, 200, "privacy.client")
    assert "privacy.client: ε = 0.01" in str(refused.value) and "\n" not in str(refused.value)


def states(n: int, scale: float, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(16, 8, generator=g) * scale, "b": torch.randn(8, 16, generator=g) * scale}
            for _ in range(n)]


def test_each_clients_contribution_is_clipped_to_the_bound() -> None:
    current = {"a": torch.zeros(16, 8), "b": torch.zeros(8, 16)}
    huge, small = states(2, 100.0)[0], states(2, 0.001, seed=1)[0]
    plan = {"clip": 0.5, "noise": 0.0, "expected": 2, "delta": 1e-5, "sample_rate": 1.0}
    new, info = dp_fedavg([("x", huge, 1.0), ("y", small, 1.0)], current, plan, 1.0, noise_generator(0, 0))
    assert info["clipped"] == 1 and info["update_norms"]["x"] > 100
    alone, _ = dp_fedavg([("x", huge, 1.0)], current, plan, 1.0, noise_generator(0, 0))
    assert update_norm(alone, current) * 2 == pytest.approx(0.5, rel=1e-5)  # its share of the sum: at most S
    both = {k: huge[k] * min(1, 0.5 / update_norm(huge, current)) + small[k] for k in current}
    assert all(torch.allclose(new[k], both[k] / 2, atol=1e-6) for k in current)  # the small one passes as is


def test_the_noise_standard_deviation_is_the_configured_one() -> None:
    current = {"w": torch.zeros(400, 500, dtype=torch.float64)}
    plan = {"clip": 2.0, "noise": 1.5, "expected": 4, "delta": 1e-5, "sample_rate": 1.0}
    new, _ = dp_fedavg([], current, plan, 1.5, noise_generator(3, 1))
    expected = 1.5 * 1.5 * 2.0 / 4  # η · z · S / m
    assert float(new["w"].std()) == pytest.approx(expected, rel=0.01) and abs(float(new["w"].mean())) < 0.01
    again, _ = dp_fedavg([], current, plan, 1.5, noise_generator(3, 1))
    assert torch.equal(again["w"], new["w"])  # a resumed round draws the same noise


def test_the_plan_is_fixed_before_round_zero_and_settings_that_cannot_work_are_refused() -> None:
    plan = client_plan(ClientDP(enabled=True, epsilon=8.0), rounds=4, clients=5, per_round=3)
    assert plan["sample_rate"] == pytest.approx(0.6) and plan["expected"] == 3
    assert client_epsilon(plan, 4)["epsilon"] <= 8.0 < client_epsilon(plan, 40)["epsilon"]
    with pytest.raises(ValueError, match="exactly one of noise"):
        ClientDP(enabled=True)
    for bad in (["privacy.client.enabled=true", "privacy.client.noise=1", "federation.method=weighted"],
                ["privacy.client.enabled=true", "privacy.client.noise=1", "aggregation.rule=exact"],
                ["privacy.client.enabled=true", "privacy.client.noise=1", "federation.method=local"]):
        with pytest.raises(ValueError, match=r"privacy\.client"):
            load_config("params.yaml", profile="smoke", overrides=bad)


def test_a_dp_run_reports_epsilon_per_round_and_a_resumed_run_goes_on_counting(
        dp_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedse import federation
    from fedse.federation import Federation
    from fedse.model import load_agent

    cfg = dp_config(["privacy.client.enabled=true", "privacy.client.epsilon=8", "privacy.client.clip=0.05"])
    whole = Federation(load_agent(cfg.agent_spec(), seed=0), cfg, tmp_path / "whole").run()
    spent = [r["privacy"]["client"]["epsilon"] for r in whole["rounds"]]
    plan = federation.client_dp_plan(cfg)
    assert spent == [pytest.approx(epsilon(plan["noise"], 1.0, t, 1e-5)) for t in (1, 2)]
    assert spent[1] <= 8.0 and spent[0] < spent[1]

    real, calls = federation.private_step, []

    def dies_in_round_1(cfg_, kept, state, round):
        calls.append(round)
        if round == 1 and calls.count(1) == 1:
            raise KeyboardInterrupt("killed")
        return real(cfg_, kept, state, round)

    monkeypatch.setattr(federation, "private_step", dies_in_round_1)
    with pytest.raises(KeyboardInterrupt):
        Federation(load_agent(cfg.agent_spec(), seed=0), cfg, tmp_path / "killed").run()
    resumed = Federation(load_agent(cfg.agent_spec(), seed=0), cfg, tmp_path / "killed", resume=True).run()
    assert [r["privacy"]["client"]["epsilon"] for r in resumed["rounds"]] == spent
    assert [r["global"]["sha256"] for r in resumed["rounds"]] == [r["global"]["sha256"] for r in whole["rounds"]]
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["rounds"] == resumed["rounds"]
