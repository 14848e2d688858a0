"""The results table: final test success per method and environment over seeds, against the paper's claims.

Intervals: with several seeds, mean ± t·sd/√n over seeds (the seed-to-seed spread, which is what a reader
re-running us would see), but never narrower than the runs' own binomial half-width / √n; with one seed,
that run's own binomial interval (Wilson per environment, normal for the averages). The paper reports
single runs, so its claims are orderings; each is checked here on our environments and marked as holding
(difference's interval above 0), same direction but within noise, or not holding.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedse.evaluate import Z95, wilson

# two-sided 95% Student t quantiles, by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}

# (left, right, metric, what the paper reports left vs right (micro %, or Maze % for the history claim))
PAPER_CLAIMS: list[tuple[str, str, str, str]] = [
    ("fedse", "fedit", "micro", "73.2 vs 62.7 (Qwen2.5-7B): self-evolution beats static FedAvg + LoRA"),
    ("fedse", "local", "micro", "73.2 vs 65.7: federation beats training alone"),
    ("fedse", "centralized", "micro", "73.2 vs 66.6: beats pooling the seed data"),
    ("fedse", "pretrained", "micro", "73.2 vs 18.6: training helps at all"),
    ("fedse", "no_filter", "micro", "66.1 vs 40.5 (Llama2-7B): keeping failures collapses"),
    ("fedse", "no_history", "maze", "Maze 80 vs 40: the cumulative buffer matters on Maze"),
    ("fedse", "weighted", "micro", "66.1 vs 59.8: the unweighted mean beats success weighting"),
]
PAPER_RANKS = {2: (47.0, 19.1), 4: (51.8, 38.1), 8: (57.5, 76.3), 16: (59.1, 152.5)}  # r: (micro %, MB/round)


@dataclass(frozen=True)
class Estimate:
    mean: float
    half: float  # half-width of the 95% interval
    n: int       # seeds

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.half:.3f}"


def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """metrics.json of each run folder (or file); an unfinished or unreadable run is one clear error."""
    docs = []
    for path in paths:
        file = Path(path) / "metrics.json" if Path(path).is_dir() else Path(path)
        if not file.exists():
            raise ValueError(f"{path}: no metrics.json (is it a `fedse run --out` folder?)")
        try:
            doc = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{file}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not doc.get("rounds"):
            raise ValueError(f"{file}: holds no finished round")
        if not doc.get("complete", False):
            raise ValueError(f"{file}: the run did not finish ({len(doc['rounds'])} rounds recorded); finish or "
                             "delete it")
        docs.append(doc)
    return docs


def label(doc: dict[str, Any]) -> str:
    """Method name, plus the LoRA rank when it is not the paper's default of 8 and the transfer dtype when the
    adapters did not travel in fp32 (each is a different experiment, never pooled with the default)."""
    r = doc.get("lora_r", 8)
    dtype = (doc.get("exchange") or {}).get("dtype", "fp32")
    return doc["method"] + (f" r={r}" if r != 8 else "") + (f" {dtype}" if dtype != "fp32" else "")


def labeller(docs: list[dict[str, Any]]) -> Any:
    """`label`, plus the profile when the runs mix profiles (quick and full runs are different experiments)."""
    if len({d.get("profile") for d in docs}) < 2:
        return label
    return lambda d: f"{label(d)} ({d.get('profile')})"


def final(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["rounds"][-1]


def estimate(values: list[float], single_half: float) -> Estimate:
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, single_half, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    # never narrower than the runs' own sampling error averaged over n seeds: two seeds that happen to agree
    # do not make a 25-task success rate exact
    return Estimate(mean, max(T95.get(n - 1, Z95) * sd / math.sqrt(n), single_half / math.sqrt(n)), n)


def metric(docs: list[dict[str, Any]], key: str) -> Estimate:
    """Final-round `key` (an env name, micro or macro) over the seeds of one method."""
    values, halves = [], []
    for doc in docs:
        last = final(doc)
        if key in last["envs"]:
            env = last["envs"][key]
            low, high = wilson(round(env["success"] * env["n"]), env["n"])
            values.append(env["success"])
            halves.append((high - low) / 2)
        elif key == "macro":
            values.append(last["macro"])
            halves.append((last["macro_ci95"][1] - last["macro_ci95"][0]) / 2)
        else:
            n = sum(e["n"] for e in last["envs"].values())
            values.append(last["micro"])
            halves.append(Z95 * math.sqrt(max(last["micro"] * (1 - last["micro"]), 1e-12) / max(n, 1)))
    return estimate(values, sum(halves) / len(halves))


def group(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    name = labeller(docs)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for doc in docs:
        groups[name(doc)].append(doc)
    return dict(groups)


def results_table(docs: list[dict[str, Any]]) -> str:
    """Markdown: one row per method, final test success per env, micro and macro, as mean ± 95% CI."""
    groups = group(docs)
    envs = docs[0]["envs"]
    head = ["method", *envs, "micro", "macro", "seeds", "rounds"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in sorted(groups.items(), key=lambda kv: (-metric(kv[1], "macro").mean, kv[0])):
        cells = [str(metric(runs, k)) for k in [*envs, "micro", "macro"]]
        seeds = ",".join(str(d["seed"]) for d in sorted(runs, key=lambda d: d["seed"]))
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {seeds} | {len(runs[0]['rounds'])} |")
    return "\n".join(rows)


def claims_table(docs: list[dict[str, Any]]) -> str:
    """Each of the paper's orderings, measured: difference, its interval, and a verdict."""
    groups = group(docs)
    rows = ["| claim | paper | ours (left vs right) | difference | verdict |", "|---|---|---|---|---|"]
    for left, right, key, paper in PAPER_CLAIMS:
        if left not in groups or right not in groups:
            rows.append(f"| {left} > {right} ({key}) | {paper} | not run | | |")
            continue
        a, b = metric(groups[left], key), metric(groups[right], key)
        diff, half = a.mean - b.mean, math.hypot(a.half, b.half)
        rows.append(f"| {left} > {right} ({key}) | {paper} | {a.mean:.3f} vs {b.mean:.3f} | {diff:+.3f} ± {half:.3f} "
                    f"| {verdict(diff, half)} |")
    return "\n".join(rows)


