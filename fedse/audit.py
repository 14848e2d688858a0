"""Egress audit: a record of everything that left each client, kept on the client's side.

Every upload a client makes is one JSON line in `<audit_dir>/<experiment>/client_<k>.jsonl` (by default
`<run folder>/egress/<experiment>/client_<k>.jsonl`): the round, the
tensor names and shapes, the dtype, the bytes, the sha256 and the metadata sent with it (the success count
that weighted averaging uses), plus where it went and when. The manifest in the store says the same thing;
the client's own copy is what its organisation can check without trusting the store. `fedse audit` prints
it; the flow also writes each round's records as MLflow tags.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedse.atomic import write_text
from fedse.transport import Upload


def egress_dir(audit_dir: Path | None, run_folder: Path) -> Path:
    """`transport.audit_dir`, or the run folder's `egress/` when it is null."""
    return Path(audit_dir) if audit_dir is not None else Path(run_folder) / "egress"


def find(root: Path, experiment: str) -> list[Path]:
    """The egress folders of an experiment under `root`: `root/<experiment>` itself, or every run folder's
    `egress/<experiment>` below it (runs keep their logs by default; in workers mode each organisation keeps
    its own, so `--dir .orgs` gathers them all)."""
    root = Path(root)
    if (root / experiment).is_dir():
        return [root]
    found = sorted(p.parent for p in root.glob(f"**/egress/{experiment}") if p.is_dir())
    if not found:
        raise ValueError(f"{root}: no egress log for experiment {experiment!r} (fedse audit without --experiment "
                         "lists the known ones)")
    return found


def known(root: Path) -> list[tuple[str, Path]]:
    """(experiment, its egress folder) of every log under `root`, newest first: `root` itself as an egress
    folder, or the `egress/` folders of the runs below it."""
    root = Path(root)
    logs = [p for p in root.glob("**/*.jsonl") if p.parent.parent in (root, root / "egress")
            or p.parent.parent.name == "egress"]
    folders = sorted({p.parent for p in logs}, key=lambda f: f.stat().st_mtime, reverse=True)
    return [(f.name, f.parent) for f in folders]


def log_path(audit_dir: Path, experiment: str, sender: str) -> Path:
    return Path(audit_dir) / experiment / f"{sender}.jsonl"


def record(audit_dir: Path, upload: Upload, destination: str) -> dict[str, Any]:
    """Append one upload to its sender's log (the file is rewritten atomically: never a torn line)."""
    entry = upload.to_json() | {"destination": destination, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = log_path(audit_dir, upload.experiment, upload.sender)
    previous = path.read_text(encoding="utf-8") if path.exists() else ""
    write_text(path, previous + json.dumps(entry, sort_keys=True) + "\n")
    return entry


def read(audit_dirs: Path | list[Path], experiment: str) -> list[dict[str, Any]]:
    """Every recorded upload of an experiment in these egress folders, by round then sender."""
    entries = []
    for audit_dir in [audit_dirs] if isinstance(audit_dirs, Path | str) else audit_dirs:
        folder = Path(audit_dir) / experiment
        if not folder.is_dir():
            raise ValueError(f"{folder}: no egress log for experiment {experiment!r}")
        entries += [json.loads(line) for path in sorted(folder.glob("*.jsonl"))
                    for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(entries, key=lambda e: (e["round"], e["sender"]))


def summary(entry: dict[str, Any]) -> dict[str, Any]:
    """One upload in a line: what a reviewer checks first (how much, what kind, which hash, what else)."""
    shapes = entry["tensors"].values()
    return {"round": entry["round"], "sender": entry["sender"], "tensors": len(entry["tensors"]),
            "values": sum(_numel(s) for s in shapes), "dtype": entry["dtype"], "bytes": entry["bytes"],
            "sha256": entry["sha256"], "metadata": entry["metadata"], "destination": entry["destination"]}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
