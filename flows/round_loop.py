"""Flow `fedse`: the round loop of `fedse.federation`, with every step a Prefect task.

Each round maps the client chain (download_global →) rollout → filter → buffer → train → upload over the
clients (rollout, train and the transfers retried `orchestration.retries` times with exponential backoff),
waits for them until `federation.client_timeout`, then aggregates what arrived (the server downloads the
uploads from the exchange, screens them, and needs `federation.quorum` of them; a failed, late or rejected
client is recorded as missing with its reason), registers and evaluates the global adapter;
the next round starts only after this one's aggregation and registration have completed. It writes the same
`metrics.json` as `fedse run`, so `fedse report` reads either. Parameter `transport` picks the exchange's
backend (`s3` in the served deployment; default: params.yaml's `transport.backend`, a local folder).

No `from __future__ import annotations` here: Prefect validates flow parameters from the annotations.
"""

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.context import get_run_context
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from fedse.atomic import write_json
from fedse.config import Config, OrchestrationConfig, run_config
from fedse.evaluate import summarise
from fedse.federation import (
    AdapterState,
    client_groups,
    document,
    eval_state,
    exchange_info,
    failure,
    open_exchange,
    start_state,
    successes,
    update_stats,
)
from fedse.methods import Method
from fedse.methods import method as method_of
from fedse.transport import Transport, Upload
from tasks.agent import borrowed, fresh_adapter
from tasks.aggregate import aggregate
from tasks.buffer import update_buffer
from tasks.evaluate import evaluate
from tasks.exchange import download_global, upload
from tasks.filter import success_filter
from tasks.register import register, task_set
from tasks.rollout import rollout
from tasks.track import close_unfinished, ended_as, finish, log_round, open_experiment
from tasks.train import train
from tasks.version_buffer import version_buffer


def run_folder(cfg: Config, out: str | None, flow_run: str) -> Path:
    name = f"{cfg.federation.method}-{cfg.profile}-s{cfg.seed}-{flow_run[:8]}"
    folder = Path(out) if out else cfg.federation.out / "flows" / name
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder}: already holds a run; choose another out or delete it")
    return folder


@flow(name="fedse", log_prints=True)
def round_loop(method: str = "fedse", profile: str = "smoke", seed: int = 0, params: str = "params.yaml",
               sets: list[str] | None = None, out: str | None = None, tracking_uri: str | None = None,
               experiment: str | None = None, dvc_repo: str | None = None,
               transport: str | None = None) -> dict[str, Any]:
    """One experiment: `federation.rounds` rounds of `method` under `profile`; returns metrics.json."""
    chosen = [f"transport.backend={transport}"] if transport else []  # before `sets`: an explicit override wins
    cfg = run_config(params, profile, method, seed, [*chosen, *(sets or [])])
    how = method_of(cfg.federation.method)
    flow_run = str(get_run_context().flow_run.id)
    folder = run_folder(cfg, out, flow_run)
    exchange = open_exchange(cfg, folder)
    tracking = open_experiment(cfg, tracking_uri, experiment or f"fedse-{cfg.profile}", flow_run) \
        if tracking_uri else None
    initial = fresh_adapter(cfg)
    with borrowed(cfg) as agent:
        model = agent.name
    groups = client_groups(cfg, how)
    total = cfg.federation.rounds if how.train else 1
    progress = create_progress_artifact(0.0, key=_key(f"fedse-progress-{flow_run}"),
                                        description=f"{how.name}: rounds completed of {total}")
    global_state, own, rounds = initial, {}, []
    server: dict[str, Any] = {"momentum": None}  # what the server carries across rounds (FedAvgM)
    try:
        for round in range(total):
            started = time.perf_counter()
            record: dict[str, Any] = {"round": round}
            adapter, buffers, egress = None, {}, {}
            if how.train:
                global_state, adapter, buffers, egress = one_round(cfg, how, groups, round, global_state, own, initial,
                                                                   folder, record, dvc_repo, exchange, server)
            record.update(evaluate_all(cfg, how, round, global_state, own, initial))
            record["seconds"] = time.perf_counter() - started
            rounds.append(record)
            write_json(folder / "metrics.json",
                       document(cfg, model, rounds, round == total - 1, exchange_info(exchange)))
            if tracking is not None:
                round_run = log_round(tracking, round, record, egress)
                if adapter is not None:
                    scored_on = task_set(cfg.profile, cfg.federation.eval_split, cfg.eval.passes, record)
                    version = register(tracking, round_run, round, how.name, cfg.seed, adapter, record, buffers,
                                       scored_on)
                    get_run_logger().info("round %d: registered fedse-global version %s", round, version)
            create_table_artifact(_table(record), key=_key(f"fedse-round-{round}-{flow_run}"),
                                  description=f"{how.name} round {round}: success per environment")
            update_progress_artifact(progress, 100.0 * (round + 1) / total)
        if tracking is not None:
            finish(tracking, str(folder / "metrics.json"))
    except BaseException as exc:
        if tracking is not None:  # no MLflow run of a failed or cancelled flow may stay RUNNING
            close_unfinished(tracking, ended_as(exc), failure(exc))
        raise
    print(f"metrics: {folder / 'metrics.json'}")
    return document(cfg, model, rounds, True, exchange_info(exchange)) | {"out": str(folder)}


