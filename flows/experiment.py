"""One experiment through the flow on this machine, no servers needed: `python -m flows.experiment`.

Prefect runs on a temporary local API with the profile's task runner (`orchestration:`), MLflow tracks into
`mlflow/mlflow.db` (SQLite), buffers are versioned in the project's DVC cache. Prints the final table, then
where the metrics, the plot and the MLflow runs are.
This is what `make run` calls.

    python -m flows.experiment [--method fedse] [--profile quick] [--seed 0] [--out DIR [--resume]]
                               [--keep FILE] [--verbose] [--set key=value ...]

It prints one line per round (macro success with its interval, buffer growth, seconds) under a progress bar
per phase; everything else the libraries log goes to runs/logs/ (`--verbose`: to the terminal instead).

`--resume` continues the killed run in `--out` (the flow's `resume` parameter): its completed rounds are
kept, and it ends with the same global adapter as a run never interrupted.

`--keep FILE` also writes the finished run's metrics to FILE (the `experiment` stages of dvc.yaml keep each
run's small metrics file in git, beside the report, while the run folder goes to the DVC cache).
"""

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from prefect.logging.handlers import APILogWorker
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

from fedse.atomic import write_json
from fedse.cli import summarise_run
from fedse.config import Config, ConfigError, run_config
from fedse.kernels import choose as choose_kernels
from fedse.memory import gate
from fedse.placement import placed_devices
from flows.console import Phases, quiet, quiet_worker, shown_on
from flows.placement import device_limits
from flows.round_loop import configured
from tasks.track import REMEMBERED

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="fedse")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default=None, help="run folder [runs/flows/<method>-<profile>-s<seed>-<run id>]")
    parser.add_argument("--resume", action="store_true", help="continue the killed run in --out")
    parser.add_argument("--keep", type=Path, default=None, help="also write the finished run's metrics.json here")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override, e.g. model.lora.r=4")
    parser.add_argument("--verbose", action="store_true", help="every log line on the terminal, not in a file")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlflow' / 'mlflow.db'}")
    args = parser.parse_args(argv)
    if args.resume and not args.out:
        print("error: --resume continues the run in --out; name the folder with --out DIR", file=sys.stderr)
        return 2
    (ROOT / "mlflow").mkdir(exist_ok=True)
    try:
        cfg = run_config(args.params, args.profile, args.method, args.seed, args.sets)
        choose_kernels(cfg.model.kernels)  # before the task runner starts its workers: they inherit the choice
        log = log_file(cfg)
        print(opening(cfg, log), flush=True)
        memory_line = gate(cfg)  # the estimate against this machine's memory; refuses a run that cannot fit
        if memory_line:
            print(memory_line, flush=True)
        if not args.verbose:
            quiet(log)
        workers = None if args.verbose else (quiet_worker, (str(log),))
        with local_api(), Phases() as phases, shown_on(phases):
            devices = placed_devices(cfg.orchestration)
            if devices:  # one task per card at a time (on CPU no limit, as before: clients train side by side)
                device_limits(devices, cfg.orchestration.gpu_slots)
            doc = configured(cfg.orchestration, workers)(
                method=args.method, profile=args.profile, seed=args.seed, params=args.params, sets=args.sets,
                out=args.out, tracking_uri=args.tracking_uri, dvc_repo=str(ROOT),
                resume=args.out if args.resume else None)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    folder = Path(doc["out"])
    if args.keep:
        write_json(args.keep, {k: v for k, v in doc.items() if k != "out"})
    summarise_run(doc, folder)
    print(closing(args.tracking_uri, folder, log if not args.verbose else None))
    return 0


@contextmanager
def local_api() -> Iterator[str]:
    """A temporary Prefect API for this run, named in the settings so that process-pool workers report to it
    too (left to itself, each worker process would start a temporary API of its own). It gets 180 s to start
    (20 by default: too few on a loaded 2-core machine) and must not phone home (offline machines)."""
    with temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        server = SubprocessASGIServer()
        server.start(timeout=180)
        try:
            with temporary_settings({PREFECT_API_URL: server.api_url}):
                yield server.api_url
        finally:
            APILogWorker.drain_all(timeout=10)  # the run's last records, sent before their API goes away
            server.stop()


def log_file(cfg: Config) -> Path:
    """Where this run's full log goes (everything the terminal is spared): runs/logs/<method>-<profile>-s<seed>-
    <UTC time>.log."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return cfg.federation.out / "logs" / f"{cfg.federation.method}-{cfg.profile}-s{cfg.seed}-{stamp}.log"


def opening(cfg: Config, log: Path) -> str:
    """The first line: what is about to run, and where its full log goes."""
    fed = cfg.federation
    clients = cfg.client_names()
    shown = ", ".join(clients) if len(clients) <= 6 else f"{len(clients)}"
    return (f"run: {fed.method}, profile {cfg.profile}, seed {cfg.seed}, {fed.rounds} rounds, {cfg.model.preset} "
            f"model, clients {shown} (full log: {log})")


def closing(uri: str, folder: Path, log: Path | None) -> str:
    """The last lines: how to open the run in the MLflow UI and compare the registered global adapters."""
    here = Path(sys.executable).parent
    bin_dir = f"{here.relative_to(Path.cwd())}/" if here.is_relative_to(Path.cwd()) else ""
    tracked = folder / REMEMBERED
    run = json.loads(tracked.read_text()) if tracked.exists() else None
    page = f"#/experiments/{run['experiment_id']}/runs/{run['run_id']}" if run else ""
    lines = [f"MLflow UI:  {bin_dir}mlflow ui --backend-store-uri {uri} --port 5000   then open "
             f"http://127.0.0.1:5000/{page}",
             f"registry:   {bin_dir}fedse compare --tracking-uri {uri}   (every registered fedse-global version "
             "side by side; in the UI: http://127.0.0.1:5000/#/models/fedse-global)"]
    if log is not None:
        lines.append(f"full log:   {log}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
