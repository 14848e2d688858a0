"""MLflow tracking: one parent run per experiment (a flow run), one nested run per round.

Everything goes through `MlflowClient` with explicit run ids, never the fluent API's thread-local "active
run", because tasks run in worker threads or processes.
"""

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from prefect import task
from prefect.cache_policies import NO_CACHE

from fedse.atomic import write_json
from fedse.config import Config
from fedse.transport import Upload

TAG_CHUNK = 5000  # MLflow tag values hold at most 8000 characters
REMEMBERED = "tracking.json"  # in the run folder: which parent run a resumed flow run continues


@dataclass(frozen=True)
class Tracking:
    """Where a flow run records itself: the tracking URI, the experiment, and the parent run."""

    uri: str
    experiment_id: str
    run_id: str
    name: str  # experiment name, e.g. fedse-smoke

    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    def remember(self, folder: Path) -> None:
        """Note this parent run in the run folder, so that resuming the run continues it instead of a new one."""
        write_json(Path(folder) / REMEMBERED, asdict(self))


def reopen(uri: str, folder: Path) -> Tracking | None:
    """The parent run a killed run folder was tracked in (its tracking.json), marked RUNNING again; None when
    the folder was not tracked, or tracked at another URI (a new parent run is opened then)."""
    path = Path(folder) / REMEMBERED
    if not path.exists():
        return None
    saved = Tracking(**json.loads(path.read_text()))
    if saved.uri != uri:
        return None
    client = saved.client()
    client.update_run(saved.run_id, status="RUNNING")
    client.set_tag(saved.run_id, "resumed", "true")
    return saved


def round_run(tracking: Tracking, round: int) -> str | None:
    """The nested run of `round` when it was tracked to the end; one a crash left unfinished (RUNNING, or
    closed as FAILED/KILLED) is deleted so the round is tracked again, once."""
    client = tracking.client()
    runs = client.search_runs([tracking.experiment_id], f"tags.mlflow.parentRunId = '{tracking.run_id}' "
                              f"and tags.round = '{round}'")
    done = [r.info.run_id for r in runs if r.info.status == "FINISHED"]
    if done:
        return done[0]
    for run in runs:
        client.delete_run(run.info.run_id)
    return None


def flat_params(cfg: Config) -> dict[str, str]:
    """The settings a reader compares runs by, flattened to MLflow params (strings, ≤ 6000 chars)."""
    fed = cfg.federation
    params: dict[str, Any] = {"method": fed.method, "profile": cfg.profile, "seed": cfg.seed,
                              "model": cfg.model.preset, "clients": ",".join(cfg.client_envs())}
    params |= {f"federation.{k}": v for k, v in fed.model_dump(exclude={"out", "method", "clients"}).items()}
    params |= {f"learner.{k}": v for k, v in cfg.learner.model_dump().items()}
    params |= {f"lora.{k}": v for k, v in cfg.model.lora.model_dump().items()}
    params |= {"transport.backend": cfg.transport.backend, "transport.dtype": cfg.transport.dtype}
    params |= {f"aggregation.{k}": v for k, v in cfg.aggregation_info().items()}
    params |= {"eval.passes": cfg.eval.model_dump().get("passes", 1)}
    return {k: str(v) for k, v in params.items()}


