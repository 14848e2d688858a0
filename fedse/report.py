"""The results table: final test success per method and environment over seeds, against the paper's claims.

Results table intervals: with several seeds, mean ± t·sd/√n over seeds (the seed-to-seed spread, which is
what a reader re-running us would see), but never narrower than the runs' own sampling half-width / √n; with
one seed, that run's own interval (from its per-task success when the run records it: t over tasks per
environment, normal for the averages; Wilson per environment in older runs).

Comparisons (the paper's orderings, our diagnostics, each method against its round 0) are paired, because
evaluation uses common random numbers: runs with the same seed, and two rounds of one run, play the same
(task, pass) draws. Each comparison is measured on the tasks both sides evaluated and given two intervals:
over seeds (the per-seed differences' t interval: would another training run agree?) and over tasks (a
percentile bootstrap of the per-task differences: are these tasks enough to tell?). Runs without per-task
results (older metrics.json) fall back to a binomial interval of two independent proportions.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedse.evaluate import Z95, wilson
from fedse.methods import METHODS

Doc = dict[str, Any]

# two-sided 95% Student t quantiles, by degrees of freedom (tasks per env reach 30; seeds stay below 10)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
       20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
       29: 2.045, 30: 2.042}

BOOTSTRAP = 10_000     # resamples of the tasks (reports/protocol.md)
BOOTSTRAP_SEED = 2512  # one fixed RNG seed per comparison: the same runs always give the same interval

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
# ours, not the paper's: they separate "self-evolution does not work at this scale" from "averaging undoes it"
DIAGNOSTICS: list[tuple[str, str, str, str]] = [
    ("fedse", "local_se", "micro", "ours: averaging adds to self-evolution alone"),
    ("local_se", "local", "micro", "ours: self-evolution helps one client alone"),
]
PAPER_RANKS = {2: (47.0, 19.1), 4: (51.8, 38.1), 8: (57.5, 76.3), 16: (59.1, 152.5)}  # r: (micro %, MB/round)

# what a run without an "aggregation" record used: the server averaged the LoRA factors, plain FedAvg
AGGREGATION_DEFAULTS: dict[str, Any] = {"rule": "factors", "server_lr": 1.0, "momentum": 0.0, "fedprox_mu": 0.0,
                                        "rank": None, "max_norm_ratio": 10.0, "trim": 0.2, "personal": "none"}
VARIANT = re.compile(r"^fedse( \[.*\])?( \{.*\})?( best-of-\d+)?$")  # a variant of Fed-SE: server, experience
EXPLORE_KEYS = [("explore_success", "explore success", ".3f"), ("self_share", "self-generated share", ".3f"),
                ("length_ratio", "length / expert's", ".2f")]


@dataclass(frozen=True)
class Estimate:
    mean: float
    half: float  # half-width of the 95% interval
    n: int       # seeds

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.half:.3f}"


@dataclass(frozen=True)
class Paired:
    """left − right, paired per seed and per task, with its two 95% intervals."""

    left: float              # left side's mean over the compared seeds, on the compared tasks
    right: float
    diff: float              # mean over seeds of the per-seed differences
    n_seeds: int
    seed_half: float | None  # t half-width over seeds; None with one seed (or no seed in common)
    low: float               # the interval over tasks (bootstrap), or its fallback (binomial, unpaired)
    high: float
    kind: str                # "bootstrap", "binomial" (no per-task results) or "unpaired" (no seed in common)
    n_tasks: int             # tasks compared (0 without per-task results)

    def seeds_cell(self) -> str:
        if self.kind == "unpaired":
            return "— (no seed in common)"
        return "—" if self.seed_half is None else f"± {self.seed_half:.3f} (n={self.n_seeds})"

    def tasks_cell(self) -> str:
        what = {"bootstrap": f"{self.n_tasks} tasks", "binomial": "binomial", "unpaired": "unpaired"}[self.kind]
        return f"[{self.low:+.3f}, {self.high:+.3f}] ({what})"

    def verdict(self) -> str:
        if self.seed_half is None:
            return verdict(self.low, self.high)
        return verdict(self.low, self.high, self.diff - self.seed_half, self.diff + self.seed_half)


def t95(df: int) -> float:
    """Two-sided 95% t quantile; past the table, the Cornish-Fisher expansion (exact to 1e-3 there)."""
    if df in T95:
        return T95[df]
    z = Z95
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def load_runs(paths: list[Path]) -> list[Doc]:
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


def aggregation(doc: Doc) -> dict[str, Any]:
    """The run's server rule, with the defaults filled in (older runs carry no record: they used the defaults)."""
    return AGGREGATION_DEFAULTS | (doc.get("aggregation") or {})


