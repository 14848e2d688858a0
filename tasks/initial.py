"""Task `initial`: the adapter every run starts from (seeded LoRA init, `tasks.agent.fresh_adapter`), made
where the models are. The flow's driver needs it for round 0 and the server step, but loads no model of its
own: with a process pool or Dask this task runs in a worker process that holds one anyway (with the thread
pool, in the flow's own process, whose one model the tasks share)."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedse.config import Config
from fedse.federation import AdapterState
from tasks.agent import fresh_adapter


@task(name="initial", cache_policy=NO_CACHE, task_run_name="initial-adapter")
def initial_adapter(cfg: Config) -> AdapterState:
    return fresh_adapter(cfg)
