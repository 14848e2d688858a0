"""Flow `fedse`: the round loop of `fedse.federation`, with every step a Prefect task.

Each round maps the client chain rollout → filter → buffer → train over the clients, waits for all of them
(any failed client fails the flow: every future's result is collected), then aggregates, registers and
evaluates the global adapter; the next round starts only after this one's aggregation and registration have
completed. It writes the same `metrics.json` as `fedse run`, so `fedse report` reads either.

No `from __future__ import annotations` here: Prefect validates flow parameters from the annotations.
"""

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.context import get_run_context
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from fedse.atomic import write_json
from fedse.config import Config, run_config
from fedse.evaluate import summarise
from fedse.federation import AdapterState, client_groups, document, eval_state, start_state, successes, update_stats
from fedse.methods import Method
from fedse.methods import method as method_of
from tasks.agent import borrowed, fresh_adapter
from tasks.aggregate import aggregate
from tasks.buffer import update_buffer
from tasks.evaluate import evaluate
from tasks.filter import success_filter
from tasks.register import register
from tasks.rollout import rollout
from tasks.track import finish, log_round, open_experiment
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
               experiment: str | None = None, dvc_repo: str | None = None) -> dict[str, Any]:
    """One experiment: `federation.rounds` rounds of `method` under `profile`; returns metrics.json."""
    cfg = run_config(params, profile, method, seed, sets)
    how = method_of(cfg.federation.method)
    flow_run = str(get_run_context().flow_run.id)
    folder = run_folder(cfg, out, flow_run)
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
    for round in range(total):
        started = time.perf_counter()
        record: dict[str, Any] = {"round": round}
        adapter, buffers = None, {}
        if how.train:
            global_state, adapter, buffers = one_round(cfg, how, groups, round, global_state, own, initial,
                                                       folder, record, dvc_repo)
        record.update(evaluate_all(cfg, how, round, global_state, own, initial))
        record["seconds"] = time.perf_counter() - started
        rounds.append(record)
        write_json(folder / "metrics.json", document(cfg, model, rounds, complete=round == total - 1))
        if tracking is not None:
            round_run = log_round(tracking, round, record)
            if adapter is not None:
                version = register(tracking, round_run, round, how.name, cfg.seed, adapter, record, buffers)
                get_run_logger().info("round %d: registered fedse-global version %s", round, version)
        create_table_artifact(_table(record), key=_key(f"fedse-round-{round}-{flow_run}"),
                              description=f"{how.name} round {round}: success per environment")
        update_progress_artifact(progress, 100.0 * (round + 1) / total)
    if tracking is not None:
        finish(tracking, str(folder / "metrics.json"))
    print(f"metrics: {folder / 'metrics.json'}")
    return document(cfg, model, rounds, complete=True) | {"out": str(folder)}


def one_round(cfg: Config, how: Method, groups: list[tuple[str, list[str]]], round: int, global_state: AdapterState,
              own: dict[str, AdapterState], initial: AdapterState, folder: Path, record: dict[str, Any],
              dvc_repo: str | None) -> tuple[AdapterState, dict[str, Any] | None, dict[str, str]]:
    """Map the client chain, collect every result (a failure raises here), then aggregate.

    Returns the new global adapter, where it was saved, and the DVC hash of each client's buffer version."""
    chains = []
    for name, envs in groups:
        start = start_state(how, global_state, own.get(name), initial)
        fresh = rollout.submit(cfg, envs[0], start, round) if how.explore else None
        kept = success_filter.submit(fresh if fresh is not None else [], how.name, name, round)
        data = update_buffer.submit(cfg, str(folder / "buffers" / name), kept, round, name, envs)
        versioned = version_buffer.submit(dvc_repo, str(folder / "buffers" / name), name, round,
                                          wait_for=[data]) if dvc_repo else None
        chains.append((name, fresh, data, train.submit(cfg, start, data, round, name), versioned))
    updates, stats, buffers = [], {}, {}
    for name, fresh, data, trained, versioned in chains:
        # upstream first, so a failure raises its own error rather than a downstream task's "not ready"
        fresh_list = fresh.result() if fresh is not None else []
        client_data = data.result()
        if versioned is not None:
            buffers[name] = versioned.result()
        state, train_stats = trained.result()
        own[name] = state
        stats[name] = update_stats(how, fresh_list, client_data.manifest, client_data.records, train_stats, state)
        updates.append((name, state, successes(client_data.records)))
    record["clients"] = stats
    new, adapter = aggregate.submit(cfg, updates, global_state, round, str(folder)).result()
    if adapter is not None:
        record["global"] = {"sha256": adapter["sha256"], "bytes": adapter["bytes"]}
    if buffers:
        record["buffers_dvc"] = buffers
    return new, adapter, buffers


def evaluate_all(cfg: Config, how: Method, round: int, global_state: AdapterState, own: dict[str, AdapterState],
                 initial: AdapterState) -> dict[str, Any]:
    futures = {env: evaluate.submit(cfg, eval_state(how, env, own, global_state, initial), env, round)
               for env in cfg.client_envs()}
    return summarise({env: future.result() for env, future in futures.items()})


def _table(record: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [{"env": env, "success": round(s["success"], 4), "n": s["n"]} for env, s in record["envs"].items()]
    return [*rows, {"env": "micro", "success": round(record["micro"], 4), "n": sum(r["n"] for r in rows)},
            {"env": "macro", "success": round(record["macro"], 4), "n": ""}]


def _key(text: str) -> str:
    """Artifact keys: lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() or c == "-" else "-" for c in text.lower())


def task_runner(kind: str, workers: int) -> Any:
    return ProcessPoolTaskRunner(max_workers=workers) if kind == "process" else ThreadPoolTaskRunner(workers)
