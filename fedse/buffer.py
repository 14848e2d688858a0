"""A client's experience buffer: the successful trajectories it has gathered so far, and what fed each round.

Fed-SE keeps only episodes the environment marked successful (the binary success filter) and lets the
buffer grow across rounds (D_k,t = D_k,t-1 ∪ new successes), starting from the client's expert seeds. Records
are de-duplicated by content hash, so an episode found again in a later round is not trained on twice.

With `keep="shortest"` (`buffer.keep`) it holds one success per task (by content key: ids with the same
secret, goal or maze instance are one task), the one with the fewest turns: a later, shorter success
supersedes an older one, so a weak policy's first lucky walk is not what it keeps learning from.

On disk a buffer is one folder: `buffer.jsonl` (every record ever added, oldest first; append-only) and
`manifest_<round>.json` per round (count, hashes, sources, and the hashes this round superseded). The buffer is
the records not superseded by any manifest. Both are replaced atomically (temp file + rename), so a crash at
any point leaves the previous round's buffer readable and complete, and the state after round t is the first
`rows` records minus what manifests 0 … t superseded.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from fedse.atomic import write_json
from fedse.trajectory import Trajectory, read_jsonl, write_jsonl

RECORDS = "buffer.jsonl"
Keep = Literal["all", "shortest"]


def success_filter(trajectories: Iterable[Trajectory]) -> list[Trajectory]:
    """Keep exactly the episodes the environment reported as successful (reward 1 ⇔ success)."""
    return [t for t in trajectories if t.success]


def shortest_per_task(trajectories: Iterable[Trajectory]) -> list[Trajectory]:
    """Of several successes on one task keep the one with the fewest turns (the first among equals).

    A weak policy's successes are often lucky walks, several times the expert's length; when a task was tried
    k times the shortest success is the most direct solution the agent itself found, and needs no label
    beyond the environment's own success signal.
    """
    best: dict[tuple[str, int], Trajectory] = {}
    for t in trajectories:
        key = (t.env, t.task_id)
        if key not in best or len(t.turns) < len(best[key].turns):
            best[key] = t
    return list(best.values())


class Buffer:
    """The cumulative, de-duplicated trajectory store of one client."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / RECORDS
        self._rows: list[Trajectory] = list(read_jsonl(self.path)) if self.path.exists() else []
        self._hashes = {t.content_hash for t in self._rows}
        self._superseded = self._superseded_up_to(None)
        self._dropped: list[str] = []  # superseded since the last commit

    def __len__(self) -> int:
        return len(self.records)

    @property
    def rows(self) -> int:
        """Records in buffer.jsonl, superseded ones included (what a rewind counts)."""
        return len(self._rows)

    @property
    def records(self) -> list[Trajectory]:
        return [t for t in self._rows if t.content_hash not in self._superseded]

    def add(self, trajectories: Iterable[Trajectory], keep: Keep = "all",
            key: Callable[[Trajectory], str] | None = None) -> list[Trajectory]:
        """Stage new records in memory; returns the ones the buffer takes (not already held by content hash;
        with `keep="shortest"`, only a success shorter than the one held for its task, which it supersedes).

        `key` names a record's task (default: environment and task id; the round loop passes the content key)."""
        task = key or (lambda t: f"{t.env}:{t.task_id}")
        best = {task(t): t for t in self.records if t.success} if keep == "shortest" else {}
        fresh = []
        for traj in trajectories:
            if traj.content_hash in self._hashes:
                continue
            if keep == "shortest" and traj.success:
                held = best.get(task(traj))
                if held is not None and len(held.turns) <= len(traj.turns):
                    continue
                if held is not None:
                    self._superseded.add(held.content_hash)
                    self._dropped.append(held.content_hash)
                best[task(traj)] = traj
            self._hashes.add(traj.content_hash)
            fresh.append(traj)
        self._rows.extend(fresh)
        return [t for t in fresh if t.content_hash not in self._superseded]

    def truncate(self, rows: int, round: int) -> None:
        """Put the buffer back to its state after `round`: the oldest `rows` records (on disk too) minus what
        manifests up to `round` superseded. A resumed run drops what an unfinished round added. An empty
        buffer has no file, as a new one."""
        self._rows = self._rows[:rows]
        self._hashes = {t.content_hash for t in self._rows}
        self._superseded = self._superseded_up_to(round)
        self._dropped = []
        if self.path.exists() and not self._rows:
            self.path.unlink()
        elif self.path.exists():
            write_jsonl(self.path, self._rows)

    def commit(self, round: int, added: list[Trajectory], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the records, then this round's manifest (with `extra` fields), each atomically; returns it."""
        write_jsonl(self.path, self._rows)
        records = self.records
        manifest = {
            "round": round,
            "count": len(records),
            "rows": len(self._rows),
            "added": len(added),
            "added_hashes": [t.content_hash for t in added],
            "superseded_hashes": list(self._dropped),
            "sources": dict(Counter(t.policy for t in records)),
            "successes": sum(t.success for t in records),
            **(extra or {}),
        }
        write_json(self.root / f"manifest_{round}.json", manifest)
        self._dropped = []
        return manifest

    def _superseded_up_to(self, round: int | None) -> set[str]:
        """Hashes superseded by the manifests of rounds ≤ `round` (None: every manifest on disk)."""
        gone: set[str] = set()
        for path in self.root.glob("manifest_*.json"):
            if round is None or int(path.stem.split("_", 1)[1]) <= round:
                gone.update(json.loads(path.read_text()).get("superseded_hashes", []))
        return gone
