from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from fedse.report import (
    claims_table,
    estimate,
    experience_table,
    improvement,
    improvement_table,
    label,
    load_runs,
    markdown,
    metric,
    paired,
    rank_table,
    results_table,
    round_line,
    verdict,
)

ENVS = ["maze", "wordle"]


def doc(method: str, seed: int, maze: float, wordle: float, r: int = 8, n: int = 20) -> dict:
    envs = {"maze": {"success": maze, "reward": maze, "n": n, "ci95": [0, 1]},
            "wordle": {"success": wordle, "reward": wordle, "n": n, "ci95": [0, 1]}}
    macro = (maze + wordle) / 2
    clients = {e: {"bytes_sent": 1000 * r} for e in ENVS}
    return {"method": method, "seed": seed, "profile": "quick", "lora_r": r, "envs": ENVS, "model": "tiny",
            "complete": True,
            "rounds": [{"round": 0, "envs": envs, "micro": macro, "macro": macro,
                        "macro_ci95": [macro - .1, macro + .1], "clients": clients}]}


def test_estimate_uses_t_interval_over_seeds_and_own_interval_for_one_seed() -> None:
    e = estimate([0.2, 0.4, 0.6], single_half=0.09)
    assert e.mean == pytest.approx(0.4) and e.half == pytest.approx(4.303 * 0.2 / 3 ** 0.5, rel=1e-3)
    # seeds that agree exactly keep their sampling error (binomial half-width / sqrt(n))
    assert estimate([0.3, 0.3], single_half=0.2).half == pytest.approx(0.2 / 2 ** 0.5)
    assert estimate([0.5], single_half=0.07).half == 0.07


def test_tables_group_seeds_and_check_the_papers_orderings() -> None:
    docs = [doc("fedse", s, 0.6 + s / 100, 0.5) for s in range(3)] + [doc("fedit", s, 0.2, 0.1 + s / 100)
                                                                       for s in range(3)]
    assert metric([d for d in docs if d["method"] == "fedse"], "maze").mean == pytest.approx(0.61)
    table = results_table(docs)
    assert table.index("| fedse |") < table.index("| fedit |")  # sorted by macro
    assert "| 0,1,2 |" in table
    claims = claims_table(docs)
    assert "| fedse > fedit (micro) |" in claims and "| holds |" in claims
    assert "fedse > local (micro)" in claims and "not run" in claims
    assert "(binomial)" in claims  # old runs: no per-task results, so no bootstrap


def test_rank_sweep_reports_megabytes_per_client() -> None:
    docs = [doc("fedse", 0, 0.3, 0.3, r=2), doc("fedse", 0, 0.4, 0.4, r=8)]
    table = rank_table(docs)
    assert "| 2 |" in table and "| 0.002 |" in table and "47.0 / 19.1" in table
    assert "fedse r=2" in markdown(docs)


