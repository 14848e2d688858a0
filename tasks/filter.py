"""Task `filter`: the binary success filter (or, for the w/o-filter ablation, every episode), best-of-k and the
replay pruning of `buffer.prune`."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedse.config import Config
from fedse.federation import keep
from fedse.methods import method
from fedse.trajectory import Trajectory


@task(name="filter", cache_policy=NO_CACHE, task_run_name="filter-{client}-round-{round}")
def success_filter(cfg: Config, fresh: list[Trajectory], env: str, client: str, round: int) -> list[Trajectory]:
    return keep(fresh, method(cfg.federation.method), cfg.federation.explore_attempts, cfg.buffer.prune,
                cfg.envs.options.get(env))
