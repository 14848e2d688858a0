"""Task `filter`: the binary success filter (or, for the w/o-filter ablation, every episode)."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedse.federation import keep
from fedse.methods import method
from fedse.trajectory import Trajectory


@task(name="filter", cache_policy=NO_CACHE, task_run_name="filter-{client}-round-{round}")
def success_filter(fresh: list[Trajectory], method_name: str, client: str, round: int,
                   attempts: int = 1) -> list[Trajectory]:
    return keep(fresh, method(method_name), attempts)
