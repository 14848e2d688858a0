"""Flow `fedse`: the round loop of `fedse.federation` (`Federation`, the one loop `fedse run` also runs), with
its client work, server step and evaluation as Prefect tasks (`Tasks`, the loop's runner).

Each round maps the client chain (download_global →) rollout → filter → buffer → train → upload over the
clients (rollout, train and the transfers retried `orchestration.retries` times with exponential backoff),
waits for them until `federation.client_timeout`, then aggregates what arrived (the server downloads the
uploads from the exchange, screens them, and needs `federation.quorum` of them; a failed, late or rejected
client is recorded as missing with its reason), registers and evaluates the global adapter;
the next round starts only after this one's aggregation and registration have completed. It writes the same
run folder as `fedse run` (metrics.json, checkpoints), so `fedse report` reads either and parameter `resume`
continues a killed flow run from its folder as `fedse run --resume` does, MLflow records included (rounds
already tracked are not tracked twice). Parameter `transport` picks the exchange's backend (`s3` in the served
deployment; default: params.yaml's `transport.backend`, a local folder).

No `from __future__ import annotations` here: Prefect validates flow parameters from the annotations.
"""

import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.context import get_run_context
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from fedse.atomic import write_json
from fedse.config import Config, OrchestrationConfig, run_config
from fedse.evaluate import EnvScore
from fedse.federation import (
    AdapterState,
    ClientJob,
    ClientOutcome,
    Federation,
    client_groups,
    failure,
    successes,
    update_stats,
)
from fedse.kernels import choose as choose_kernels
from fedse.methods import Method, method
from fedse.model import base_name
from fedse.placement import assign, placed_devices, tag
from fedse.report import round_line
from fedse.transport import Transport, Upload
from flows.console import phase, watching
from flows.placement import Initializer, placed_runner
from tasks.aggregate import aggregate
from tasks.buffer import update_buffer
from tasks.evaluate import evaluate
from tasks.exchange import download_global, upload
from tasks.filter import success_filter
from tasks.initial import initial_adapter
from tasks.probe import probe
from tasks.register import register, registered, task_set
from tasks.rollout import rollout
from tasks.track import Tracking, close_unfinished, ended_as, finish, log_round, open_experiment, reopen, round_run
from tasks.train import train
from tasks.version_buffer import version_buffer


def run_folder(cfg: Config, out: str | None, flow_run: str) -> Path:
    """The run's folder: `out`, else runs/flows/<method>-<profile>-s<seed>-<flow run id>."""
    name = f"{cfg.federation.method}-{cfg.profile}-s{cfg.seed}-{flow_run[:8]}"
    return Path(out) if out else cfg.federation.out / "flows" / name


@flow(name="fedse", log_prints=True)
def round_loop(method: str = "fedse", profile: str = "smoke", seed: int = 0, params: str = "params.yaml",
               sets: list[str] | None = None, out: str | None = None, tracking_uri: str | None = None,
               experiment: str | None = None, dvc_repo: str | None = None,
               transport: str | None = None, resume: str | None = None) -> dict[str, Any]:
    """One experiment: `federation.rounds` rounds of `method` under `profile`; returns metrics.json.
    `resume`: the folder of a killed run of the same settings, to continue (its completed rounds are kept)."""
    chosen = [f"transport.backend={transport}"] if transport else []  # before `sets`: an explicit override wins
    cfg = served_identity(run_config(params, profile, method, seed, [*chosen, *(sets or [])]))
    choose_kernels(cfg.model.kernels)  # before any tensor of this run, here and in the workers it starts
    flow_run = str(get_run_context().flow_run.id)
    folder = Path(resume) if resume else run_folder(cfg, out, flow_run)
    runner = workers_runner(cfg, dvc_repo) if cfg.orchestration.mode == "workers" else Tasks(cfg, dvc_repo)
    fed = Federation(None, cfg, folder, resume=resume is not None, runner=runner)
    check_placement(runner.placement, folder)
    tracking = track(cfg, tracking_uri, experiment or f"fedse-{cfg.profile}", flow_run, folder, resume is not None) \
        if tracking_uri else None
    total = fed.total_rounds
    progress = create_progress_artifact(100.0 * len(fed.rounds) / total, key=_key(f"fedse-progress-{flow_run}"),
                                        description=f"{fed.method.name}: rounds completed of {total}")

    def on_round(round: int, record: dict[str, Any], adapter: dict[str, Any] | None,
                 egress: dict[str, Upload]) -> None:
        if tracking is not None:
            record_round(tracking, cfg, round, record, adapter, egress)
        create_table_artifact(_table(record), key=_key(f"fedse-round-{round}-{flow_run}"),
                              description=f"{fed.method.name} round {round}: success per environment")
        update_progress_artifact(progress, 100.0 * (round + 1) / total)
        line = round_line(record, total)
        get_run_logger().info(line)
        watching().line(line)

    fed.on_round = on_round
    try:
        if tracking is not None:  # rounds a killed run completed but had not tracked yet
            for round, record in enumerate(fed.rounds):
                record_round(tracking, cfg, round, record, committed_adapter(folder, round, record), {})
        doc = fed.run()
        if tracking is not None:
            finish(tracking, str(folder / "metrics.json"))
    except BaseException as exc:
        if tracking is not None:  # no MLflow run of a failed or cancelled flow may stay RUNNING
            close_unfinished(tracking, ended_as(exc), failure(exc))
        raise
    print(f"metrics: {folder / 'metrics.json'}")
    return doc | {"out": str(folder)}


