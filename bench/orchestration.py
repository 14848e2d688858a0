"""Orchestration overhead: the same rounds as plain function calls and through the Prefect flow `fedse` in each
`orchestration.mode` — inprocess (tasks on a thread pool), dask (tasks on a local Dask cluster) and workers
(each client's round run by its organisation's own worker process on a signed request through the store).

Every mode runs the same profile, method, seed and clients with the same model, in the order plain,
inprocess, dask, workers, repeated (machine noise hits all of them); ratio = best time of the mode / best
time of plain calls (1.0 = no overhead). Each mode gets the same one torch thread per model (`--threads`).
Before timing, a stack is started on free 127.0.0.1 ports in a scratch folder (flows/stack.py: a Prefect
server, SeaweedFS, MLflow, and one organisation's worker per client under `.orgs/`); every flow run uses that
Prefect server, MLflow tracking is off; plain calls exchange adapters through a local folder, every flow mode
through the stack's S3 store over https (where the organisations are), so the figures are the orchestration's
own cost and the store's: task and flow-run submission, state transitions, signing and verifying, S3 over TLS,
request polling, and the organisation's own Prefect flow and model loading per round (workers), the Dask
cluster's per-task cost (dask). The final global adapter's sha256 of every mode is compared with plain calls'
(`same_adapter`).

    python bench/orchestration.py [--profile quick] [--clients textcraft,maze,wordle] [--rounds 1]
                                  [--repeats 2] [--modes inprocess,dask,workers] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import emit

from fedse.config import load_config
from fedse.federation import Federation
from fedse.model import set_adapter_state
from flows.round_loop import round_loop, task_runner
from flows.stack import Stack
from tasks.agent import borrowed, fresh_adapter

ROOT = Path(__file__).resolve().parents[1]


def final_sha(folder: Path) -> str:
    return json.loads((folder / "metrics.json").read_text())["rounds"][-1]["global"]["sha256"]


def stack_for(scratch: Path, clients: list[str]) -> Stack:
    """A stack in the scratch folder with one organisation per client, its seeds the project's (written by
    `fedse seed` when the project has none)."""
    from dvc.repo import Repo

    from fedse.seed import seed_file

    root = scratch / "stack"
    seeds = root / "data" / "seed"
    seeds.mkdir(parents=True)
    Repo.init(str(root), no_scm=True).close()
    for client in clients:  # run seed 0's draw: the bench runs at seed 0
        source, target = seed_file(ROOT / "data" / "seed", 0, client), seed_file(seeds, 0, client)
        if source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        else:
            subprocess.run([sys.executable, "-m", "fedse.cli", "seed", "--out", str(seeds), "--seed", "0",
                            "--env", client], cwd=ROOT, check=True, capture_output=True)
    return Stack.on_free_ports(root, orgs=clients)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--clients", default="textcraft,maze,wordle")
    parser.add_argument("--rounds", type=int, default=1, help="only the first N rounds of the profile")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads while acting and training")
    parser.add_argument("--modes", default="inprocess,dask,workers")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from prefect.settings import temporary_settings

    clients = args.clients.split(",")
    modes = args.modes.split(",")
    scratch = Path(tempfile.mkdtemp(prefix="fedse-bench-"))
    exchange = scratch / "exchange"
    sets = [f"federation.clients=[{args.clients}]", f"federation.rounds={args.rounds}",
            f"policy.threads={args.threads}", f"learner.threads={args.threads}",
            f"seed_data.dir={scratch / 'stack' / 'data' / 'seed'}"]
    plain_sets = [*sets, f"transport.dir={exchange}"]  # the plain driver: a local exchange folder
    sets.append("transport.backend=s3")  # the flow: the stack's store, where the organisations' workers are
    by_mode = {"inprocess": ["orchestration.mode=inprocess", "orchestration.task_runner=thread"],
               "dask": ["orchestration.mode=dask", "orchestration.workers=2"],
               "workers": ["orchestration.mode=workers", "federation.client_timeout=3600"]}
    cfg = load_config(ROOT / "params.yaml", profile=args.profile, overrides=plain_sets)
    seconds: dict[str, list[float]] = {m: [] for m in ["plain", *modes]}
    shas: dict[str, str] = {}
    stack = stack_for(scratch, clients)
    try:
        stack.up()
        served = stack.env()  # the server's identity on the stack, as the served deployment has it
        os.environ.update({k: v for k, v in served.items() if k.startswith(("FEDSE_", "AWS_CA_BUNDLE"))})
        with temporary_settings(updates=stack.prefect_settings()):
            with borrowed(cfg) as agent:  # build/load once before timing
                name = agent.name
            for i in range(args.repeats):
                with borrowed(cfg) as agent:
                    set_adapter_state(agent, fresh_adapter(cfg))  # the plain driver starts from the model's adapter
                    start = time.perf_counter()
                    Federation(agent, cfg, scratch / f"plain-{i}").run()
                    seconds["plain"].append(time.perf_counter() - start)
                shas["plain"] = final_sha(scratch / f"plain-{i}")
                for mode in modes:
                    run_sets = [*sets, *by_mode[mode]]
                    kind = "dask" if mode == "dask" else "thread"
                    flow = round_loop.with_options(task_runner=task_runner(kind, 2))
                    start = time.perf_counter()
                    state = flow(method=cfg.federation.method, profile=args.profile, seed=cfg.seed, sets=run_sets,
                                 out=str(scratch / f"{mode}-{i}"), return_state=True)
                    seconds[mode].append(time.perf_counter() - start)
                    if not state.is_completed():
                        raise SystemExit(f"{mode}: flow run ended {state.type}: {state.message}")
                    shas[mode] = final_sha(scratch / f"{mode}-{i}")
    finally:
        stack.down()
        shutil.rmtree(scratch, ignore_errors=True)
    best = {m: min(v) for m, v in seconds.items()}
    emit({"ratios": {m: best[m] / best["plain"] for m in modes}, "seconds": best,
          "same_adapter": {m: shas[m] == shas["plain"] for m in modes}, "final_sha256_plain": shas["plain"],
          "profile": args.profile, "clients": args.clients, "rounds": args.rounds, "repeats": args.repeats,
          "threads": args.threads, "model": name}, args.json)


if __name__ == "__main__":
    main()
