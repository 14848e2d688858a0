from __future__ import annotations

from pathlib import Path

import pytest

from fedse.config import PAPER_SEED_COUNTS, Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_file_is_valid_and_matches_the_defaults() -> None:
    assert load_config(ROOT / "params.yaml") == Config()
    assert Config().seed_data.counts == PAPER_SEED_COUNTS


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