def aggregation_tag(doc: Doc) -> str:
    """" [exact, server_lr 2]": the aggregation settings that differ from the defaults, or "" when none do.

    Methods without a server (local, local_se, centralized, pretrained) get none: their runs record the
    params' aggregation all the same, but nothing was aggregated, so it must not split their rows. Under the
    exact rule the global rank defaults to clients × r, which is no variant either."""
    if not federated(doc["method"]):
        return ""
    agg = aggregation(doc)
    parts = [] if agg["rule"] == AGGREGATION_DEFAULTS["rule"] else [str(agg["rule"])]
    default_rank = len(doc.get("envs") or []) * doc.get("lora_r", 8) if agg["rule"] == "exact" else None
    for key in ("server_lr", "momentum", "fedprox_mu", "rank", "max_norm_ratio", "trim", "personal"):
        if agg[key] != AGGREGATION_DEFAULTS[key] and not (key == "rank" and agg[key] == default_rank):
            parts.append(f"{key} {agg[key]:g}" if isinstance(agg[key], float) else f"{key} {agg[key]}")
    return f" [{', '.join(parts)}]" if parts else ""


def federated(name: str) -> bool:
    """Whether the method has a server that aggregates; a name this code does not know counts as federated
    (its settings then show in its label rather than silently pooling)."""
    known = METHODS.get(name)
    return known is None or known.federated


def experience_tag(doc: Doc) -> str:
    """" {shortest, prune, unsolved, own_cap 1, steps 32}": the experience, mixing and budget settings that
    differ from the paper's (older runs record none: they used the paper's)."""
    settings = doc.get("settings") or {}
    buffer = settings.get("buffer") or {}
    parts = [*(["shortest"] if buffer.get("keep", "all") != "all" else []),
             *(["prune"] if buffer.get("prune") else []),
             *(["unsolved"] if settings.get("explore_unsolved") else []),
             *([f"own_cap {settings['own_cap']:g}"] if settings.get("own_cap") is not None else []),
             *([f"steps {settings['learner']['steps']}"] if (settings.get("learner") or {}).get("steps") else [])]
    return f" {{{', '.join(parts)}}}" if parts else ""


def label(doc: Doc) -> str:
    """Method name, plus the aggregation when it is not the default, the experience settings that are not the
    paper's, best-of-k exploration, the LoRA rank when it is not the paper's default of 8, and the transfer
    dtype when the adapters did not travel in fp32 (each is a different experiment, never pooled with the
    default)."""
    r = doc.get("lora_r", 8)
    dtype = (doc.get("exchange") or {}).get("dtype", "fp32")
    attempts = (doc.get("settings") or {}).get("explore_attempts", 1)
    return (doc["method"] + aggregation_tag(doc) + experience_tag(doc)
            + (f" best-of-{attempts}" if attempts != 1 else "")
            + (f" r={r}" if r != 8 else "") + (f" {dtype}" if dtype != "fp32" else ""))


def labeller(docs: list[Doc]) -> Callable[[Doc], str]:
    """`label`, plus the profile when the runs mix profiles (quick and full runs are different experiments)."""
    if len({d.get("profile") for d in docs}) < 2:
        return label
    return lambda d: f"{label(d)} ({d.get('profile')})"


def final(doc: Doc) -> Doc:
    return doc["rounds"][-1]


