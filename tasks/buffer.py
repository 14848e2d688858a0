"""Task `buffer`: add the kept episodes to the client's cumulative buffer and commit this round's manifest.

Safe to retry: the buffer reloads from disk, de-duplicates by content hash and commits atomically, so a retry
after a failure adds nothing twice.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedse.buffer import Buffer
from fedse.config import Config
from fedse.federation import client_data, client_seeds, task_key
from fedse.methods import method
from fedse.trajectory import Trajectory


@dataclass
class ClientData:
    """What a client trains on this round, and the buffer manifest that describes it."""

    records: list[Trajectory]
    manifest: dict[str, Any]
    root: str


@task(name="buffer", retries=1, cache_policy=NO_CACHE, task_run_name="buffer-{client}-round-{round}")
def update_buffer(cfg: Config, root: str, kept: list[Trajectory], round: int, client: str,
                  envs: list[str]) -> ClientData:
    data, manifest = client_data(Buffer(Path(root)), kept, round, method(cfg.federation.method),
                                 client_seeds(cfg, client, envs, round), cfg.envs.options.get(envs[0]),
                                 cfg.buffer.keep, task_key(cfg), cfg.federation.own_cap)
    return ClientData(data, manifest, root)
