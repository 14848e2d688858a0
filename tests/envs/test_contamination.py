"""The contamination audit: clean on the committed state, and it catches an overlap planted in each source."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from fedse import corpus
from fedse.cli import app
from fedse.config import load_config
from fedse.envs import wordle
from fedse.envs.contamination import SOURCES, audit, seed_draws
from fedse.envs.registry import env_class
from fedse.seed import expert_trajectories, seed_file
from fedse.trajectory import write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def audited(tmp_path: Path, profile: str = "quick", seeds: tuple[int, ...] = (0,)) -> dict:
    cfg = load_config(ROOT / "params.yaml", profile=profile)
    return {r.env: r for r in audit(cfg, list(seeds), tmp_path)}


def test_the_committed_splits_seeds_exploration_and_corpus_recipe_are_clean(tmp_path: Path) -> None:
    """The quick profile here; `make audit` (in make test) runs every shipped profile."""
    profile = "quick"
    reports = audited(tmp_path, profile, seeds=(0, 1, 2, 3, 4))
    assert set(reports) == {"babyai", "webshop", "textcraft", "maze", "wordle"}
    for env, r in reports.items():
        assert r.clean, r.as_dict()
        assert r.test_keys == len(env_class(env).test_ids) or env == "wordle", "test keys are distinct tasks"
        assert r.sources["seed draws"][0] > 0 and r.sources["pretraining"][0] == 2000
    explored = {env for env, r in reports.items() if r.sources["exploration"][0]}
    assert explored == set(load_config(ROOT / "params.yaml", profile=profile).client_envs())


def test_seed_draws_cover_every_id_a_seed_file_holds() -> None:
    records, _ = expert_trajectories("maze", 40, seed=3)
    assert {t.task_id for t in records} <= set(seed_draws("maze", 40, 3))


def test_a_seed_file_holding_a_test_task_is_caught(tmp_path: Path) -> None:
    records, _ = expert_trajectories("maze", 4, seed=0)
    test_task = records[0].model_copy(update={"task_id": env_class("maze").test_ids[3]})
    path = seed_file(tmp_path, 2, "maze")
    path.parent.mkdir(parents=True)
    write_jsonl(path, [*records[1:], test_task])
    report = audited(tmp_path)["maze"]
    assert not report.clean and len(report.sources["seed files"][1]) == 1
    assert all(not t and not v for name, (_, t, v) in report.sources.items() if name != "seed files")


def test_a_pretraining_corpus_that_plays_a_validation_task_is_caught(tmp_path: Path, monkeypatch) -> None:
    real = corpus.task_ids
    val = env_class("textcraft").validation_ids()[7]
    monkeypatch.setattr(corpus, "task_ids", lambda spec, env: [*real(spec, env), val] if env == "textcraft"
                        else real(spec, env))
    report = audited(tmp_path)["textcraft"]
    assert report.sources["pretraining"][1:] == ([], [env_class("textcraft")().content_key(val)])


def test_the_same_content_under_another_id_is_caught(tmp_path: Path, monkeypatch) -> None:
    """Ids stay disjoint; only the content repeats: the training secrets replaced by one test secret."""
    split = dict(wordle.secrets("common"))
    split["train"] = (split["test"][0],)
    monkeypatch.setattr(wordle, "secrets", lambda words: split)
    report = audited(tmp_path)["wordle"]
    assert not report.clean
    assert report.sources["seed draws"][1] == [f"common:fixed:{split['test'][0]}"]
    assert report.sources["exploration"][1] == [f"common:fixed:{split['test'][0]}"]
    assert report.sources["pretraining"][1:] == ([], [])


def test_the_cli_prints_one_table_and_exits_1_naming_the_source(tmp_path: Path, monkeypatch) -> None:
    clean = CliRunner().invoke(app, ["envs", "audit", "--seeds", "0", "--seed-dir", str(tmp_path)])
    assert clean.exit_code == 0, clean.output
    assert all(s.split()[0] in clean.stdout for s in SOURCES) and "overlap" not in clean.output
    split = dict(wordle.secrets("common"))
    split["pretrain"] = (split["val"][0], *split["pretrain"][1:])
    monkeypatch.setattr(wordle, "secrets", lambda words: split)
    dirty = CliRunner().invoke(app, ["envs", "audit", "--seeds", "0", "--seed-dir", str(tmp_path)])
    assert dirty.exit_code == 1
    lines = [line for line in dirty.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("overlap: wordle (profile quick): held-out content in pretraining")


def test_a_bad_seed_list_is_one_clear_error() -> None:
    result = CliRunner().invoke(app, ["envs", "audit", "--seeds", "zero"])
    assert result.exit_code == 2 and "--seeds 'zero'" in result.stderr