def served_identity(cfg: Config) -> Config:
    """On the served stack (flows/stack.py), who the server is in the store: in workers mode its own S3 role
    and Ed25519 keyring only (the organisations hold theirs); when the round loop runs the clients itself
    (inprocess, dask: a simulation, one trust domain) every client's role too, with the run folder's keys.
    Settings given explicitly in params win."""
    transport, env = cfg.transport, os.environ.get
    if transport.backend != "s3" or transport.s3.credentials is not None:
        return cfg
    if cfg.orchestration.mode == "workers":
        update = {"keyring": transport.keyring or env("FEDSE_SERVER_KEYS") or None}
    else:
        simulation = env("FEDSE_S3_SIMULATION_CREDENTIALS")
        update = {"s3": transport.s3.model_copy(update={"credentials": Path(simulation)})} if simulation else {}
    return cfg.model_copy(update={"transport": transport.model_copy(update=update)})


def track(cfg: Config, uri: str, experiment: str, flow_run: str, folder: Path, resume: bool) -> Tracking:
    """This run's parent MLflow run: a resumed run's own (reopened), else a new one, remembered in the run
    folder so a later resume finds it."""
    if resume:
        found = reopen(uri, folder)
        if found is not None:
            return found
    tracking = open_experiment(cfg, uri, experiment, flow_run)
    tracking.remember(folder)
    return tracking


def record_round(tracking: Tracking, cfg: Config, round: int, record: dict[str, Any], adapter: dict[str, Any] | None,
                 egress: dict[str, Upload]) -> None:
    """The round in MLflow (a nested run) and its global adapter in the registry, each only if not there yet."""
    run_id = round_run(tracking, round) or log_round(tracking, round, record, egress)
    if adapter is not None and not registered(tracking, round):
        scored_on = task_set(cfg.profile, record.get("split", cfg.federation.eval_split), cfg.eval.passes, record)
        version = register(tracking, run_id, round, cfg.federation.method, cfg.seed, adapter, record,
                           record.get("buffers_dvc", {}), scored_on)
        get_run_logger().info("round %d: registered fedse-global version %s", round, version)


def committed_adapter(folder: Path, round: int, record: dict[str, Any]) -> dict[str, Any] | None:
    """A completed round's global adapter as the registry takes it (its record and folder), if it has one."""
    if "global" not in record:
        return None
    return record["global"] | {"path": str(folder / "adapters" / f"round_{round}")}


