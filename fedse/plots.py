"""Learning-curve figures (PNG): what people would rather look at than read from metrics.json."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from fedse.atomic import write_text
from fedse.report import Paired, client_series, explores, split, t95


def run_curves(doc: dict[str, Any], path: Path) -> Path:
    """One run: success per environment and the macro average, per round (on test ids, or validation ids for
    a calibration run)."""
    rounds = [r["round"] for r in doc["rounds"]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for env in doc["envs"]:
        ax.plot(rounds, [r["envs"][env]["success"] for r in doc["rounds"]], marker="o", ms=3, lw=1.2, label=env)
    macro = [r["macro"] for r in doc["rounds"]]
    low = [r["macro_ci95"][0] for r in doc["rounds"]]
    high = [r["macro_ci95"][1] for r in doc["rounds"]]
    ax.plot(rounds, macro, color="black", lw=2.4, label="macro")
    ax.fill_between(rounds, low, high, color="black", alpha=0.12, label="macro 95% CI")
    _style(ax, f"{doc['method']} (profile {doc.get('profile')}, seed {doc['seed']}, r={doc.get('lora_r')})",
           split([doc]))
    ax.set_xlabel(round_label([doc]))
    return _save(fig, path)


def mean_curves(docs: list[dict[str, Any]], label: Any = None) -> dict[str, tuple[list[int], list[list[float]]]]:
    """Per label: the rounds every run of it reached, and each round's macro success of every run."""
    label = label or (lambda d: d["method"])
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for doc in docs:
        groups[label(doc)].append(doc)
    curves = {}
    for name, runs in sorted(groups.items()):
        length = min(len(d["rounds"]) for d in runs)
        curves[name] = ([runs[0]["rounds"][i]["round"] for i in range(length)],
                        [[d["rounds"][i]["macro"] for d in runs] for i in range(length)])
    return curves


def curves_csv(docs: list[dict[str, Any]], path: Path, label: Any = None) -> Path:
    """The PNG's lines as a table for `dvc plots show`: one row per round, one column per method (mean over
    seeds). A method evaluated once (the untrained base) holds its value on every round, as its line does."""
    curves = mean_curves(docs, label)
    last = max((rounds[-1] for rounds, _ in curves.values()), default=0)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")  # quotes labels such as "fedse [exact, server_lr 2]"
    writer.writerow(["round", *curves])
    for r in range(last + 1):
        cells = []
        for rounds, series in curves.values():
            i = rounds.index(r) if r in rounds else (0 if len(rounds) == 1 else None)
            cells.append("" if i is None else f"{sum(series[i]) / len(series[i]):.4f}")
        writer.writerow([r, *cells])
    write_text(Path(path), text.getvalue())
    return Path(path)


def tasks_per_round(docs: list[dict[str, Any]]) -> dict[int, int]:
    """Test tasks per env each round was scored on (the fewest over runs and envs).

    Profiles score the first and last round on more tasks than the rounds between, so points of one curve are
    not equally precise, nor scored on the same tasks; the plot has to say which are which.
    """
    sizes: dict[int, int] = {}
    for doc in docs:
        for r in doc["rounds"]:
            n = min(int(e.get("n", 0)) for e in r["envs"].values())
            sizes[r["round"]] = min(n, sizes.get(r["round"], n))
    return sizes


def curve_rounds(docs: list[dict[str, Any]]) -> list[int]:
    """The rounds some test-scored run played on validation tasks (`curve_split: val`): points of the curve
    only, scored on other tasks than the first and last rounds, which the axis label has to say."""
    return sorted({r["round"] for d in docs for r in d["rounds"]
                   if r.get("split") == "val" and (d.get("settings") or {}).get("eval_split", "test") == "test"})


def round_label(docs: list[dict[str, Any]]) -> str:
    """The x label: plain rounds, or which of them were scored on validation tasks."""
    between = curve_rounds(docs)
    return f"round (rounds {between[0]}–{between[-1]}: validation tasks)" if between else "round"