@task(name="track-experiment", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def open_experiment(cfg: Config, uri: str, experiment: str, flow_run: str) -> Tracking:
    """The experiment (created once) and this flow run's parent MLflow run, with params and tags."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found and found.artifact_location.startswith("mlflow-artifacts:") and not uri.startswith("http"):
        raise ValueError(f"MLflow experiment {experiment} keeps its artifacts behind the MLflow server "
                         f"({found.artifact_location}); track through the server (make serve, tracking URI "
                         "http://127.0.0.1:5000) or use another experiment name")
    experiment_id = found.experiment_id if found else client.create_experiment(experiment,
                                                                               artifact_location=artifacts_for(uri))
    name = f"{cfg.federation.method}-s{cfg.seed}"
    run = client.create_run(experiment_id, run_name=name, tags={
        "method": cfg.federation.method, "profile": str(cfg.profile), "seed": str(cfg.seed),
        "prefect.flow_run_id": flow_run, MLFLOW_RUN_NAME: name})
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flat_params(cfg).items()])
    return Tracking(uri, experiment_id, run.info.run_id, experiment)


def artifacts_for(uri: str) -> str | None:
    """Artifacts of a store used without a server (sqlite:///…/mlflow.db) go next to it, in `artifacts/`;
    a server decides its own (`make serve`: bucket `mlflow` of its object store, proxied by the server)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "artifacts").as_uri()


def round_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A round's record (as in metrics.json) as flat MLflow metric names."""
    metrics = {"micro": record["micro"], "macro": record["macro"]}
    metrics |= {f"success.{env}": s["success"] for env, s in record["envs"].items()}
    for client, stats in record.get("clients", {}).items():
        for key in ("explored", "explore_success", "added", "buffer", "trained_on", "successes_trained_on",
                    "steps", "tokens", "loss_first", "loss_last", "train_seconds", "bytes_sent", "self_share",
                    "length_ratio", "explore_decisions", "explore_seconds"):
            value = stats.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                metrics[f"client.{client}.{key}"] = float(value)
    if "bytes_sent" in record.get("global", {}):
        metrics["global.bytes_sent"] = float(record["global"]["bytes_sent"])
    if "seconds" in record:
        metrics["round_seconds"] = record["seconds"]
    for key in ("agg_error", "retained_energy", "clients"):  # how exact the server's rule was, over how many
        value = record.get("aggregation", {}).get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            metrics[f"aggregation.{key}"] = float(value)
    metrics |= privacy_metrics(record)
    if "aggregation" in record:
        metrics["aggregation.rejected"] = float(len(record["aggregation"].get("rejected", [])))
        metrics["aggregation.unexpected_objects"] = float(len(record["aggregation"].get("unexpected_objects", [])))
    return metrics


def privacy_metrics(record: dict[str, Any]) -> dict[str, float]:
    """(ε, δ) spent so far, per DP mode (`privacy.client.*`, `privacy.record.*`, and each client's record ε),
    and each client's DP-SGD batch and clipped share: the privacy curve next to the success curve."""
    metrics: dict[str, float] = {}
    for kind, dp in record.get("privacy", {}).items():
        for key in ("epsilon", "round_epsilon", "delta", "noise", "sample_rate"):
            if isinstance(dp.get(key), int | float):
                metrics[f"privacy.{kind}.{key}"] = float(dp[key])
        for client, eps in (dp.get("clients") or {}).items() if kind == "record" else ():
            metrics[f"privacy.record.{client}.epsilon"] = float(eps)
    for client, stats in record.get("clients", {}).items():
        for key in ("mean_batch", "clipped_share"):
            value = (stats.get("privacy") or {}).get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                metrics[f"client.{client}.dp_{key}"] = float(value)
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def absence_tags(record: dict[str, Any]) -> dict[str, str]:
    """`rejected.<client>` and `missing.<client>`: who the server aggregated without this round, and why."""
    agg = record.get("aggregation", {})
    tags = {f"rejected.{r['client']}": r["reason"][:TAG_CHUNK] for r in agg.get("rejected", [])}
    return tags | {f"missing.{client}": why[:TAG_CHUNK] for client, why in agg.get("missing", {}).items()}


def egress_tags(uploads: dict[str, Upload]) -> dict[str, str]:
    """What left each client this round, as tags `egress.<sender>.<field>`: sha256, bytes, dtype, object key,
    metadata (JSON), tensor count, and the tensor names and shapes as JSON split over `tensors.<i>` tags
    (concatenate them in order)."""
    tags: dict[str, str] = {}
    for upload in uploads.values():
        base = f"egress.{upload.sender}"
        tags |= {f"{base}.sha256": upload.sha256, f"{base}.bytes": str(upload.bytes), f"{base}.dtype": upload.dtype,
                 f"{base}.object": upload.key, f"{base}.metadata": json.dumps(upload.metadata, sort_keys=True),
                 f"{base}.tensor_count": str(len(upload.tensors))}
        listing = json.dumps(upload.tensors, separators=(",", ":"))
        tags |= {f"{base}.tensors.{i // TAG_CHUNK}": listing[i:i + TAG_CHUNK]
                 for i in range(0, len(listing), TAG_CHUNK)}
    return tags


@task(name="track-round", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      task_run_name="track-round-{round}")
def log_round(tracking: Tracking, round: int, record: dict[str, Any], egress: dict[str, Upload] | None = None) -> str:
    """A nested run for the round (its metrics, and what each client uploaded as `egress.*` tags), and the
    same metrics on the parent at step = round."""
    client = tracking.client()
    run = client.create_run(tracking.experiment_id, run_name=f"round-{round}", tags={
        MLFLOW_PARENT_RUN_ID: tracking.run_id, "round": str(round), MLFLOW_RUN_NAME: f"round-{round}",
        **egress_tags(egress or {}), **absence_tags(record)})
    metrics = round_metrics(record)
    stamp = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, stamp, round) for k, v in metrics.items()])
    client.log_batch(tracking.run_id, metrics=[Metric(k, v, stamp, round) for k, v in metrics.items()])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def ended_as(exc: BaseException) -> str:
    """MLflow's status for a flow that stopped on `exc`: KILLED when it was stopped (cancellation, SIGTERM,
    Ctrl-C: not an Exception), FAILED when it broke."""
    return "FAILED" if isinstance(exc, Exception) else "KILLED"


def close_unfinished(tracking: Tracking, status: str, reason: str) -> None:
    """Mark the parent run and any nested round run still RUNNING as ended with `status`, the reason as tag
    `failure`, so a failed or cancelled flow leaves nothing that looks alive. A plain call, not a task: it
    runs while the flow is failing or being cancelled."""
    client = tracking.client()
    nested = client.search_runs([tracking.experiment_id], f"tags.mlflow.parentRunId = '{tracking.run_id}' "
                                "and attributes.status = 'RUNNING'")
    for run_id in [r.info.run_id for r in nested] + [tracking.run_id]:
        client.set_tag(run_id, "failure", reason[:TAG_CHUNK])
        client.set_terminated(run_id, status=status)


@task(name="track-finish", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def finish(tracking: Tracking, metrics_path: str, status: str = "FINISHED") -> None:
    client = tracking.client()
    client.log_artifact(tracking.run_id, metrics_path)
    client.set_terminated(tracking.run_id, status=status)

