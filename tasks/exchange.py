"""Tasks `upload` and `download_global`: the client's side of the adapter exchange (`fedse.transport`).

A client uploads its trained adapter (and logs what left it in its egress log) and, from the second round
on, starts from the global adapter it downloads itself, acting with its own credentials. The server's side
(download every upload, verify, average, publish) is task `aggregate`. Both are safe to retry: an upload
rewrites the same keys, manifest last; a download only reads.
"""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedse.config import Config
from fedse.federation import AdapterState, send_update, successes
from fedse.learner import TrainStats
from fedse.transport import Transport, Upload
from tasks.buffer import ClientData


@task(name="upload", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE,
      task_run_name="upload-{client}-round-{round}")
def upload(exchange: Transport, cfg: Config, folder: str, trained: tuple[AdapterState, TrainStats],
           data: ClientData, round: int, client: str) -> Upload:
    return send_update(exchange, cfg, Path(folder), round, client, trained[0], successes(data.records),
                       dp=trained[1].privacy)


@task(name="download_global", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE,
      task_run_name="download-global-{client}-round-{round}")
def download_global(exchange: Transport, round: int, client: str) -> AdapterState:
    """The global adapter published after round `round - 1`, as client `client` receives it."""
    return exchange.fetch_global(round - 1, client)
