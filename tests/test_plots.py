from __future__ import annotations

from pathlib import Path

from fedse.plots import curves_csv, explore_curves, method_curves, tasks_per_round


def run(method: str, seed: int, macros: list[float], explore: list[float | None] | None = None,
        tasks: list[int] | None = None) -> dict:
    """A run with only what the figures read; `explore` adds the clients' exploration success per round."""
    rounds = []
    for t, macro in enumerate(macros):
        n = (tasks or [25] * len(macros))[t]
        envs = {e: {"success": macro, "n": n, "task_ids": list(range(n)), "task_success": [macro] * n}
                for e in ("maze", "wordle")}
        clients = {e: {"explored": 12, "explore_success": explore[t], "self_share": 0.1} for e in envs} \
            if explore else {}
        rounds.append({"round": t, "macro": macro, "envs": envs, "clients": clients})
    return {"method": method, "seed": seed, "rounds": rounds}


def test_curves_csv_holds_the_mean_macro_per_round_and_method(tmp_path: Path) -> None:
    docs = [run("fedse", 0, [0.1, 0.3]), run("fedse", 1, [0.2, 0.5]), run("pretrained", 0, [0.1])]
    rows = curves_csv(docs, tmp_path / "curves.csv").read_text().splitlines()
    assert rows[0] == "round,fedse,pretrained"
    assert rows[1] == "0,0.1500,0.1000" and rows[2] == "1,0.4000,0.1000"  # the base holds its one value


def test_curves_csv_quotes_labels_with_commas(tmp_path: Path) -> None:
    docs = [run("fedse", 0, [0.1, 0.3])]
    rows = curves_csv(docs, tmp_path / "c.csv", label=lambda d: "fedse [exact, server_lr 2]").read_text()
    assert rows.splitlines()[0] == 'round,"fedse [exact, server_lr 2]"'


def test_tasks_per_round_tells_the_rounds_scored_on_fewer_tasks(tmp_path: Path) -> None:
    docs = [run("fedse", 0, [0.2] * 3, tasks=[25, 10, 25]), run("fedse", 1, [0.2] * 3, tasks=[25, 8, 25])]
    assert tasks_per_round(docs) == {0: 25, 1: 8, 2: 25}
    assert method_curves(docs, tmp_path / "c.png").stat().st_size > 0


def test_exploring_methods_get_a_second_panel(tmp_path: Path) -> None:
    docs = [run("fedse", s, [0.2, 0.3, 0.3], explore=[0.1, None, 0.3 + s / 10]) for s in range(2)]
    docs += [run("fedit", 0, [0.2, 0.25, 0.3]), run("pretrained", 0, [0.1])]
    curves = explore_curves(docs)
    assert list(curves) == ["fedse"] and curves["fedse"][0] == [0, 2]  # no value in round 1: no point drawn
    assert curves["fedse"][1][1] == 0.35
    assert method_curves(docs, tmp_path / "c.png").stat().st_size > 0


def test_calibration_runs_are_labelled_validation_not_test(tmp_path: Path, monkeypatch) -> None:
    """A figure of runs scored on validation ids must not read as test results."""
    import fedse.plots as plots

    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.append(fig) or path)
    val = [dict(run("fedse", 0, [0.2, 0.3]), settings={"eval_split": "val"})]
    plots.method_curves(val, tmp_path / "v.png")
    plots.run_curves(dict(val[0], envs=["maze", "wordle"], profile="quick", lora_r=8) | {
        "rounds": [dict(r, macro_ci95=[0.1, 0.4]) for r in val[0]["rounds"]]}, tmp_path / "r.png")
    plots.method_curves([run("fedse", 0, [0.2, 0.3])], tmp_path / "t.png")
    labels = [(fig.axes[0].get_ylabel(), fig.axes[0].get_title()) for fig in seen]
    assert labels[0][0] == "validation success" and "macro validation success" in labels[0][1]
    assert labels[1][0] == "validation success"
    assert labels[2][0] == "test success" and "macro test success" in labels[2][1]


def test_the_main_comparison_bands_are_t_intervals_over_seeds(tmp_path: Path) -> None:
    from fedse.plots import main_comparison, seed_band
    from fedse.report import t95

    mean, low, high = seed_band([[0.2, 0.3, 0.4], [0.5, 0.5, 0.5]])
    assert abs(mean[0] - 0.3) < 1e-12 and mean[1] == 0.5
    assert abs((high[0] - low[0]) / 2 - t95(2) * 0.1 / 3 ** 0.5) < 1e-12  # t(0.975, 2)·sd/√n
    assert low[1] == high[1] == 0.5
    docs = [run("fedse", s, [0.2, 0.3 + s / 100]) for s in range(3)] + [run("pretrained", s, [0.25]) for s in range(3)]
    docs += [run("no_filter", 0, [0.2, 0.1])]
    assert main_comparison(docs, tmp_path / "m.png", ["pretrained", "fedit", "fedse"]).stat().st_size > 10_000


def test_ablations_get_a_panel_each_and_the_forest_plots_every_difference(tmp_path: Path) -> None:
    from fedse.plots import forest, small_multiples
    from fedse.report import forest_rows

    docs = [run(m, s, [0.2, v]) for m, v in (("fedse", 0.3), ("fedit", 0.35), ("no_filter", 0.1), ("local", 0.2))
            for s in range(3)]
    assert small_multiples(docs, tmp_path / "a.png", ["fedse", "fedit"]).stat().st_size > 10_000
    assert small_multiples(docs, tmp_path / "none.png", ["fedse", "fedit", "no_filter", "local"]) is None
    rows = forest_rows([d | {"envs": ["maze", "wordle"]} for d in docs])
    names = [name for name, _ in rows]
    assert "fedse: final − round 0 (macro)" in names and "fedse − fedit (micro)" in names
    assert all(r.low - 1e-12 <= r.diff <= r.high + 1e-12 for _, r in rows)
    assert forest(rows, tmp_path / "f.png").stat().st_size > 10_000 and forest([], tmp_path / "g.png") is None


def test_curve_points_scored_on_validation_tasks_are_named_on_the_axis(tmp_path: Path, monkeypatch) -> None:
    """With `curve_split: val` the rounds between the first and the last are scored on validation tasks: the
    figures must say so, and plain test runs must not."""
    import fedse.plots as plots

    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.append(fig) or path)

    def between_on_val(doc: dict) -> dict:
        last = len(doc["rounds"]) - 1
        return doc | {"settings": {"eval_split": "test"},
                      "rounds": [r | {"split": "test" if r["round"] in (0, last) else "val"} for r in doc["rounds"]]}

    docs = [between_on_val(run("fedse", s, [0.2, 0.3, 0.3, 0.4], tasks=[25, 10, 10, 25])) for s in range(2)]
    assert plots.curve_rounds(docs) == [1, 2] and plots.curve_rounds([run("fedse", 0, [0.2, 0.3, 0.4])]) == []
    plots.method_curves(docs, tmp_path / "c.png")
    plots.main_comparison(docs, tmp_path / "m.png", ["fedse"])
    plots.method_curves([run("fedse", 0, [0.2, 0.3, 0.4], tasks=[25, 10, 25])], tmp_path / "t.png")
    assert seen[0].axes[0].get_xlabel() == "round (filled: 25 test tasks per env; hollow: 10 validation tasks)"
    assert seen[1].axes[0].get_xlabel() == "round (rounds 1–2: validation tasks)"
    assert "validation" not in seen[2].axes[0].get_xlabel()
