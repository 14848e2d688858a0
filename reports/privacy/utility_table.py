"""Issue 28's utility table: macro success against ε, and what a DP round costs against a plain one.

Reads the metrics.json copies `utility.sh` keeps (reports/privacy/utility/<tag>.json, tags
`[val-]<method>-<inf|rec<ε>|cli<ε>>[-<note>]`) and prints one markdown table per split: the final round's macro
success with its 95% interval over tasks, the difference to the same method without DP (paired per task: the same
tasks and sampling draws), the ε the accountant spent, and the seconds of a round, of one client's training and
the bytes one client sent, each as a ratio to the plain run.

    .venv/bin/python reports/privacy/utility_table.py            # both splits present
    .venv/bin/python reports/privacy/utility_table.py --split test
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from statistics import mean
from typing import Any

from fedse.report import final, own_half, paired, summary_value

HERE = Path(__file__).resolve().parent / "utility"
TAG = re.compile(r"^(?:(?P<val>val)-)?(?P<method>[a-z_]+)-(?P<mode>inf|rec|cli)(?P<eps>\d*)(?:-(?P<note>.+))?$")
MODES = {"inf": "none", "rec": "record", "cli": "client"}


def rows(split: str) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(parsed tag, run) of every kept run on `split`, plain rows first within each method."""
    out = []
    for path in sorted(HERE.glob("*.json")):
        match = TAG.match(path.stem)
        if match is None or (match["val"] is not None) != (split == "val"):
            continue
        out.append(({k: v or "" for k, v in match.groupdict().items()} | {"tag": path.stem},
                    json.loads(path.read_text())))
    order = {"inf": 0, "rec": 1, "cli": 2}
    return sorted(out, key=lambda r: (r[0]["method"], order[r[0]["mode"]], -int(r[0]["eps"] or 0), r[0]["note"]))


def spent(doc: dict[str, Any], mode: str) -> str:
    """The (ε, δ) the run's accountant reports after its last round, for the run's own DP mode."""
    record = (final(doc).get("privacy") or {}).get(MODES[mode])
    return "∞" if record is None else f"{record['epsilon']:.2f} (δ {record['delta']:g})"


def costs(doc: dict[str, Any]) -> tuple[float, float, float]:
    """Mean seconds of a round, mean seconds of one client's training, mean bytes one client sends a round."""
    clients = [c for r in doc["rounds"] for c in r["clients"].values()]
    return (mean(r["seconds"] for r in doc["rounds"]), mean(c["train_seconds"] for c in clients),
            mean(c["bytes_sent"] for c in clients))


def table(split: str) -> str:
    found = rows(split)
    plain = {t["method"]: d for t, d in found if t["mode"] == "inf"}
    head = ("| method | DP | target ε | ε spent | macro (95% CI over tasks) | − plain, paired per task | "
            "s/round | train s/client | bytes/client | tag |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for tag, doc in found:
        last = final(doc)
        macro, half = summary_value(last, "macro"), own_half(last, "macro")
        base = plain.get(tag["method"])
        diff = "—"
        if base is not None and base is not doc:
            result = paired([(last, final(base))], "macro")
            if result is not None:
                diff = f"{result.diff:+.3f} [{result.low:+.3f}, {result.high:+.3f}]"
        round_s, train_s, sent = costs(doc)
        r = ("", "", "")
        if base is not None and base is not doc:
            b = costs(base)
            r = (f" ({round_s / b[0]:.2f}×)", f" ({train_s / b[1]:.2f}×)", f" ({sent / b[2]:.2f}×)")
        lines.append(f"| {tag['method']} | {MODES[tag['mode']]} | {tag['eps'] or '∞'} | {spent(doc, tag['mode'])} "
                     f"| {macro:.3f} ± {half:.3f} | {diff} | {round_s:.0f}{r[0]} | {train_s:.0f}{r[1]} | "
                     f"{sent / 1e3:.0f} kB{r[2]} | {tag['tag']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["val", "test"], action="append")
    for split in parser.parse_args().split or ["val", "test"]:
        if rows(split):
            print(f"### {split}\n\n{table(split)}\n")


if __name__ == "__main__":
    main()
