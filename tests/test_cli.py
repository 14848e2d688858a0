"""The `fedse` command line, run in-process through typer's runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedse.cli import app

runner = CliRunner()


def run(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def test_envs_list_names_all_five() -> None:
    result = run("envs", "list")
    assert result.exit_code == 0
    for name in ("babyai", "webshop", "textcraft", "maze", "wordle"):
        assert name in result.output


def test_envs_check_json_has_the_documented_shape() -> None:
    result = run("envs", "check", "--episodes", "3", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["envs"]) == {"babyai", "webshop", "textcraft", "maze", "wordle"}
    for stats in data["envs"].values():
        assert set(stats) == {"tasks", "expert_success", "expert_ci95", "expert_turns", "random_success",
                              "random_ci95", "steps_per_sec"}
        assert stats["tasks"] == 3 and stats["expert_success"] == 1.0 and 0.0 <= stats["random_success"] <= 1.0
        for rate, (low, high) in ((stats["expert_success"], stats["expert_ci95"]),
                                  (stats["random_success"], stats["random_ci95"])):
            assert 0.0 <= low <= rate <= high <= 1.0 and high - low > 0.1  # three tasks: a wide interval
        assert stats["expert_turns"] >= 1 and stats["steps_per_sec"] > 0


@pytest.mark.parametrize("policy", ["expert", "random"])
def test_play_prints_the_episode(policy: str) -> None:
    result = run("envs", "play", "maze", "--task", "4", "--policy", policy)
    assert result.exit_code == 0, result.output
    assert "The goal is at position 8, 6" in result.output and "> move" in result.output
    assert ("success after" in result.output) or ("failure after" in result.output)
    if policy == "expert":
        assert "success after" in result.output


def test_human_play_reads_actions_from_the_terminal() -> None:
    result = run("envs", "play", "wordle", "--task", "0", input="xqzvw\ns h a k e\n")
    assert result.exit_code == 0
    assert "Could not read" in result.output or "invalid word" in result.output
    assert "(input closed" in result.output or "after" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (("envs", "play", "chess"), "unknown environment 'chess'"),
    (("envs", "play", "maze", "--policy", "smart"), "unknown policy 'smart'"),
    (("envs", "play", "maze", "--task", "-5"), "outside the test ids"),
    (("--params", "/nonexistent/params.yaml", "envs", "check"), "params file not found"),
])
def test_user_errors_are_one_line_and_exit_2(args: tuple[str, ...], message: str) -> None:
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_seed_writes_jsonl_per_env(tmp_path: Path) -> None:
    result = run("seed", "--out", str(tmp_path), "--seed", "2", "--env", "maze", "--env", "wordle", "--count", "5")
    assert result.exit_code == 0, result.output
    for name in ("maze", "wordle"):
        assert len((tmp_path / "s2" / f"{name}.jsonl").read_text().splitlines()) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s2"] and not (tmp_path / "s2" / "babyai.jsonl").exists()


def test_train_then_eval_through_the_cli(micro_params: Path, tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    assert run("seed", "--out", str(seeds), "--env", "maze", "--count", "4").exit_code == 0
    adapter = tmp_path / "adapter"
    result = run("--params", str(micro_params), "train", "--env", "maze", "--data", str(seeds / "s0" / "maze.jsonl"),
                 "--out", str(adapter))
    assert result.exit_code == 0, result.output
    assert "steps" in result.stdout and (adapter / "adapter_model.safetensors").exists()
    result = run("--params", str(micro_params), "eval", "--adapter", str(adapter), "--env", "maze",
                 "--episodes", "2", "--passes", "2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["envs"]["maze"]["n"] == 2 and 0.0 <= data["micro"] <= 1.0 and "macro_ci95" in data
    maze = data["envs"]["maze"]
    assert maze["passes"] == 2 and maze["episodes"] == 4 and len(maze["task_success"]) == len(maze["task_ids"]) == 2
    assert data["eval_decisions"] >= 4 and data["eval_seconds"] > 0


@pytest.mark.parametrize(("extra", "message"), [
    (("eval", "--adapter", "/nonexistent/adapter", "--env", "maze", "--episodes", "1"),
     "adapter_model.safetensors not found"),
    (("train", "--env", "maze", "--data", "/nonexistent.jsonl", "--out", "/tmp/x"), "trajectory file not found"),
    (("eval", "--env", "chess"), "unknown environment 'chess'"),
])
def test_model_command_errors_are_one_line(micro_params: Path, extra: tuple[str, ...], message: str) -> None:
    result = run("--params", str(micro_params), *extra)
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_model_preset_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("model: {preset: gpt5}\n")
    result = run("--params", str(path), "eval", "--env", "maze", "--episodes", "1")
    assert result.exit_code == 2 and "unknown model preset 'gpt5'" in result.stderr


def test_run_then_report_through_the_cli(micro_params: Path, tmp_path: Path) -> None:
    """`fedse run` (smoke profile, two envs) writes metrics and a plot; `fedse report` tables two methods."""
    seeds = tmp_path / "seeds"
    written = run("seed", "--out", str(seeds), "--seed", "3", "--env", "maze", "--env", "wordle", "--count", "8")
    assert written.exit_code == 0, written.output
    common = ["--profile", "smoke", "--set", "federation.clients=[maze, wordle]", "--set", f"seed_data.dir={seeds}",
              "--set", "federation.eval_episodes=2", "--set", "federation.explore_episodes=2"]
    for method in ("fedse", "fedit"):
        result = run("--params", str(micro_params), "run", "--method", method, "--seed", "3",
                     "--out", str(tmp_path / method), *common)
        assert result.exit_code == 0, result.output
        doc = json.loads((tmp_path / method / "metrics.json").read_text())
        assert doc["method"] == method and doc["seed"] == 3 and doc["profile"] == "smoke" and doc["complete"]
        assert (tmp_path / method / "curves.png").stat().st_size > 10_000
        assert "macro" in result.stdout and "metrics.json" in result.stdout
    result = run("report", str(tmp_path / "fedse"), str(tmp_path / "fedit"), "--out", str(tmp_path / "report"))
    assert result.exit_code == 0, result.output
    table = (tmp_path / "report" / "results.md").read_text()
    assert "| fedse |" in table and "| fedit |" in table and "fedse > fedit (micro)" in table
    assert "fedse > local (micro) | 73.2 vs 65.7: federation beats training alone | not run" in table
    assert (tmp_path / "report" / "curves.png").stat().st_size > 10_000
    assert "## Improvement over the round-0 adapter" in table
    # the copied metrics rebuild the same report from the report folder alone
    copies = sorted((tmp_path / "report" / "runs").glob("*.json"))
    assert [c.name for c in copies] == ["fedit.json", "fedse.json"]
    again = run("report", *map(str, copies), "--out", str(tmp_path / "report"))
    assert again.exit_code == 0, again.output
    assert (tmp_path / "report" / "results.md").read_text() == table


@pytest.mark.parametrize(("args", "message"), [
    (("run", "--method", "fedavg"), "unknown method 'fedavg'"),
    (("run", "--profile", "huge"), "profile 'huge' is not defined"),
    (("run", "--set", "federation.rounds=0"), "federation.rounds: Input should be greater than or equal to 1"),
    (("run", "--set", "nonsense"), "expected key.path=value"),
    (("report", "/nonexistent"), "/nonexistent: no metrics.json"),
])
def test_run_and_report_errors_are_one_line(args: tuple[str, ...], message: str) -> None:
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_base_build_writes_a_verified_base_and_info_finds_it(micro_params: Path, tmp_path: Path) -> None:
    import yaml

    params = yaml.safe_load(micro_params.read_text())
    params["model"]["models_dir"] = str(tmp_path / "models")
    params["model"]["tiny"]["seed"] = 7  # a spec nobody built yet: `base info` must say so, then `build` makes it
    micro_params.write_text(yaml.safe_dump(params))
    before = run("--params", str(micro_params), "base", "info", "--json")
    assert before.exit_code == 0, before.output
    assert json.loads(before.stdout)["path"] is None
    built = run("--params", str(micro_params), "base", "build", "--workers", "1")
    assert built.exit_code == 0, built.output
    info = json.loads(run("--params", str(micro_params), "base", "info", "--json").stdout)
    assert info["path"].startswith(str(tmp_path / "models" / "tiny-")) and info["key"] in info["path"]
    assert len(info["weights_sha256"]) == 64 and info["tokens_seen"] > 0
    again = run("--params", str(micro_params), "base", "build")
    assert again.exit_code == 0 and "already holds this spec's base (verified)" in again.output
    (Path(info["path"]) / "model.safetensors").write_bytes(b"not weights")
    broken = run("--params", str(micro_params), "base", "info")
    assert broken.exit_code == 2 and "does not match" in broken.output


def _command_paths(cmd, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and group of the app, as the words that name it (the app itself is ())."""
    paths = [prefix]
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        paths += _command_paths(sub, (*prefix, name))
    return paths


def test_every_command_help_shows_an_example() -> None:
    import typer

    paths = _command_paths(typer.main.get_command(app))
    assert ("run",) in paths and ("envs", "play") in paths and ("base", "info") in paths
    for path in paths:
        result = run(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        assert "Example: fedse" in result.output, f"fedse {' '.join(path)} --help shows no example"


def test_option_help_keeps_its_bracketed_defaults() -> None:
    """Help texts are plain text: `[params: …]` is what the option falls back to, not Rich markup to drop."""
    result = CliRunner().invoke(app, ["run", "--help"])
    assert result.exit_code == 0 and "[params: federation.method]" in " ".join(result.output.split())