def test_load_runs_names_the_bad_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match=r"no metrics\.json"):
        load_runs([tmp_path / "a"])
    (tmp_path / "a" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_runs([tmp_path / "a"])
    (tmp_path / "a" / "metrics.json").write_text(json.dumps({"rounds": []}))
    with pytest.raises(ValueError, match="holds no finished round"):
        load_runs([tmp_path / "a"])
    (tmp_path / "a" / "metrics.json").write_text(json.dumps(doc("fedse", 0, 0.1, 0.1) | {"complete": False}))
    with pytest.raises(ValueError, match=r"did not finish \(1 rounds recorded\)"):
        load_runs([tmp_path / "a"])


def two_rounds(method: str, seed: int, start: float, end: float, profile: str = "quick") -> dict:
    d = doc(method, seed, start, start)
    last = doc(method, seed, end, end)["rounds"][0] | {"round": 1}
    return d | {"profile": profile, "rounds": d["rounds"] + [last]}


def test_improvement_of_old_runs_pairs_seeds_and_falls_back_to_binomial() -> None:
    runs = [two_rounds("fedse", s, 0.1, 0.3 + s / 100) for s in range(3)]
    result = improvement(runs)
    assert (result.right, result.left) == pytest.approx((0.1, 0.31)) and result.diff == pytest.approx(0.21)
    assert result.seed_half == pytest.approx(4.303 * 0.01 / 3 ** 0.5, rel=1e-3) and result.kind == "binomial"
    # the binomial interval of a mean of three per-seed differences of independent proportions
    variance = sum(2 * (0.1 * 0.9 / 20 + (0.3 + s / 100) * (0.7 - s / 100) / 20) / 4 for s in range(3))
    binomial = 1.96 * variance ** 0.5 / 3
    assert result.high - result.diff == pytest.approx(binomial, rel=1e-3)
    table = improvement_table([*runs, doc("pretrained", 0, 0.1, 0.1)])
    assert "| fedse | 0.100 | 0.310 | +0.210 | ± 0.025 (n=3) | [+0.1" in table and "| holds |" in table
    assert "pretrained" not in table
    # one run: the binomial interval of two independent proportions (n=20 per env, 2 envs), no seed interval
    one = improvement([two_rounds("fedse", 0, 0.1, 0.15)])
    assert one.seed_half is None and one.seeds_cell() == "—"
    assert one.high - one.diff == pytest.approx(1.96 * ((0.09 + 0.1275) / 20 * 2) ** 0.5 / 2, rel=1e-3)
    assert one.verdict() == "within noise"


def test_mixed_profiles_are_reported_as_separate_rows() -> None:
    table = results_table([two_rounds("fedse", 0, 0.1, 0.2), two_rounds("fedse", 0, 0.1, 0.4, profile="full")])
    assert "| fedse (quick) |" in table and "| fedse (full) |" in table


def test_runs_that_sent_bf16_adapters_are_their_own_row() -> None:
    assert label(doc("fedse", 0, 0.1, 0.1)) == "fedse"
    assert label(doc("fedse", 0, 0.1, 0.1) | {"exchange": {"dtype": "fp32"}}) == "fedse"
    assert label(doc("fedse", 0, 0.1, 0.1, r=4) | {"exchange": {"dtype": "bf16"}}) == "fedse r=4 bf16"


# ------------------------------------------------------------------ runs with per-task results (current schema)


def task_doc(method: str, seed: int, rounds: list[dict[str, dict[int, float]]], aggregation: dict | None = None,
             clients: list[dict] | None = None, passes: int = 2) -> dict:
    """A finished run whose rounds are {env: {task id: mean success over its passes}}."""
    records = []
    for t, envs in enumerate(rounds):
        env_records = {}
        for env, tasks in envs.items():
            ids = sorted(tasks)
            success = [tasks[i] for i in ids]
            mean = sum(success) / len(success)
            env_records[env] = {"success": mean, "reward": mean, "n": len(ids), "ci95": [0, 1], "task_ids": ids,
                                "task_success": success, "passes": passes, "episodes": passes * len(ids)}
        macro = sum(e["success"] for e in env_records.values()) / len(env_records)
        micro = sum(sum(e["task_success"]) for e in env_records.values()) / sum(e["n"] for e in env_records.values())
        records.append({"round": t, "envs": env_records, "micro": micro, "macro": macro,
                        "macro_ci95": [macro - .1, macro + .1],
                        "clients": clients[t] if clients else {e: {"bytes_sent": 8000} for e in envs}})
    out = {"method": method, "seed": seed, "profile": "quick", "lora_r": 8, "envs": list(rounds[0]),
           "model": "tiny", "complete": True, "rounds": records}
    return out | ({"aggregation": aggregation} if aggregation is not None else {})


def play(seed: int, p: float, tasks: range, passes: int = 2) -> dict[int, float]:
    """Per task, the share of `passes` draws below p; the draws depend on (seed, task, pass) only, as with
    common random numbers, so two methods with the same seed see the same draws."""
    out = {}
    for task in tasks:
        rng = random.Random(f"{seed}-{task}")
        out[task] = sum(rng.random() < p for _ in range(passes)) / passes
    return out


def flat(seed_values: dict[str, dict[int, float]]) -> list[dict[str, dict[int, float]]]:
    return [seed_values]


def test_bootstrap_interval_covers_the_true_difference_and_excludes_zero_for_a_clearly_better_method() -> None:
    better = [task_doc("fedse", s, flat({e: play(s, 0.7, range(30)) for e in ENVS})) for s in range(3)]
    worse = [task_doc("fedit", s, flat({e: play(s, 0.3, range(30)) for e in ENVS})) for s in range(3)]
    from fedse.report import compare

    result = compare(better, worse, "macro")
    assert result.kind == "bootstrap" and result.n_tasks == 60 and result.n_seeds == 3
    assert 0 < result.low < 0.4 < result.high  # the true difference is 0.7 − 0.3
    assert result.low < result.diff < result.high
    assert result.verdict() == "holds"
    claims = claims_table(better + worse)
    assert "| fedse > fedit (micro) |" in claims and "(60 tasks) | holds |" in claims
    # the same method against itself: every paired difference is 0, and so is the interval
    same = compare(better, better, "micro")
    assert (same.diff, same.low, same.high, same.seed_half) == (0, 0, 0, 0) and same.verdict() == "within noise"


def test_seed_interval_is_the_t_interval_of_the_per_seed_differences() -> None:
    base = {e: dict.fromkeys(range(4), 0.5) for e in ENVS}
    right = [task_doc("fedit", s, flat(base)) for s in range(3)]
    left = [task_doc("fedse", s, flat({e: {t: 0.5 + d for t in range(4)} for e in ENVS}))
            for s, d in enumerate([0.1, 0.2, 0.3])]
    result = paired([(a["rounds"][-1], b["rounds"][-1]) for a, b in zip(left, right, strict=True)], "micro")
    assert result.diff == pytest.approx(0.2)
    assert result.seed_half == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-4)
    assert result.seeds_cell() == "± 0.248 (n=3)"
    # one seed: no seed interval, the verdict rests on the tasks
    one = paired([(left[0]["rounds"][-1], right[0]["rounds"][-1])], "micro")
    assert one.seed_half is None and one.seeds_cell() == "—" and one.verdict() == "holds"