def improvement(runs: list[dict[str, Any]]) -> tuple[float, float, float, float]:
    """Macro success after the first round and after the last, and their paired difference ± 95% CI.

    Both are measured on the same `final_eval_episodes` tasks. Over several seeds the interval is the t
    interval of the per-seed differences; for one run it is the normal interval of a difference of two
    independent binomial proportions per environment, averaged over environments.
    """
    firsts = [d["rounds"][0]["macro"] for d in runs]
    lasts = [final(d)["macro"] for d in runs]
    diffs = [b - a for a, b in zip(firsts, lasts, strict=True)]
    first, last = runs[0]["rounds"][0], final(runs[0])
    var = sum(_binvar(first["envs"][e]) + _binvar(last["envs"][e]) for e in first["envs"]) / len(first["envs"]) ** 2
    est = estimate(diffs, Z95 * math.sqrt(var))
    return sum(firsts) / len(firsts), sum(lasts) / len(lasts), est.mean, est.half


def _binvar(env: dict[str, Any]) -> float:
    return env["success"] * (1 - env["success"]) / max(env["n"], 1)


def improvement_table(docs: list[dict[str, Any]]) -> str:
    """Does each trained method's global adapter improve on its own round-0 adapter (macro, same tasks)?"""
    rows = ["| method | round 0 macro | final macro | final − round 0 | verdict |", "|---|---|---|---|---|"]
    for name, runs in sorted(group(docs).items()):
        if len(runs[0]["rounds"]) < 2:
            continue
        first, last, diff, half = improvement(runs)
        rows.append(f"| {name} | {first:.3f} | {last:.3f} | {diff:+.3f} ± {half:.3f} | {verdict(diff, half)} |")
    return "\n".join(rows) if len(rows) > 2 else ""


TIE = 1e-9  # success rates are ratios of small counts: below this a difference is float rounding, not a sign


def verdict(diff: float, half: float) -> str:
    """A tie (0.169 vs 0.169 as 1e-17) is no direction; the table prints it as +0.000."""
    if diff - half > TIE:
        return "holds"
    if diff > TIE:
        return "same direction, within noise"
    return "does not hold"


def rank_table(docs: list[dict[str, Any]]) -> str:
    """The LoRA rank sweep of Fed-SE: success and adapter megabytes each client sends per round."""
    by_rank: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for doc in docs:
        if doc["method"] == "fedse":
            by_rank[doc.get("lora_r", 8)].append(doc)
    if len(by_rank) < 2:
        return ""
    rows = ["| LoRA r | micro | macro | MB per client per round | paper micro % / MB (Llama2-7B) |",
            "|---|---|---|---|---|"]
    for r, runs in sorted(by_rank.items()):
        sent = [c["bytes_sent"] for c in final(runs[0])["clients"].values()]
        mb = sum(sent) / len(sent) / 1e6
        paper = PAPER_RANKS.get(r)
        rows.append(f"| {r} | {metric(runs, 'micro')} | {metric(runs, 'macro')} | {mb:.3f} | "
                    f"{f'{paper[0]} / {paper[1]}' if paper else '-'} |")
    return "\n".join(rows)


def markdown(docs: list[dict[str, Any]], plot: Path | None = None) -> str:
    profiles = sorted({str(d.get("profile")) for d in docs})
    parts = [f"# fedse results (profile {', '.join(profiles)}; model {docs[0].get('model')})", "",
             "Final-round test success, mean ± 95% CI over seeds (one seed: that run's binomial interval).", "",
             results_table(docs), "", "## The paper's orderings on our environments", "", claims_table(docs)]
    progress = improvement_table(docs)
    if progress:
        parts += ["", "## Improvement over the round-0 adapter", "",
                  "Macro test success on the same tasks after round 0 and after the last round; the interval is "
                  "over seeds (paired), or the binomial one for a single run.", "", progress]
    ranks = rank_table(docs)
    if ranks:
        parts += ["", "## LoRA rank sweep (Fed-SE)", "", ranks]
    if plot is not None:
        parts += ["", f"![learning curves]({plot.name})"]
    return "\n".join(parts) + "\n"