def method_curves(docs: list[dict[str, Any]], path: Path, label: Any = None) -> Path:
    """Several runs: macro success per round (on test or validation ids, as the runs were scored), averaged
    over the seeds of each method (band: min–max). Filled markers: rounds scored on the most tasks; hollow:
    rounds scored on fewer. Below, when some method explores, its exploration success per round (same
    colours): whether self-evolution has any successes of its own to learn from."""
    sizes = tasks_per_round(docs)
    most = max(sizes.values(), default=0)
    exploring = explore_curves(docs, label)
    if exploring:
        fig, (ax, low) = plt.subplots(2, 1, figsize=(7.5, 6.6), sharex=True, height_ratios=[3, 1.6])
    else:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
    tab20 = plt.get_cmap("tab20").colors
    palette = tab20[::2] + tab20[1::2]  # ten strong colours, then their light twins: 20 methods
    colours: dict[str, Any] = {}
    for name, (rounds, series) in mean_curves(docs, label).items():
        n = len(series[0])
        mean = [sum(s) / len(s) for s in series]
        if len(rounds) == 1:  # e.g. the pretrained base: a flat reference line
            ax.axhline(mean[0], ls="--", lw=1.2, color="grey", label=f"{name} (n={n})")
            continue
        colour = colours.setdefault(name, palette[len(colours) % len(palette)])
        ax.plot(rounds, mean, marker="o", ms=4, markerfacecolor="white", lw=1.6, color=colour, label=f"{name} (n={n})")
        full = [(r, m) for r, m in zip(rounds, mean, strict=True) if sizes.get(r) == most]
        ax.plot([r for r, _ in full], [m for _, m in full], "o", ms=4, color=colour)  # fill the precise rounds
        if n > 1:
            ax.fill_between(rounds, [min(s) for s in series], [max(s) for s in series], alpha=0.12, color=colour)
    ids = split(docs)
    _style(ax, f"macro {ids} success per round (mean over seeds; band = min–max)", ids)
    handles, names = ax.get_legend_handles_labels()
    ax.get_legend().remove()  # below the lowest panel, never over the data
    (low if exploring else ax).legend(handles, names, fontsize=7, ncol=3, loc="upper center",
                                      bbox_to_anchor=(0.5, -0.3 if exploring else -0.12), frameon=False)
    fewer = sorted({v for v in sizes.values() if v != most})
    hollow = "validation tasks" if curve_rounds(docs) else f"{ids} tasks"
    xlabel = (f"round (filled: {most} {ids} tasks per env; hollow: {', '.join(map(str, fewer))} {hollow})"
              if fewer else round_label(docs))
    ax.set_xlabel(xlabel)
    if exploring:
        ax.set_xlabel("")
        for name, (rounds, values) in exploring.items():
            low.plot(rounds, values, marker="o", ms=3, lw=1.4, color=colours.get(name, "black"))
        low.set_xlabel(xlabel)
        low.set_ylabel("exploration success")
        low.set_ylim(-0.02, min(1.02, max(0.25, low.dataLim.y1 * 1.15)))
        low.grid(alpha=0.3)
        low.set_title("exploration success per round (mean over seeds and clients)", fontsize=10)
    return _save(fig, path)


