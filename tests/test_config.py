from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedse.config import PAPER_SEED_COUNTS, Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_file_is_valid_and_matches_the_defaults() -> None:
    """The file's base values are the code's defaults; only its profile choice and profiles are extra."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    base = Config.model_validate(raw)
    assert base == Config().model_copy(update={"profile": raw["profile"], "profiles": raw["profiles"]})
    assert Config().seed_data.counts == PAPER_SEED_COUNTS
    for name in ("smoke", "quick", "full", "paper"):
        assert load_config(ROOT / "params.yaml", profile=name).profile == name


def test_profiles_merge_over_the_file_and_set_overrides_win() -> None:
    quick = load_config(ROOT / "params.yaml", profile="quick")
    assert quick.federation.rounds == 4 and quick.learner.lr == 0.003 and quick.model.lora.r == 8
    assert quick.client_envs() == ["textcraft", "maze", "wordle"] and len(quick.envs.names) == 5
    assert load_config(ROOT / "params.yaml", profile="full").client_envs() == quick.envs.names
    assert quick.learner.max_grad_norm == Config().learner.max_grad_norm  # untouched keys keep the base value
    paper = load_config(ROOT / "params.yaml", profile="paper",
                        overrides=["model.lora.r=16", "federation.rounds=5", "envs.names=[maze]"])
    assert paper.model.preset == "Qwen/Qwen2.5-7B-Instruct" and paper.policy.mode == "react"
    assert paper.model.lora.r == 16 and paper.federation.rounds == 5 and paper.envs.names == ["maze"]


def test_missing_default_file_means_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config() == Config()


@pytest.mark.parametrize(("text", "message"), [
    ("seed: [1\n", "not valid YAML"),
    ("- 1\n", "expected a mapping"),
    ("sede: 1\n", "sede: Extra inputs are not permitted"),
    ("check: {episodes: 0}\n", "check.episodes: Input should be greater than or equal to 1"),
    ("envs: {names: [maze, chess]}\n", "unknown environment"),
    ("seed_data: {counts: {maze: -3}}\n", "seed counts must be"),
    ("federation: {clients: [maze, chess]}\n", r"federation.clients: chess not in envs.names"),
])
def test_bad_params_give_one_line_naming_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_named_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