def test_pairing_compares_only_the_tasks_both_runs_evaluated() -> None:
    left = task_doc("fedse", 0, flat({e: {t: 1.0 if t < 5 else 0.5 for t in range(10)} for e in ENVS}))
    right = task_doc("fedit", 0, flat({e: {t: 1.0 if t >= 10 else 0.25 for t in range(5, 15)} for e in ENVS}))
    result = paired([(left["rounds"][-1], right["rounds"][-1])], "maze")
    assert result.n_tasks == 5  # tasks 5-9
    assert (result.left, result.right, result.diff) == (0.5, 0.25, 0.25)
    assert (result.low, result.high) == (0.25, 0.25)


def test_improvement_pairs_the_first_and_last_round_on_their_shared_tasks() -> None:
    # round 0 and the last round are scored on 20 tasks, the round between on 8
    runs = [task_doc("fedse", s, [{e: play(s, 0.2, range(20)) for e in ENVS}, {e: play(s, 0.5, range(8)) for e in ENVS},
                                  {e: play(s, 0.6, range(20)) for e in ENVS}]) for s in range(2)]
    result = improvement(runs)
    assert result.kind == "bootstrap" and result.n_tasks == 40 and result.n_seeds == 2
    assert result.left == pytest.approx(sum(r["rounds"][-1]["macro"] for r in runs) / 2)
    assert result.right == pytest.approx(sum(r["rounds"][0]["macro"] for r in runs) / 2)
    table = improvement_table(runs)
    assert table.startswith("| method | round 0 macro | final macro | final − round 0 | over seeds | over tasks |")
    assert "(40 tasks)" in table


def test_old_runs_still_report_and_mix_with_new_ones() -> None:
    old = [two_rounds("fedse", s, 0.1, 0.3) for s in range(2)] + [two_rounds("fedit", s, 0.1, 0.2) for s in range(2)]
    text = markdown(old)
    assert "(binomial)" in text and "(tasks)" not in text and "Self-generated experience" not in text
    new = [task_doc("fedit", s, flat({e: play(s, 0.2, range(20)) for e in ENVS})) for s in range(2)]
    from fedse.report import compare

    mixed = compare(old[:2], new, "micro")  # per-task results on one side only: binomial, still paired per seed
    assert mixed.kind == "binomial" and mixed.n_seeds == 2
    assert "| fedse > fedit (micro) |" in markdown(old[:2] + new)


def test_no_seed_in_common_is_compared_unpaired() -> None:
    from fedse.report import compare

    a = [task_doc("fedse", 0, flat({e: play(0, 0.9, range(20)) for e in ENVS}))]
    b = [task_doc("fedit", 1, flat({e: play(1, 0.1, range(20)) for e in ENVS}))]
    result = compare(a, b, "micro")
    assert result.kind == "unpaired" and result.seeds_cell() == "— (no seed in common)"
    assert result.tasks_cell().endswith("(unpaired)")


