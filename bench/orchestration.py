"""Orchestration overhead: the same rounds through the Prefect flow `fedse` vs plain function calls.

Both drivers run the same profile, method, seed and clients with the same model in one process, in the
order plain, flow, plain, flow (so machine noise hits both); ratio = best flow time / best plain time
(1.0 = no overhead). The Prefect API is a temporary local server started before timing (as a served
deployment has one already running); MLflow tracking is off in both, so this is Prefect's own cost: task
submission, state transitions and result handling per task.

    python bench/orchestration.py [--profile smoke] [--clients maze,wordle] [--rounds N] [--repeats 2] [--json]

`--rounds N` times only the first N rounds of the profile (each round costs the same tasks), so the quick
profile's overhead can be measured without running two whole quick experiments per repeat.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from prefect.testing.utilities import prefect_test_harness
from report import emit

from fedse.config import load_config
from fedse.federation import Federation
from fedse.model import set_adapter_state
from flows.round_loop import round_loop
from tasks.agent import borrowed, fresh_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--clients", default="maze,wordle")
    parser.add_argument("--rounds", type=int, default=None, help="only the first N rounds of the profile")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sets = [f"federation.clients=[{args.clients}]"] + ([f"federation.rounds={args.rounds}"] if args.rounds else [])
    cfg = load_config("params.yaml", profile=args.profile, overrides=sets)
    scratch = Path(tempfile.mkdtemp(prefix="fedse-bench-"))
    plain, flow = [], []
    try:
        with prefect_test_harness(server_startup_timeout=120):
            with borrowed(cfg) as agent:  # build/load once, shared by both drivers
                initial_name = agent.name
            for i in range(args.repeats):
                with borrowed(cfg) as agent:
                    set_adapter_state(agent, fresh_adapter(cfg))  # the plain driver starts from the model's adapter
                    start = time.perf_counter()
                    Federation(agent, cfg, scratch / f"plain-{i}").run()
                    plain.append(time.perf_counter() - start)
                start = time.perf_counter()
                state = round_loop(method=cfg.federation.method, profile=args.profile, seed=cfg.seed, sets=sets,
                                   out=str(scratch / f"flow-{i}"), return_state=True)
                flow.append(time.perf_counter() - start)
                if not state.is_completed():
                    raise SystemExit(f"flow run ended {state.type}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    emit({"ratio_flow_vs_plain": min(flow) / min(plain), "flow_seconds": min(flow), "plain_seconds": min(plain),
          "profile": args.profile, "clients": args.clients, "rounds": cfg.federation.rounds,
          "model": initial_name}, args.json)


if __name__ == "__main__":
    main()
