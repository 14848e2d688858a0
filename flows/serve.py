"""Serve deployment `round-loop` of flow `fedse` (`python -m flows`), against the Prefect API in the
environment (PREFECT_API_URL; `make serve` starts one).

The task runner comes from `orchestration:` in params.yaml, read once here, placed on the devices this machine
shows (or `orchestration.gpus`; flows/placement.py). Train tasks carry the tag `gpu`; its concurrency limit
(`orchestration.gpu_slots`, at least one per device) and one of 1 per device tag `gpu-<device>` are created (or
updated) on the server before serving.
With an object store in the environment (FEDSE_S3_ENDPOINT; `make serve` sets it) the deployment exchanges
adapters through it: its default parameter `transport` is `s3`.
"""

import os

from fedse.config import load_config
from fedse.placement import placed_devices
from flows.placement import device_limits
from flows.round_loop import configured

DEPLOYMENT = "round-loop"


def main() -> None:
    params = os.environ.get("FEDSE_PARAMS", "params.yaml")
    cfg = load_config(params)
    device_limits(placed_devices(cfg.orchestration), cfg.orchestration.gpu_slots)
    flow = configured(cfg.orchestration)
    defaults = {"params": params, "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI"), "dvc_repo": os.getcwd(),
                "transport": "s3" if os.environ.get("FEDSE_S3_ENDPOINT") else None}
    flow.serve(name=DEPLOYMENT, parameters=defaults, description="Fed-SE round loop: python -m flows")


if __name__ == "__main__":
    main()