def seed_band(series: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Per round: the mean over seeds and its 95 % t interval (no band with one seed)."""
    mean = [sum(s) / len(s) for s in series]
    half = []
    for s, m in zip(series, mean, strict=True):
        n = len(s)
        sd = (sum((x - m) ** 2 for x in s) / (n - 1)) ** 0.5 if n > 1 else 0.0
        half.append(t95(n - 1) * sd / n ** 0.5 if n > 1 else 0.0)
    return mean, [m - h for m, h in zip(mean, half, strict=True)], [m + h for m, h in zip(mean, half, strict=True)]


def main_comparison(docs: list[dict[str, Any]], path: Path, main: list[str], label: Any = None) -> Path:
    """The comparison the study is about in one panel: each label of `main` (pretrained, FedIT, Fed-SE, the
    variant) as its mean macro success per round over seeds with the 95 % t interval over seeds as a band;
    the legend sits below the axes, never over the data."""
    curves = {name: c for name, c in mean_curves(docs, label).items() if name in main}
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    for i, name in enumerate(sorted(curves, key=main.index)):
        rounds, series = curves[name]
        mean, low, high = seed_band(series)
        colour = "grey" if len(rounds) == 1 else plt.get_cmap("tab10").colors[i % 10]
        text = f"{name} (n={len(series[0])})"
        if len(rounds) == 1:  # evaluated once (the untrained base): a flat reference with its band
            ax.axhline(mean[0], ls="--", lw=1.2, color=colour, label=text)
            ax.axhspan(low[0], high[0], color=colour, alpha=0.08)
            continue
        ax.plot(rounds, mean, marker="o", ms=4, lw=1.8, color=colour, label=text)
        ax.fill_between(rounds, low, high, alpha=0.15, color=colour)
    ids = split(docs)
    ax.set_title(f"macro {ids} success per round: mean over seeds, band = 95 % t interval over seeds", fontsize=10)
    ax.set_xlabel(round_label(docs))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{ids} success")
    ax.set_ylim(-0.02, min(1.02, max(0.25, ax.dataLim.y1 * 1.15)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    return _save(fig, path)


def small_multiples(docs: list[dict[str, Any]], path: Path, skip: list[str], reference: str = "fedse",
                    label: Any = None) -> Path | None:
    """Every other method (the ablations, the aggregation and experience variants) in a small panel of its own,
    with the reference (the paper's Fed-SE) in grey behind it; all panels share the axes."""
    curves = mean_curves(docs, label)
    others = [name for name in curves if name not in skip and name != reference]
    if not others:
        return None
    cols = min(4, len(others))
    rows = -(-len(others) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), sharex=True, sharey=True,
                             squeeze=False)
    top = max(max(max(s) for s in series) for _, series in curves.values())
    for ax, name in zip(axes.flat, others, strict=False):
        for which, colour in ((reference, "grey"), (name, "tab:blue")):
            if which not in curves:
                continue
            rounds, series = curves[which]
            mean, low, high = seed_band(series)
            if len(rounds) == 1:
                ax.axhline(mean[0], ls="--", lw=1, color=colour)
                continue
            ax.plot(rounds, mean, marker="o", ms=2.5, lw=1.3, color=colour)
            ax.fill_between(rounds, low, high, alpha=0.15, color=colour)
        ax.set_title(f"{name} (n={len(curves[name][1][0])})", fontsize=8)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.02, min(1.02, max(0.25, top * 1.15)))
    for ax in list(axes.flat)[len(others):]:
        ax.axis("off")
    fig.suptitle(f"each method (blue) against {reference} (grey): macro {split(docs)} success per round, "
                 "band = 95 % t interval over seeds", fontsize=9)
    fig.supxlabel(round_label(docs), fontsize=8)
    return _save(fig, path)


def forest(rows: list[tuple[str, Paired]], path: Path) -> Path | None:
    """Every paired difference at a glance: the point estimate, the 95 % t interval over seeds (thick) and the
    95 % bootstrap interval over tasks (thin), against the zero line."""
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9.5, 0.32 * len(rows) + 1.3))
    for y, (_, result) in enumerate(reversed(rows)):
        ax.plot([result.low, result.high], [y, y], color="tab:blue", lw=1.2)
        if result.seed_half is not None:
            ax.plot([result.diff - result.seed_half, result.diff + result.seed_half], [y, y], color="black",
                    lw=3.2, alpha=0.55, solid_capstyle="butt")
        ax.plot(result.diff, y, "o", color="black", ms=4)
    ax.axvline(0, color="red", lw=1, ls="--")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([name for name, _ in reversed(rows)], fontsize=7)
    ax.set_xlabel("paired difference (left − right), macro or micro success as named")
    ax.set_title("thick: 95 % t interval over seeds; thin: 95 % bootstrap interval over tasks", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def explore_curves(docs: list[dict[str, Any]], label: Any = None) -> dict[str, tuple[list[int], list[float]]]:
    """Per label that explores: the rounds with a recorded exploration success and its mean over seeds and
    clients (rounds where no client explored are left out, not drawn as 0)."""
    label = label or (lambda d: d["method"])
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for doc in docs:
        groups[label(doc)].append(doc)
    curves = {}
    for name, runs in sorted(groups.items()):
        if not any(explores(d) for d in runs):
            continue
        points = [(r, v) for r, v, _ in client_series(runs, "explore_success") if v is not None]
        if points:
            curves[name] = ([r for r, _ in points], [v for _, v in points])
    return curves


def _style(ax: Any, title: str, ids: str = "test") -> None:
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{ids} success")
    # near-floor results should not look flat: zoom to the data, never past 0–1
    ax.set_ylim(-0.02, min(1.02, max(0.25, ax.dataLim.y1 * 1.15)))
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=2, loc="upper left")


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