def test_labels_separate_aggregation_variants_and_add_their_rows() -> None:
    tasks = flat({e: dict.fromkeys(range(4), 0.5) for e in ENVS})
    defaults = {"rule": "factors", "server_lr": 1.0, "momentum": 0.0, "fedprox_mu": 0.0, "rank": None}
    assert label(task_doc("fedse", 0, tasks, aggregation=defaults)) == "fedse"
    assert label(task_doc("fedse", 0, tasks, aggregation={"rule": "exact"})) == "fedse [exact]"
    assert label(task_doc("fedse", 0, tasks, aggregation=defaults | {"rule": "exact", "server_lr": 2.0})) \
        == "fedse [exact, server_lr 2]"
    assert label(task_doc("fedse", 0, tasks, aggregation={"rule": "fedsvd", "rank": 4, "momentum": 0.9})
                 | {"lora_r": 16}) == "fedse [fedsvd, momentum 0.9, rank 4] r=16"
    # exact's global rank defaults to clients × r (2 × 8 here): only another rank is a variant
    assert label(task_doc("fedse", 0, tasks, aggregation={"rule": "exact", "rank": 16})) == "fedse [exact]"
    assert label(task_doc("fedse", 0, tasks, aggregation={"rule": "exact", "rank": 8})) == "fedse [exact, rank 8]"
    # no server, nothing aggregated: the params' aggregation does not split the row
    assert label(task_doc("local_se", 0, tasks, aggregation={"rule": "exact", "server_lr": 2.0})) == "local_se"
    docs = [task_doc("fedse", 0, tasks), task_doc("fedit", 0, tasks), task_doc("local", 0, tasks),
            task_doc("local_se", 0, tasks), task_doc("fedse", 0, tasks, aggregation={"rule": "exact"})]
    assert "| fedse [exact] |" in results_table(docs) and "| fedse |" in results_table(docs)
    claims = claims_table(docs)
    for row in ["| fedse > local_se (micro) | ours: averaging adds", "| local_se > local (micro) | ours: self-evo",
                "| fedse [exact] > fedse (micro) | ours:", "| fedse [exact] > fedit (micro) | ours:"]:
        assert row in claims
    assert "not run" not in claims.split("fedse > local_se")[1]


def test_verdicts() -> None:
    assert verdict(0.1, 0.5, 0.05, 0.55) == "holds"
    assert verdict(0.1, 0.5) == "holds"  # one seed: the task interval decides
    assert verdict(0.1, 0.5, -0.05, 0.6) == "within noise"  # the tasks separate them, another run might not
    assert verdict(-0.1, 0.2, 0.01, 0.1) == "within noise"
    assert verdict(-0.3, -0.1, -0.4, -0.05) == "against"
    assert verdict(-0.3, -0.1) == "against"
    assert verdict(-0.3, -0.1, -0.4, 0.02) == "within noise"
    # equal means computed in two orders differ by float rounding; an interval ending there excludes nothing
    tie = (0.1 + 0.2) - 0.3  # 5.6e-17
    assert tie > 0
    assert verdict(tie, 0.1) == "within noise" and verdict(tie, tie, tie, tie) == "within noise"
    assert verdict(-0.1, -tie) == "within noise"


def test_single_run_interval_comes_from_its_per_task_means() -> None:
    success = {t: [1.0, 0.0, 0.5, 0.5][t % 4] for t in range(20)}
    run = task_doc("fedse", 0, flat({"maze": success, "wordle": dict.fromkeys(range(20), 0.0)}))
    values = list(success.values())
    mean = sum(values) / 20
    sd = (sum((v - mean) ** 2 for v in values) / 19) ** 0.5
    assert metric([run], "maze").half == pytest.approx(2.093 * sd / 20 ** 0.5)
    # every task alike (here all 0): the t interval would be ± 0, so the binomial one stands in
    assert metric([run], "wordle").half > 0.05


