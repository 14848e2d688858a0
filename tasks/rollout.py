"""Task `rollout`: a client plays this round's train tasks with the broadcast adapter (temperature policy).

Safe to retry: the episodes are seeded by (seed, round), so a retry replays the same ones.
"""

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedse.config import Config
from fedse.federation import AdapterState, explore
from fedse.trajectory import Trajectory
from tasks.agent import borrowed


@task(name="rollout", retries=1, cache_policy=NO_CACHE, task_run_name="rollout-{client}-round-{round}")
def rollout(cfg: Config, env: str, start: AdapterState, round: int, client: str | None = None) -> list[Trajectory]:
    """Client `client` (default: the one named after `env`) plays its train tasks of `env`."""
    with borrowed(cfg) as agent:
        return explore(agent, cfg, env, start, round, cfg.seed, client=client)
