"""Task `evaluate`: greedy success of an adapter on one environment's evaluation tasks.

Safe to retry: greedy episodes on fixed task ids are deterministic.
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