def test_self_generated_experience_per_round() -> None:
    def clients(success: float, share: float | None, ratio: float | None) -> dict:
        return {e: {"explored": 12, "explore_success": success, "self_share": share, "length_ratio": ratio,
                    "buffer": 30, "added": 6, "bytes_sent": 8000} for e in ENVS}

    tasks = {e: dict.fromkeys(range(4), 0.5) for e in ENVS}
    runs = [task_doc("fedse", s, [tasks, tasks], clients=[clients(0.2 + s / 10, 0.0, None),
                                                           clients(0.4, 0.5, 1.5 + s)]) for s in range(2)]
    static = task_doc("fedit", 0, [tasks, tasks], clients=[{e: {"explored": 0, "explore_success": None}
                                                             for e in ENVS}] * 2)
    table = experience_table([*runs, static])
    assert table.splitlines()[0] == ("| method | round | explore success | self-generated share | length / expert's "
                                     "| clients × seeds |")
    assert "| fedse | 0 | 0.250 | 0.000 | — | 4 |" in table and "|  | 1 | 0.400 | 0.500 | 2.00 | 4 |" in table
    assert "fedit" not in table
    # older runs record only the exploration success: the other columns are left out
    old = experience_table([task_doc("fedse", 0, [tasks], clients=[{e: {"explore_success": 0.5} for e in ENVS}])])
    assert old.splitlines()[0] == "| method | round | explore success | clients × seeds |"


def test_the_same_runs_give_a_byte_identical_report_whatever_their_order() -> None:
    docs = [task_doc(m, s, [{e: play(s, p, range(20)) for e in ENVS}, {e: play(s, p + .1, range(20)) for e in ENVS}])
            for m, p in [("fedse", 0.4), ("fedit", 0.3), ("local", 0.35)] for s in range(3)]
    text = markdown(docs)
    assert markdown(docs) == text and markdown(list(reversed(docs))) == text


def test_runs_scored_on_validation_ids_never_read_as_test_results() -> None:
    docs = [doc("fedse", 0, .3, .2), doc("fedit", 0, .2, .2)]
    assert "Final-round test success" in markdown(docs)
    for d in docs:
        d["settings"] = {"eval_split": "val"}
    text = markdown(docs)
    assert "Final-round validation success" in text and "test success" not in text
    docs[1]["settings"] = {"eval_split": "test"}
    assert "Final-round mixed test and validation success" in markdown(docs)


def test_best_of_k_runs_are_their_own_row() -> None:
    plain, best = doc("fedse", 0, .3, .2), doc("fedse", 0, .4, .2)
    best["settings"] = {"explore_attempts": 4}
    assert label(plain) == "fedse" and label(best) == "fedse best-of-4"
    assert "| fedse best-of-4 |" in results_table([plain, best])
    assert "fedse best-of-4 > fedse (micro)" in claims_table([plain, best, doc("fedit", 0, .2, .2)])


def test_round_line_says_where_the_round_stands_and_who_was_missing() -> None:
    record = {"round": 2, "macro": 0.2466, "macro_ci95": [0.18, 0.31], "seconds": 41.4,
              "clients": {"maze": {"added": 7, "buffer": 40}, "wordle": {"added": 5, "buffer": 32},
                          "babyai": {"failed": "TimeoutError: no upload"}},
              "aggregation": {"missing": {"babyai": "TimeoutError: no upload"},
                              "rejected": [{"client": "webshop", "reason": "norm"}]}}
    assert round_line(record, 4) == "round 2 of 4  macro 0.247 [0.18, 0.31]  buffers +12 → 72  41 s  " \
                                    "without babyai, webshop"
    # the pretrained method's single evaluation: no clients, no interval recorded in old runs
    assert round_line({"round": 0, "macro": 0.1, "seconds": 3.0}, 1) == "round 0 of 1  macro 0.100  3 s"


def test_experience_and_personal_settings_split_the_rows_and_old_runs_keep_their_labels() -> None:
    from fedse.report import VARIANT, label

    base = {"method": "fedse", "lora_r": 8, "envs": ["maze"], "settings": {"explore_attempts": 1}}
    assert label(base) == "fedse"
    levers = base | {"settings": {"explore_attempts": 4, "explore_unsolved": True, "own_cap": 1.0,
                                  "buffer": {"keep": "shortest", "prune": True}, "learner": {"steps": 32}}}
    assert label(levers) == "fedse {shortest, prune, unsolved, own_cap 1, steps 32} best-of-4"
    assert VARIANT.match(label(levers))
    personal = {"method": "fedit", "lora_r": 8, "envs": ["maze"], "aggregation": {"personal": "b"}}
    assert label(personal) == "fedit [personal b]"
