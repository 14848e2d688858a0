"""Trajectory records: what an episode was (content) and where it came from (provenance).

The content hash covers only what the agent saw and did, so the same episode found twice (by the expert and
later by the agent, or in two rounds) de-duplicates in the buffer whatever its provenance says.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import BaseModel, Field

from fedse.atomic import atomic_file


class Turn(BaseModel):
    """One agent turn: the observation it acted on, its reasoning (ReAct) and the action it typed."""

    observation: str
    action: str
    thought: str = ""


class Trajectory(BaseModel):
    """One finished episode with its provenance."""

    env: str
    task_id: int
    instruction: str
    turns: list[Turn]
    final_observation: str
    reward: float
    success: bool
    policy: str = Field(description="expert, random, human or agent")
    adapter_hash: str | None = None
    round: int | None = None
    seed: int | None = None
    temperature: float | None = None
    content_hash: str = ""

    def model_post_init(self, _context: object) -> None:
        if not self.content_hash:
            self.content_hash = content_hash(self)


def content_hash(traj: Trajectory) -> str:
    """sha256 over env, task, turns and outcome — never over provenance."""
    payload = {
        "env": traj.env,
        "task_id": traj.task_id,
        "turns": [[t.observation, t.thought, t.action] for t in traj.turns],
        "final": traj.final_observation,
        "reward": traj.reward,
        "success": traj.success,
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def write_jsonl(path: Path, trajectories: Iterable[Trajectory]) -> int:
    """Write all records to `path` atomically (temp file + rename); returns the count written."""
    count = 0
    with atomic_file(path) as fh:
        for traj in trajectories:
            fh.write(traj.model_dump_json() + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> Iterator[Trajectory]:
    """Records of a JSONL file; a malformed line is reported with its file and line number."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield Trajectory.model_validate_json(line)
                except ValueError as exc:
                    raise ValueError(f"{path}:{number}: not a trajectory record ({exc.__class__.__name__})") \
                        from None