def group(docs: list[Doc]) -> dict[str, list[Doc]]:
    name = labeller(docs)
    groups: dict[str, list[Doc]] = defaultdict(list)
    for doc in docs:
        groups[name(doc)].append(doc)
    return dict(groups)


# ---------------------------------------------------------------------------------------------- per task


def task_success(env: Doc) -> dict[int, float] | None:
    """Task id → mean success over its passes, for one round's env record; None in runs that predate it."""
    if "task_ids" not in env or "task_success" not in env:
        return None
    return {int(t): float(s) for t, s in zip(env["task_ids"], env["task_success"], strict=True)}


def statistic(values: dict[str, list[float]], key: str) -> float:
    """Macro (mean of env means), micro (mean over every task: envs weighted by task counts) or one env."""
    if key == "macro":
        return sum(_mean(v) for v in values.values()) / len(values)
    if key == "micro":
        return _mean([x for v in values.values() for x in v])
    return _mean(values[key])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _sd(values: list[float]) -> float:
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def _envs_for(key: str, left: Doc, right: Doc) -> list[str]:
    """The envs a statistic reads, in the left round's order: one env, or every env both rounds scored."""
    shared = [e for e in left["envs"] if e in right["envs"]]
    return [key] if key in shared else ([] if key not in ("macro", "micro") else shared)


def shared_tasks(left: Doc, right: Doc, envs: list[str]) -> dict[str, list[tuple[int, float, float]]] | None:
    """Per env, (task, left success, right success) on the tasks both rounds evaluated; None without per-task
    results on either side or with no task in common in some env (then the pair is not comparable per task)."""
    out = {}
    for env in envs:
        a, b = task_success(left["envs"][env]), task_success(right["envs"][env])
        if a is None or b is None:
            return None
        common = sorted(set(a) & set(b))
        if not common:
            return None
        out[env] = [(t, a[t], b[t]) for t in common]
    return out


def summary_value(rnd: Doc, key: str) -> float:
    """The round's own summary number (what older runs offer): one env's success, micro or macro."""
    return rnd["envs"][key]["success"] if key in rnd["envs"] else rnd[key]


def binomial_variance(rnd: Doc, key: str, envs: list[str]) -> float:
    """Variance of the round's summary number if every episode were an independent coin (older runs)."""
    if key not in ("macro", "micro"):
        return _binvar(rnd["envs"][key])
    if key == "macro":
        return sum(_binvar(rnd["envs"][e]) for e in envs) / len(envs) ** 2
    total = sum(rnd["envs"][e]["n"] for e in envs)
    return sum(rnd["envs"][e]["n"] ** 2 * _binvar(rnd["envs"][e]) for e in envs) / max(total, 1) ** 2


def _binvar(env: Doc) -> float:
    return env["success"] * (1 - env["success"]) / max(env["n"], 1)