class Tasks:
    """The loop's runner in a flow: each client's round as a chain of Prefect tasks, all clients at once on the
    flow's task runner; the server step and every evaluation as tasks too. The flow's own process loads no
    model: it names the model from its spec, and the initial adapter is made by a task, where the models are
    (with the thread pool that is this process, whose one model the tasks share). With devices to place on
    (`fedse.placement`), each client's tasks and each environment's evaluation carry their device's tag."""

    def __init__(self, cfg: Config, dvc_repo: str | None) -> None:
        self.cfg, self.dvc_repo = cfg, dvc_repo
        self.model = base_name(cfg.agent_spec())
        devices = placed_devices(cfg.orchestration)
        self.placement = assign([name for name, _ in client_groups(cfg, method(cfg.federation.method))], devices)
        self.eval_devices = assign(cfg.client_envs(), devices)

    def initial(self) -> AdapterState:
        return initial_adapter.submit(self.cfg).result()

    def clients(self, fed: Federation, round: int, jobs: list[ClientJob],
                ) -> Iterator[tuple[str, ClientOutcome | Exception]]:
        """Submit every client's chain, then collect them in order; a client's failure (after its retries) or
        a missed deadline is handed back as its exception."""
        shown, bars = watching(), ExitStack()
        for name, total in client_phases(fed.method, round, len(jobs)).items():
            bars.enter_context(showing(name, total))
        chains = [submit_chain(self.cfg, fed.method, fed.exchange, fed.out, job, round, self.dvc_repo,
                               self.placement.get(job.name)) for job in jobs]
        for chain in chains:
            for step, future in ((phase(round, "explore"), chain.fresh), (phase(round, "train"), chain.trained)):
                if future is not None:
                    future.add_done_callback(lambda _, step=step: shown.advance(step))
        timeout = self.cfg.federation.client_timeout
        deadline = time.monotonic() + timeout if timeout else None
        with bars:
            for chain in chains:
                if deadline is not None and not finished_by(chain.last, deadline):
                    yield chain.name, TimeoutError(f"no upload within federation.client_timeout = {timeout:g} s")
                    continue
                try:
                    yield chain.name, chain.outcome()
                except Exception as exc:
                    yield chain.name, exc

    def server(self, fed: Federation, round: int, updates: list[tuple[str, AdapterState, int]],
               delivered: dict[str, Upload | None], global_state: AdapterState, momentum: AdapterState | None,
               missing: dict[str, str]) -> tuple[AdapterState, dict[str, Any] | None, AdapterState | None,
                                                 dict[str, Any]]:
        with showing(phase(round, "aggregate"), None):
            return aggregate.submit(self.cfg, updates, global_state, round, str(fed.out), fed.exchange, delivered,
                                    momentum, missing).result()

    def evaluate(self, fed: Federation, round: int, states: dict[str, AdapterState]) -> dict[str, EnvScore]:
        step, shown = phase(round, "evaluate"), watching()
        with showing(step, len(states)):
            futures = {env: on(evaluate, self.eval_devices.get(env)).submit(self.cfg, state, env, round)
                       for env, state in states.items()}
            for future in futures.values():
                future.add_done_callback(lambda _: shown.advance(step))
            return {env: future.result() for env, future in futures.items()}


def client_phases(how: Method, round: int, clients: int) -> dict[str, int]:
    """The bars of the clients' part of a round, each counting clients: explored (when the method explores),
    then trained."""
    explore = {phase(round, "explore"): clients} if how.explore else {}
    return explore | {phase(round, "train"): clients}


@contextmanager
def showing(name: str, total: int | None) -> Iterator[None]:
    """One phase's bar on the watching terminal for the `with` block."""
    shown = watching()
    shown.open(name, total)
    try:
        yield
    finally:
        shown.close(name)


@dataclass
class Chain:
    """One client's round as submitted tasks: (download the global adapter →) rollout → filter → buffer
    (→ version buffer) → train (→ upload)."""

    name: str
    fresh: Any
    data: Any
    versioned: Any
    trained: Any
    sent: Any

    @property
    def last(self) -> Any:
        return self.sent or self.trained

    def outcome(self) -> ClientOutcome:
        """The client's round as the loop takes it; raises the first failed task's own error (upstream first,
        so a failure is not reported as a downstream task's "not ready")."""
        explored = self.fresh.result() if self.fresh is not None else []
        got = self.data.result()
        version = self.versioned.result() if self.versioned is not None else None
        state, stats = self.trained.result()
        up = self.sent.result() if self.sent is not None else None
        return ClientOutcome(state, update_stats(explored, got.manifest, got.records, stats, state, up),
                             successes(got.records), up, version)


