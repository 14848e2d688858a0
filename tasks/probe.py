"""Task `placement`: what the process that runs a client's tasks sees (its pid and CUDA_VISIBLE_DEVICES), so
the flow can check and record that placement pinned each client's process to its own device
(flows/round_loop.py `check_placement`)."""

import os
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedse.placement import VISIBLE


@task(name="placement", cache_policy=NO_CACHE, task_run_name="placement-{client}")
def probe(client: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "visible": os.environ.get(VISIBLE)}