def bootstrap(diffs: dict[str, list[float]], key: str, resamples: int = BOOTSTRAP,
              seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile interval of the statistic of per-task differences, tasks resampled within each env (so
    every resample keeps each env's task count, and macro and micro keep their meaning)."""
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        sample = {env: rng.choices(values, k=len(values)) for env, values in diffs.items()}
        stats.append(statistic(sample, key))
    return percentile(stats, 2.5), percentile(stats, 97.5)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), without numpy."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def paired(pairs: list[tuple[Doc, Doc]], key: str) -> Paired | None:
    """left − right over (left round, right round) pairs, one pair per seed; None when the statistic does not
    apply (an env neither side scored).

    Per seed: the difference of the statistic on the tasks both rounds evaluated. Over tasks: each task's
    difference averaged over the seeds that scored it, bootstrapped. Without per-task results on some pair,
    the task interval is the binomial one of two independent proportions, averaged over seeds.
    """
    lefts, rights, per_task, variance = [], [], defaultdict(list), 0.0
    exact = True
    for left, right in pairs:
        envs = _envs_for(key, left, right)
        if not envs:
            return None
        tasks = shared_tasks(left, right, envs)
        if tasks is None:
            exact = False
            lefts.append(summary_value(left, key))
            rights.append(summary_value(right, key))
            variance += binomial_variance(left, key, envs) + binomial_variance(right, key, envs)
            continue
        lefts.append(statistic({e: [a for _, a, _ in rows] for e, rows in tasks.items()}, key))
        rights.append(statistic({e: [b for _, _, b in rows] for e, rows in tasks.items()}, key))
        for env, rows in tasks.items():
            for task, a, b in rows:
                per_task[env, task].append(a - b)
    diffs = [a - b for a, b in zip(lefts, rights, strict=True)]
    n, diff = len(diffs), _mean(diffs)
    seed_half = t95(n - 1) * _sd(diffs) / math.sqrt(n) if n > 1 else None
    if exact:
        by_env: dict[str, list[float]] = defaultdict(list)
        for (env, _), values in sorted(per_task.items()):
            by_env[env].append(_mean(values))
        low, high = bootstrap(dict(by_env), key)
        return Paired(_mean(lefts), _mean(rights), diff, n, seed_half, low, high, "bootstrap",
                      sum(len(v) for v in by_env.values()))
    half = Z95 * math.sqrt(variance) / n
    return Paired(_mean(lefts), _mean(rights), diff, n, seed_half, diff - half, diff + half, "binomial", 0)


def by_seed(runs: list[Doc]) -> dict[int, Doc]:
    """One run per seed (the first listed, should a seed repeat): the unit the seed interval counts."""
    seeds: dict[int, Doc] = {}
    for doc in runs:
        seeds.setdefault(doc["seed"], doc)
    return seeds


def compare(left: list[Doc], right: list[Doc], key: str) -> Paired | None:
    """Two methods' final rounds, paired on the seeds they share; unpaired (today's difference of the two
    results-table estimates) only when they share no seed."""
    a, b = by_seed(left), by_seed(right)
    seeds = sorted(set(a) & set(b))
    if seeds:
        return paired([(final(a[s]), final(b[s])) for s in seeds], key)
    if any(not _envs_for(key, final(x), final(y)) for x in left for y in right):
        return None
    ea, eb = metric(left, key), metric(right, key)
    diff, half = ea.mean - eb.mean, math.hypot(ea.half, eb.half)
    return Paired(ea.mean, eb.mean, diff, 0, None, diff - half, diff + half, "unpaired", 0)


def improvement(runs: list[Doc], key: str = "macro") -> Paired | None:
    """Final round − round 0 of each run (the same tasks and draws at both ends), paired per seed and task."""
    return paired([(final(d), d["rounds"][0]) for d in by_seed(runs).values()], key)


# ------------------------------------------------------------------------------------------ results table


def own_half(rnd: Doc, key: str) -> float:
    """One run's 95% half-width for its summary number: from its per-task success when recorded (t over tasks
    per env; normal for the averages), else binomial (Wilson per env, normal for the averages)."""
    envs = list(rnd["envs"]) if key in ("macro", "micro") else [key]
    tasks = [task_success(rnd["envs"][e]) for e in envs]
    if any(t is None or not t for t in tasks):
        return _binomial_half(rnd, key)
    values = {e: list(t.values()) for e, t in zip(envs, tasks, strict=True) if t is not None}
    if key not in ("macro", "micro"):
        v = values[key]
        if _sd(v) == 0:  # every task alike (often all 0): t says ± 0; the binomial interval stays honest
            return _binomial_half(rnd, key)
        return t95(len(v) - 1) * _sd(v) / math.sqrt(len(v))
    if key == "macro":
        var = sum(_sd(v) ** 2 / len(v) for v in values.values()) / len(values) ** 2
    else:
        total = sum(len(v) for v in values.values())
        var = sum(len(v) * _sd(v) ** 2 for v in values.values()) / total ** 2
    return Z95 * math.sqrt(var) if var > 0 else _binomial_half(rnd, key)


def _binomial_half(rnd: Doc, key: str) -> float:
    if key in rnd["envs"]:
        env = rnd["envs"][key]
        low, high = wilson(round(env["success"] * env["n"]), env["n"])
        return (high - low) / 2
    if key == "macro":
        return (rnd["macro_ci95"][1] - rnd["macro_ci95"][0]) / 2
    n = sum(e["n"] for e in rnd["envs"].values())
    return Z95 * math.sqrt(max(rnd["micro"] * (1 - rnd["micro"]), 1e-12) / max(n, 1))


def estimate(values: list[float], single_half: float) -> Estimate:
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, single_half, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    # never narrower than the runs' own sampling error averaged over n seeds: two seeds that happen to agree
    # do not make a 25-task success rate exact
    return Estimate(mean, max(t95(n - 1) * sd / math.sqrt(n), single_half / math.sqrt(n)), n)


def metric(docs: list[Doc], key: str) -> Estimate:
    """Final-round `key` (an env name, micro or macro) over the seeds of one method."""
    values = [summary_value(final(d), key) for d in docs]
    halves = [own_half(final(d), key) for d in docs]
    return estimate(values, sum(halves) / len(halves))


def results_table(docs: list[Doc]) -> str:
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


# ----------------------------------------------------------------------------------------- comparisons

PAIRED_HEAD = "difference | over seeds | over tasks | verdict"


def claim_list(groups: dict[str, list[Doc]]) -> list[tuple[str, str, str, str]]:
    """The paper's orderings, our two diagnostics, and each aggregation variant of Fed-SE against Fed-SE and
    against FedIT (the variants exist to recover what plain averaging loses)."""
    variants = []
    for name in sorted(n for n in groups if VARIANT.match(n) and n != "fedse"):
        variants += [(name, "fedse", "micro", "ours: this variant vs the paper's Fed-SE"),
                     (name, "fedit", "micro", "ours: this variant vs static FedAvg + LoRA")]
    for name in sorted(n for n in groups if n.startswith("fedit [")):  # e.g. personalised FedIT
        variants.append((name, "fedit", "micro", "ours: this FedIT variant vs the paper's FedIT"))
    return PAPER_CLAIMS + DIAGNOSTICS + variants


def claims_table(docs: list[Doc]) -> str:
    """Each ordering, measured: both sides on the shared tasks, the paired difference, its two intervals and
    a verdict."""
    groups = group(docs)
    rows = [f"| claim | paper | ours (left vs right) | {PAIRED_HEAD} |", "|---|---|---|---|---|---|---|"]
    for left, right, key, paper in claim_list(groups):
        claim = f"{left} > {right} ({key})"
        result = compare(groups[left], groups[right], key) if left in groups and right in groups else None
        if result is None:
            rows.append(f"| {claim} | {paper} | not run | | | | |")
            continue
        rows.append(f"| {claim} | {paper} | {result.left:.3f} vs {result.right:.3f} | {paired_cells(result)} |")
    return "\n".join(rows)


def forest_rows(docs: list[Doc]) -> list[tuple[str, Paired]]:
    """Every paired difference the report states: each method's final − round 0, then each ordering."""
    groups = group(docs)
    rows = [(f"{name}: final − round 0 (macro)", result) for name, runs in sorted(groups.items())
            if len(runs[0]["rounds"]) > 1 and (result := improvement(runs)) is not None]
    for left, right, key, _ in claim_list(groups):
        if left in groups and right in groups and (result := compare(groups[left], groups[right], key)) is not None:
            rows.append((f"{left} − {right} ({key})", result))
    return rows


def paired_cells(result: Paired) -> str:
    return f"{result.diff:+.3f} | {result.seeds_cell()} | {result.tasks_cell()} | {result.verdict()}"


def improvement_table(docs: list[Doc]) -> str:
    """Does each trained method's global adapter improve on its own round-0 adapter (macro, same tasks)?"""
    rows = [f"| method | round 0 macro | final macro | {PAIRED_HEAD.replace('difference', 'final − round 0')} |",
            "|---|---|---|---|---|---|---|"]
    for name, runs in sorted(group(docs).items()):
        if len(runs[0]["rounds"]) < 2:
            continue
        result = improvement(runs)
        if result is not None:
            rows.append(f"| {name} | {result.right:.3f} | {result.left:.3f} | {paired_cells(result)} |")
    return "\n".join(rows) if len(rows) > 2 else ""


TIE = 1e-9  # success rates are ratios of small counts: below this a difference is float rounding, not a sign


def verdict(task_low: float, task_high: float, seed_low: float | None = None, seed_high: float | None = None) -> str:
    """reports/protocol.md's three verdicts, fixed before the test runs: *holds* when both intervals lie above 0
    (the seed one only where there are several seeds), *against* when both lie below 0, else *within noise*. An
    interval that ends within float rounding of 0 (equal means computed in two orders) does not exclude it."""
    if task_low > TIE and (seed_low is None or seed_low > TIE):
        return "holds"
    if task_high < -TIE and (seed_high is None or seed_high < -TIE):
        return "against"
    return "within noise"


# ------------------------------------------------------------------------------- self-generated experience


def explores(doc: Doc) -> bool:
    """Whether the run played its own episodes (Fed-SE and its ablations, local_se), read from its clients."""
    return any(c.get("explored") or c.get("explore_success") is not None
               for r in doc["rounds"] for c in (r.get("clients") or {}).values())


def client_series(runs: list[Doc], key: str) -> list[tuple[int, float | None, int]]:
    """Per round every run reached: (round, mean over seeds and clients of the client stat `key`, how many
    values); None where no client recorded it (older runs, or a round with no new self-generated success)."""
    length = min(len(d["rounds"]) for d in runs)
    out = []
    for i in range(length):
        values = [c[key] for d in runs for c in (d["rounds"][i].get("clients") or {}).values()
                  if c.get(key) is not None]
        out.append((runs[0]["rounds"][i]["round"], _mean(values) if values else None, len(values)))
    return out


def experience_table(docs: list[Doc]) -> str:
    """Per round of each exploring method: how often exploration succeeds, how much of the buffers is the
    clients' own play, and how long its kept successes are against the expert's (a column only where the
    runs record it)."""
    groups = {name: runs for name, runs in sorted(group(docs).items()) if any(explores(d) for d in runs)}
    series = {name: {key: client_series(runs, key) for key, _, _ in EXPLORE_KEYS} for name, runs in groups.items()}
    keys = [k for k in EXPLORE_KEYS if any(v is not None for s in series.values() for _, v, _ in s[k[0]])]
    if not keys:
        return ""
    rows = ["| method | round | " + " | ".join(title for _, title, _ in keys) + " | clients × seeds |",
            "|---|---|" + "---|" * (len(keys) + 1)]
    for name, stats in series.items():
        for i, (rnd, _, _) in enumerate(stats["explore_success"]):
            cells = [_cell(stats[key][i][1], fmt) for key, _, fmt in keys]
            count = max(stats[key][i][2] for key, _, _ in keys)
            rows.append(f"| {name if i == 0 else ''} | {rnd} | " + " | ".join(cells) + f" | {count} |")
    return "\n".join(rows)


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


# ------------------------------------------------------------------------------------------------ ranks


def rank_table(docs: list[Doc]) -> str:
    """The LoRA rank sweep of Fed-SE: success and adapter megabytes each client sends per round (default
    aggregation and fp32 transfer only: the other settings are other experiments)."""
    by_rank: dict[int, list[Doc]] = defaultdict(list)
    for doc in docs:
        if re.fullmatch(r"fedse( r=\d+)?", label(doc)):
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


PAIRED_NOTE = (
    "Each comparison is paired: runs with the same seed (and two rounds of one run) play the same tasks and "
    "draws, so both sides are scored on the tasks both evaluated. **difference**: mean over seeds of "
    "left − right. **over seeds**: ± t(0.975, n−1)·sd/√n of the per-seed differences (— with one seed). "
    f"**over tasks**: 95% percentile bootstrap ({BOOTSTRAP} resamples of the tasks within each env, fixed RNG "
    "seed) of the per-task differences averaged over seeds; *binomial* marks runs without per-task results "
    "(two independent proportions), *unpaired* methods with no seed in common (the results table's intervals "
    "combined). Verdict (reports/protocol.md): *holds* when both intervals lie above 0, *against* when both lie "
    "below 0, else *within noise*.")


def split(docs: list[Doc]) -> str:
    """Which ids the runs were scored on: calibration runs (`federation.eval_split: val`) must not read as test
    results."""
    found = {(d.get("settings") or {}).get("eval_split", "test") for d in docs}
    return "validation" if found == {"val"} else "test" if found == {"test"} else "mixed test and validation"


def markdown(docs: list[Doc], plot: Path | None = None, figures: list[Path] | None = None) -> str:
    profiles = sorted({str(d.get("profile")) for d in docs})
    ids = split(docs)
    parts = [f"# fedse results (profile {', '.join(profiles)}; model {docs[0].get('model')})", "",
             f"Final-round {ids} success, mean ± 95% CI over seeds (one seed: that run's own interval, over its "
             "tasks where recorded, else binomial).", "",
             results_table(docs), "", "## The paper's orderings on our environments", "",
             "Rows whose paper column starts with *ours* are our diagnostics, not the paper's claims.", "",
             PAIRED_NOTE, "", claims_table(docs)]
    progress = improvement_table(docs)
    if progress:
        parts += ["", "## Improvement over the round-0 adapter", "",
                  f"Macro {ids} success after round 0 and after the last round, on the tasks both evaluated, paired "
                  "per seed and per task as above.", "", progress]
    experience = experience_table(docs)
    if experience:
        parts += ["", "## Self-generated experience", "",
                  "Methods that explore, per round, mean over seeds and clients: the success rate of exploration, "
                  "the share of each client's buffer that it generated itself, and the length of the round's newly "
                  "kept self-generated successes over the expert's on the same task (— where not recorded).", "",
                  experience]
    ranks = rank_table(docs)
    if ranks:
        parts += ["", "## LoRA rank sweep (Fed-SE)", "", ranks]
    if plot is not None:
        parts += ["", f"![learning curves]({plot.name})"]
    parts += [f"![{figure.stem}]({figure.name})" for figure in figures or []]
    return "\n".join(parts) + "\n"


def round_line(record: Doc, rounds: int) -> str:
    """One finished round in one line (what `make run` and `fedse run` print as they go, and the flow logs):
    where macro success stands with its interval, how much experience the round added, what it cost, and
    which clients the server went without. Rounds count from 0, as in metrics.json, MLflow and the registry."""
    parts = [f"round {record['round']} of {rounds}", f"macro {record['macro']:.3f}"]
    if "macro_ci95" in record:
        low, high = record["macro_ci95"]
        parts[-1] += f" [{low:.2f}, {high:.2f}]"
    if record.get("split") == "val":  # a curve point (or a calibration run), not a test figure
        parts[-1] += " (validation)"
    clients = [c for c in record.get("clients", {}).values() if "failed" not in c]
    if clients:
        added, held = sum(c.get("added", 0) for c in clients), sum(c.get("buffer", 0) for c in clients)
        parts.append(f"buffers +{added} → {held}")
    parts.append(f"{record['seconds']:.0f} s")
    spent = [f"{kind} ε {dp['epsilon']:.2f}" for kind, dp in sorted(record.get("privacy", {}).items())]
    if spent:  # DP on: what has been spent so far, at which δ
        delta = min(dp["delta"] for dp in record["privacy"].values())
        parts.append(f"{', '.join(spent)} (δ {delta:g})")
    absent = {**record.get("aggregation", {}).get("missing", {}),
              **{r["client"]: r["reason"] for r in record.get("aggregation", {}).get("rejected", [])}}
    if absent:
        parts.append("without " + ", ".join(sorted(absent)))
    return "  ".join(parts)
