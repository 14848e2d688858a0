"""Task `rollout`: a client plays this round's train tasks with the broadcast adapter (temperature policy).

Safe to retry: the episodes are seeded by (seed, round), so a retry replays the same ones.
"""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedse.buffer import Buffer
from fedse.config import Config
from fedse.federation import AdapterState, explore, personal_start
from fedse.trajectory import Trajectory
from tasks.agent import borrowed


@task(name="rollout", retries=1, cache_policy=NO_CACHE, task_run_name="rollout-{client}-round-{round}")
def rollout(cfg: Config, env: str, start: AdapterState, round: int, client: str | None = None,
            buffer_root: str | None = None, own: AdapterState | None = None) -> list[Trajectory]:
    """Client `client` (default: the one named after `env`) plays its train tasks of `env` (passing over the
    tasks its buffer at `buffer_root` has solved, with `federation.explore_unsolved`), from the broadcast
    adapter (with its `own` part under `aggregation.personal`)."""
    with borrowed(cfg) as agent:
        buffer = Buffer(Path(buffer_root)) if buffer_root else None
        return explore(agent, cfg, env, personal_start(cfg, start, own), round, cfg.seed, client=client,
                       buffer=buffer)
