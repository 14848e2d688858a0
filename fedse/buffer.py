"""A client's experience buffer: the successful trajectories it has gathered so far, and what fed each round.

Fed-SE keeps only episodes the environment marked successful (the binary success filter) and lets the
buffer grow across rounds (D_k,t = D_k,t-1 ∪ new successes), starting from the client's expert seeds. Records
are de-duplicated by content hash, so an episode found again in a later round is not trained on twice.

On disk a buffer is one folder: `buffer.jsonl` (every record, oldest first) and `manifest_<round>.json` per
round (count, hashes, sources). Both are replaced atomically (temp file + rename), so a crash at any point
leaves the previous round's buffer readable and complete.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedse.atomic import write_json
from fedse.trajectory import Trajectory, read_jsonl, write_jsonl

RECORDS = "buffer.jsonl"


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
        self._records: list[Trajectory] = list(read_jsonl(self.path)) if self.path.exists() else []
        self._hashes = {t.content_hash for t in self._records}

    def __len__(self) -> int:
        return len(self._records)

    @property
    def records(self) -> list[Trajectory]:
        return list(self._records)

    def add(self, trajectories: Iterable[Trajectory]) -> list[Trajectory]:
        """Stage new records in memory; returns the ones that were not already held (by content hash)."""
        fresh = []
        for traj in trajectories:
            if traj.content_hash not in self._hashes:
                self._hashes.add(traj.content_hash)
                fresh.append(traj)
        self._records.extend(fresh)
        return fresh

    def truncate(self, count: int) -> None:
        """Keep the oldest `count` records (on disk too): a resumed run drops what an unfinished round added.
        An empty buffer has no file, as a new one."""
        self._records = self._records[:count]
        self._hashes = {t.content_hash for t in self._records}
        if self.path.exists() and not self._records:
            self.path.unlink()
        elif self.path.exists():
            write_jsonl(self.path, self._records)

    def commit(self, round: int, added: list[Trajectory], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the records, then this round's manifest (with `extra` fields), each atomically; returns it."""
        write_jsonl(self.path, self._records)
        manifest = {
            "round": round,
            "count": len(self._records),
            "added": len(added),
            "added_hashes": [t.content_hash for t in added],
            "sources": dict(Counter(t.policy for t in self._records)),
            "successes": sum(t.success for t in self._records),
            **(extra or {}),
        }
        write_json(self.root / f"manifest_{round}.json", manifest)
        return manifest
