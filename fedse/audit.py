"""Egress audit: a record of everything that left each client, kept on the client's side.

Every upload a client makes is one JSON line in `<audit_dir>/<experiment>/client_<k>.jsonl` (by default
`<run folder>/egress/<experiment>/client_<k>.jsonl`): the round, the
tensor names and shapes, the dtype, the bytes, the sha256 and the metadata sent with it (the success count
that weighted averaging uses), plus where it went (the store's endpoint, bucket and key) and when. A round
request an organisation's worker refused is a line too (`kind: refused`, with the reason), so an attempt to
redirect its data shows in its own log. Each line carries the sha256 of the line before it (`prev`; the first
line's is 64 zeros), so a deleted, reordered or edited line breaks the chain (`verify`, `fedse audit --verify`).
The manifest in the store says the same thing; the client's own copy is what its organisation can check
without trusting the store. `fedse audit` prints it; the flow also writes each round's records as MLflow tags.
"""

from __future__ import annotations

import hashlib
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


GENESIS = "0" * 64


def record(audit_dir: Path, upload: Upload, destination: str, privacy: dict[str, Any] | None = None,
           ) -> dict[str, Any]:
    """Append one upload to its sender's log, chained to the line before (the file is rewritten atomically:
    never a torn line); `privacy`: the (ε, δ) its records had spent when it left (DP on), else absent."""
    entry = upload.to_json() | {"kind": "upload", "destination": destination}
    entry |= {"privacy": privacy} if privacy else {}
    return _append(log_path(audit_dir, upload.experiment, upload.sender), entry)


def entries(path: Path) -> list[dict[str, Any]]:
    """Every line of one sender's log, oldest first (none for a log not yet written)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def record_refusal(audit_dir: Path, experiment: str, sender: str, round: int, reason: str,
                   request: dict[str, Any] | None = None) -> dict[str, Any]:
    """Append a refused round request (what was asked and why it was refused) to the sender's log."""
    entry = {"kind": "refused", "experiment": experiment, "round": round, "sender": sender, "reason": reason,
             "request": request}
    return _append(log_path(audit_dir, experiment, sender), entry)


def _append(path: Path, entry: dict[str, Any]) -> dict[str, Any]:
    previous = path.read_text(encoding="utf-8") if path.exists() else ""
    lines = previous.splitlines()
    entry = entry | {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "prev": _line_hash(lines[-1]) if lines else GENESIS}
    write_text(path, previous + json.dumps(entry, sort_keys=True) + "\n")
    return entry


def _line_hash(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def verify(path: Path) -> list[str]:
    """Where a log's chain breaks (line numbers from 1, and why); empty when every line follows the one before.
    A line removed, inserted, reordered or edited anywhere but the last line shows; the last line is covered
    by whoever keeps the hash of the newest line (the MLflow tags of each round hold it)."""
    problems, before = [], GENESIS
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            prev = json.loads(line).get("prev")
        except json.JSONDecodeError:
            problems.append(f"{path}:{number}: not JSON")
            prev = None
        if prev != before:
            problems.append(f"{path}:{number}: does not follow line {number - 1} (prev {str(prev)[:12]}, the line "
                            f"before hashes to {before[:12]})")
        before = _line_hash(line)
    return problems


def head(path: Path) -> str:
    """The hash of a log's newest line (GENESIS for an empty log): what pins the whole chain."""
    lines = Path(path).read_text(encoding="utf-8").splitlines() if Path(path).exists() else []
    return _line_hash(lines[-1]) if lines else GENESIS


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
    if entry.get("kind") == "refused":
        return {"round": entry["round"], "sender": entry["sender"], "refused": entry["reason"]}
    shapes = entry["tensors"].values()
    return {"round": entry["round"], "sender": entry["sender"], "tensors": len(entry["tensors"]),
            "values": sum(_numel(s) for s in shapes), "dtype": entry["dtype"], "bytes": entry["bytes"],
            "sha256": entry["sha256"], "metadata": entry["metadata"], "destination": entry["destination"],
            **({"epsilon": entry["privacy"]["record"]["epsilon"]} if entry.get("privacy") else {})}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
