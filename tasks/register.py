"""Task `register`: each round's global adapter becomes a version of the registered model `fedse-global`.

The version's tags carry what a reader needs to compare versions side by side and to trace one back to its
data: experiment, method, round, seed, the adapter's sha256 and size, its success per environment, and the
DVC hash of every client buffer that fed it. Alias `champion` marks the version with the best macro success.
"""

from typing import Any

from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.track import Tracking

MODEL = "fedse-global"
CHAMPION = "champion"


def version_tags(tracking: Tracking, method: str, round: int, seed: int, adapter: dict[str, Any],
                 record: dict[str, Any], buffers: dict[str, str]) -> dict[str, str]:
    tags = {"experiment": tracking.name, "method": method, "round": str(round), "seed": str(seed),
            "adapter_sha256": adapter["sha256"], "adapter_bytes": str(adapter["bytes"]),
            "micro": f"{record['micro']:.6f}", "macro": f"{record['macro']:.6f}", "parent_run_id": tracking.run_id}
    tags |= {f"success.{env}": f"{s['success']:.6f}" for env, s in record["envs"].items()}
    tags |= {f"buffer.{client}": digest for client, digest in buffers.items()}
    return tags


@task(name="register", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE, task_run_name="register-round-{round}")
def register(tracking: Tracking, round_run: str, round: int, method: str, seed: int, adapter: dict[str, Any],
             record: dict[str, Any], buffers: dict[str, str], model: str = MODEL) -> str:
    """Log the adapter folder to the round's run, register it, tag it, and move `champion` if it is best."""
    client = tracking.client()
    client.log_artifacts(round_run, adapter["path"], "adapter")
    try:
        client.create_registered_model(model, description="Fed-SE global LoRA adapters, one version per round")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(round_run).info.artifact_uri}/adapter"
    version = client.create_model_version(model, source, run_id=round_run,
                                          tags=version_tags(tracking, method, round, seed, adapter, record, buffers))
    best = max(client.search_model_versions(f"name='{model}'"), key=lambda v: float(v.tags.get("macro", "-1")))
    client.set_registered_model_alias(model, CHAMPION, best.version)
    return version.version
