"""One experiment through the flow on this machine, no servers needed: `python -m flows.experiment`.

Prefect runs on a temporary local API with the profile's task runner (`orchestration:`), MLflow tracks into
`mlflow/mlflow.db` (SQLite), buffers are versioned in the project's DVC cache. Prints the final table, then
where the metrics, the plot and the MLflow runs are.
This is what `make run` calls.

    python -m flows.experiment [--method fedse] [--profile quick] [--seed 0] [--out DIR [--resume]]
                               [--keep FILE] [--set key=value ...]

`--resume` continues the killed run in `--out` (the flow's `resume` parameter): its completed rounds are
kept, and it ends with the same global adapter as a run never interrupted.

`--keep FILE` also writes the finished run's metrics to FILE (the `experiment` stages of dvc.yaml keep each
run's small metrics file in git, beside the report, while the run folder goes to the DVC cache).
"""

import argparse
import sys
from pathlib import Path

from prefect.settings import (
    PREFECT_SERVER_ANALYTICS_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)

from fedse.atomic import write_json
from fedse.cli import summarise_run
from fedse.config import ConfigError, run_config
from flows.round_loop import configured

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
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlflow' / 'mlflow.db'}")
    args = parser.parse_args(argv)
    if args.resume and not args.out:
        print("error: --resume continues the run in --out; name the folder with --out DIR", file=sys.stderr)
        return 2
    (ROOT / "mlflow").mkdir(exist_ok=True)
    try:
        # the temporary API gets 20 s to start by default: too few on a loaded 2-core machine (seen under
        # `dvc exp run` beside another experiment); and it must not try to phone home (offline machines)
        with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180,
                                 PREFECT_SERVER_ANALYTICS_ENABLED: False}):
            flow = configured(run_config(args.params, args.profile, args.method, args.seed, args.sets).orchestration)
            doc = flow(method=args.method, profile=args.profile, seed=args.seed, params=args.params,
                       sets=args.sets, out=args.out, tracking_uri=args.tracking_uri, dvc_repo=str(ROOT),
                       resume=args.out if args.resume else None)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    folder = Path(doc["out"])
    if args.keep:
        write_json(args.keep, {k: v for k, v in doc.items() if k != "out"})
    summarise_run(doc, folder)
    print(f"mlflow:  {args.tracking_uri} (experiment fedse-{doc['profile']}; `mlflow ui --backend-store-uri "
          f"{args.tracking_uri}`)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
