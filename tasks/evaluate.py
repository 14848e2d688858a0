"""Task `evaluate`: success of an adapter on one environment's evaluation tasks (at `policy.eval_temperature`).

Safe to retry: episodes on fixed task ids with a fixed seed are deterministic.
"""

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedse.config import Config
from fedse.evaluate import EnvScore
from fedse.federation import AdapterState, evaluate_adapter
from tasks.agent import borrowed


@task(name="evaluate", retries=1, cache_policy=NO_CACHE, task_run_name="evaluate-{env}-round-{round}")
def evaluate(cfg: Config, state: AdapterState, env: str, round: int) -> EnvScore:
    with borrowed(cfg) as agent:
        return evaluate_adapter(agent, cfg, state, env, cfg.seed, round)