def one_round(cfg: Config, how: Method, groups: list[tuple[str, list[str]]], round: int, global_state: AdapterState,
              own: dict[str, AdapterState], initial: AdapterState, folder: Path, record: dict[str, Any],
              dvc_repo: str | None, exchange: Transport | None, server: dict[str, Any]) \
        -> tuple[AdapterState, dict[str, Any] | None, dict[str, str], dict[str, Upload]]:
    """Map the client chain, collect every result (a failure raises here), then aggregate.

    Returns the new global adapter, where it was saved, the DVC hash of each client's buffer version, and
    what each client uploaded (its egress record)."""
    retry = {"retries": cfg.orchestration.retries,
             "retry_delay_seconds": exponential_backoff(backoff_factor=cfg.orchestration.retry_delay)}
    chains = []
    for name, envs in groups:
        start = download_global.with_options(**retry).submit(exchange, round, name) \
            if exchange is not None and round > 0 else start_state(how, global_state, own.get(name), initial)
        fresh = rollout.with_options(**retry).submit(cfg, envs[0], start, round) if how.explore else None
        kept = success_filter.submit(fresh if fresh is not None else [], how.name, name, round,
                                     cfg.federation.explore_attempts)
        data = update_buffer.submit(cfg, str(folder / "buffers" / name), kept, round, name, envs)
        versioned = version_buffer.submit(dvc_repo, data, name, round) if dvc_repo else None
        trained = train.with_options(**retry).submit(cfg, start, data, round, name)
        sent = upload.with_options(**retry).submit(exchange, cfg, str(folder), trained, data, round, name) \
            if exchange else None
        chains.append((name, fresh, data, trained, versioned, sent))
    deadline = time.monotonic() + cfg.federation.client_timeout if cfg.federation.client_timeout else None
    updates, stats, buffers, egress, missing = [], {}, {}, {}, {}
    for name, fresh, data, trained, versioned, sent in chains:
        try:
            if deadline is not None and not finished_by(sent or trained, deadline):
                missing[name] = f"timed out: no upload within federation.client_timeout = " \
                                f"{cfg.federation.client_timeout:g} s"
                continue
            # upstream first, so a failure raises its own error rather than a downstream task's "not ready"
            fresh_list = fresh.result() if fresh is not None else []
            client_data = data.result()
            if versioned is not None:
                buffers[name] = versioned.result()
            state, train_stats = trained.result()
            if sent is not None:
                egress[name] = sent.result()
        except Exception as exc:
            if not how.federated:  # no server to go on without this client
                raise
            missing[name] = failure(exc)
            continue
        own[name] = state
        stats[name] = update_stats(fresh_list, client_data.manifest, client_data.records, train_stats, state,
                                   egress.get(name))
        if exchange is None:  # no server: the updates stay in the flow (local keeps them, centralized is one)
            updates.append((name, state, successes(client_data.records)))
    record["clients"] = stats | {name: {"failed": why} for name, why in missing.items()}
    delivered = [name for name, _ in groups if name not in missing]
    new, adapter, server["momentum"], info = aggregate.submit(cfg, updates, global_state, round, str(folder),
                                                              exchange, delivered, server["momentum"],
                                                              missing).result()
    if info:
        record["aggregation"] = info
    if adapter is not None:
        record["global"] = {k: v for k, v in adapter.items() if k != "path"}
    if buffers:
        record["buffers_dvc"] = buffers
    return new, adapter, buffers, egress


def finished_by(future: Any, deadline: float) -> bool:
    """Whether a client's last task ended (in any state) before the round's deadline."""
    future.wait(timeout=max(0.0, deadline - time.monotonic()))
    return future.state.is_final()


def evaluate_all(cfg: Config, how: Method, round: int, global_state: AdapterState, own: dict[str, AdapterState],
                 initial: AdapterState) -> dict[str, Any]:
    futures = {env: evaluate.submit(cfg, eval_state(how, env, own, global_state, initial), env, round)
               for env in cfg.client_envs()}
    return summarise({env: future.result() for env, future in futures.items()})


def _table(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The round's scores, then any client the server aggregated without (rejected or missing) and why."""
    rows = [{"env": env, "success": round(s["success"], 4), "n": s["n"]} for env, s in record["envs"].items()]
    agg = record.get("aggregation", {})
    absent = [{"env": f"rejected: {r['client']}", "success": r["reason"], "n": ""} for r in agg.get("rejected", [])]
    absent += [{"env": f"missing: {c}", "success": why, "n": ""} for c, why in agg.get("missing", {}).items()]
    absent += [{"env": "unexpected object (not read)", "success": key, "n": ""}
               for key in agg.get("unexpected_objects", [])]
    return [*rows, {"env": "micro", "success": round(record["micro"], 4), "n": sum(r["n"] for r in rows)},
            {"env": "macro", "success": round(record["macro"], 4), "n": ""}, *absent]


def _key(text: str) -> str:
    """Artifact keys: lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() or c == "-" else "-" for c in text.lower())


def task_runner(kind: str, workers: int) -> Any:
    return ProcessPoolTaskRunner(max_workers=workers) if kind == "process" else ThreadPoolTaskRunner(workers)


def configured(orchestration: OrchestrationConfig) -> Any:
    """The flow on the task runner `orchestration:` names (what `make run` and the served deployment run)."""
    return round_loop.with_options(task_runner=task_runner(orchestration.task_runner, orchestration.workers))
