"""Task `train`: local SFT from the round's start adapter on the client's data; returns the upload.

Tagged `gpu`: a Prefect concurrency limit on that tag (`make serve` creates one of 1) queues train tasks for
the device while other clients' rollouts go on.
"""

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedse.config import Config
from fedse.federation import AdapterState, local_train, personal_start
from fedse.learner import TrainStats
from tasks.agent import borrowed
from tasks.buffer import ClientData


@task(name="train", tags=["gpu"], retries=1, cache_policy=NO_CACHE, task_run_name="train-{client}-round-{round}")
def train(cfg: Config, start: AdapterState, data: ClientData, round: int, client: str,
          own: AdapterState | None = None) -> tuple[AdapterState, TrainStats]:
    """SFT from the broadcast adapter (with the client's `own` part under `aggregation.personal`)."""
    with borrowed(cfg) as agent:
        return local_train(agent, cfg, personal_start(cfg, start, own), data.records, cfg.seed * 1_000 + round)
