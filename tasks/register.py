"""Task `register`: each round's global adapter becomes a version of the registered model `fedse-global`.

The version's tags carry what a reader needs to compare versions side by side and to trace one back to its
data: experiment, method, round, seed, the adapter's sha256 and size, its success per environment, and the
DVC hash of every client buffer that fed it, and the task set its figures were measured on (`task_set`).

A success figure means something only next to the tasks it was measured on: a smoke run's 4 tasks per
environment and a quick run's 25 × 2 passes are not comparable, and a round scored on 10 tasks is not
comparable with one scored on 25. So versions compete only within their task set: alias
`champion-<task set>` marks the best macro success among the versions measured on exactly that set (same
split, same task ids per environment, same passes), and `fedse compare` shows the set next to each figure.
"""

import hashlib
import json
import re
from typing import Any

from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.track import Tracking

MODEL = "fedse-global"
CHAMPION = "champion"


def task_set(profile: str | None, split: str, passes: int, record: dict[str, Any]) -> str:
    """The evaluation's identity as a readable alias suffix: profile, split, tasks per environment × passes,
    and a short hash of the exact task ids, e.g. `quick-test-25x2-3f9a1c`."""
    ids = {env: s.get("task_ids") for env, s in sorted(record["envs"].items())}
    digest = hashlib.sha256(json.dumps({"split": split, "passes": passes, "task_ids": ids},
                                       sort_keys=True).encode()).hexdigest()[:6]
    sizes = "-".join(str(n) for n in sorted({len(v or []) for v in ids.values()}))
    name = re.sub(r"[^a-z0-9]+", "-", str(profile or "base").lower()).strip("-") or "base"
    return f"{name}-{split}-{sizes}x{passes}-{digest}"


def version_tags(tracking: Tracking, method: str, round: int, seed: int, adapter: dict[str, Any],
                 record: dict[str, Any], buffers: dict[str, str], evaluated_on: str) -> dict[str, str]:
    tags = {"experiment": tracking.name, "method": method, "round": str(round), "seed": str(seed),
            "task_set": evaluated_on,
            "adapter_sha256": adapter["sha256"], "adapter_bytes": str(adapter["bytes"]),
            "micro": f"{record['micro']:.6f}", "macro": f"{record['macro']:.6f}", "parent_run_id": tracking.run_id}
    tags |= {f"success.{env}": f"{s['success']:.6f}" for env, s in record["envs"].items()}
    tags |= {f"buffer.{client}": digest for client, digest in buffers.items()}
    for kind, dp in record.get("privacy", {}).items():  # what this version's training spent (DP on)
        tags |= {f"privacy.{kind}.epsilon": f"{dp['epsilon']:.6g}", f"privacy.{kind}.delta": f"{dp['delta']:g}"}
    return tags


def registered(tracking: Tracking, round: int, model: str = MODEL) -> bool:
    """Whether this parent run's round already has its registered version (a resumed flow does not add a
    second one)."""
    client = tracking.client()
    try:
        found = client.search_model_versions(f"name='{model}' and tag.parent_run_id = '{tracking.run_id}' "
                                             f"and tag.round = '{round}'")
    except MlflowException:
        return False
    return bool(found)


@task(name="register", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE, task_run_name="register-round-{round}")
def register(tracking: Tracking, round_run: str, round: int, method: str, seed: int, adapter: dict[str, Any],
             record: dict[str, Any], buffers: dict[str, str], evaluated_on: str, model: str = MODEL) -> str:
    """Log the adapter folder to the round's run, register it, tag it with the task set it was scored on
    (`evaluated_on`, from `task_set`), and move that set's champion alias if it is the set's best."""
    client = tracking.client()
    client.log_artifacts(round_run, adapter["path"], "adapter")
    try:
        client.create_registered_model(model, description="Fed-SE global LoRA adapters, one version per round")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(round_run).info.artifact_uri}/adapter"
    version = client.create_model_version(model, source, run_id=round_run,
                                          tags=version_tags(tracking, method, round, seed, adapter, record, buffers,
                                                            evaluated_on))
    rivals = client.search_model_versions(f"name='{model}' and tag.task_set = '{evaluated_on}'")
    best = max(rivals, key=lambda v: float(v.tags.get("macro", "-1")))
    client.set_registered_model_alias(model, f"{CHAMPION}-{evaluated_on}", best.version)
    return version.version