def submit_chain(cfg: Config, how: Method, exchange: Transport | None, out: Path, job: ClientJob, round: int,
                 dvc_repo: str | None, device: str | None = None) -> Chain:
    """Submit one client's round as Prefect tasks (rollout, train and the transfers retried
    `orchestration.retries` times with exponential backoff), each tagged with the client's `device` when it
    is placed on one; the server's flow and an organisation's `fedse-client` flow both run a client's round
    this way."""
    retry = {"retries": cfg.orchestration.retries,
             "retry_delay_seconds": exponential_backoff(backoff_factor=cfg.orchestration.retry_delay)}
    start = job.start if job.start is not None else \
        on(download_global, device).with_options(**retry).submit(exchange, round, job.name)
    fresh = on(rollout, device).with_options(**retry).submit(
        cfg, job.envs[0], start, round, job.name, str(out / "buffers" / job.name), job.own) if how.explore else None
    kept = on(success_filter, device).submit(cfg, fresh if fresh is not None else [], job.envs[0], job.name, round)
    data = on(update_buffer, device).submit(cfg, str(out / "buffers" / job.name), kept, round, job.name, job.envs)
    versioned = on(version_buffer, device).submit(dvc_repo, data, job.name, round) if dvc_repo else None
    trained = on(train, device).with_options(**retry).submit(cfg, start, data, round, job.name, job.own)
    sent = on(upload, device).with_options(**retry).submit(exchange, cfg, str(out), trained, data, round, job.name) \
        if exchange is not None else None
    return Chain(job.name, fresh, data, versioned, trained, sent)


def on(work: Any, device: str | None) -> Any:
    """The task as placed on `device`: with its device tag added (the runner routes by it, and Prefect's limit
    of that name keeps the card to one task at a time); unchanged without one."""
    return work if device is None else work.with_options(tags={*work.tags, tag(device)})


def check_placement(placement: dict[str, str | None], folder: Path) -> None:
    """Ask each placed client's process, through the runner as its tasks are, what it sees: its own device
    alone, or the flow stops before any round. What each saw is written to the run folder's placement.json
    (nothing is written without devices)."""
    asked = {client: on(probe, device).submit(client) for client, device in placement.items() if device is not None}
    if not asked:
        return
    seen = {client: {"device": placement[client]} | future.result() for client, future in asked.items()}
    write_json(folder / "placement.json", seen)
    wrong = [f"{client} sees {got['visible']!r} instead of {got['device']!r}" for client, got in seen.items()
             if got["visible"] != got["device"]]
    if wrong:
        raise RuntimeError(f"placement: {'; '.join(wrong)} (CUDA_VISIBLE_DEVICES; is the flow's task runner the one "
                           "orchestration: names?)")


def finished_by(future: Any, deadline: float) -> bool:
    """Whether a client's last task ended (in any state) before the round's deadline."""
    future.wait(timeout=max(0.0, deadline - time.monotonic()))
    return future.state.is_final()


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


def task_runner(kind: str, workers: int, address: str | None = None, initializer: Initializer = None,
                devices: list[str] | None = None) -> Any:
    """The Prefect task runner `kind` names. Dask: the scheduler at `address`, else a local cluster of
    `workers` processes with one thread each (each process loads its own model once, as a process pool's).
    `initializer`: (function, args) run once in each process-pool worker (make run quiets its logs there).
    `devices`: place the process pool or Dask workers on them, one process per device (flows/placement.py);
    a thread pool is one process and places nothing."""
    placed = placed_runner(kind, devices or [], workers, address, initializer)
    if placed is not None:
        return placed
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    if kind == "process":
        start, args = initializer or (None, ())
        return ProcessPoolTaskRunner(max_workers=workers, initializer=start, initargs=args)
    return ThreadPoolTaskRunner(workers)


def workers_runner(cfg: Config, dvc_repo: str | None) -> "Tasks":
    """`orchestration.mode: workers`: clients on their organisations' own deployments (flows/workers.py)."""
    from flows.workers import Workers

    return Workers(cfg, dvc_repo)


def configured(orchestration: OrchestrationConfig, initializer: Initializer = None) -> Any:
    """The flow on the task runner `orchestration:` names (what `make run` and the served deployment run):
    Dask in mode dask, else `task_runner` (in mode workers it runs only the server's own tasks), placed on
    the devices `fedse.placement.placed_devices` finds."""
    kind = "dask" if orchestration.mode == "dask" else orchestration.task_runner
    return round_loop.with_options(task_runner=task_runner(kind, orchestration.workers, orchestration.dask_address,
                                                           initializer, placed_devices(orchestration)))
