"""Task runners: the same rounds of the Prefect flow `fedse` on the thread runner vs the process pool.

The thread runner shares one model under a lock, so the clients' rollouts and training run one after
another; the process pool gives each worker its own model, so two clients act and train side by side on the
two cores. Both run the same profile, method, seed and clients, in the order thread, process, thread,
process (machine noise hits both); ratio = best thread time / best process time (> 1: the pool is faster).
Acting and training use `--threads` torch threads in both (1 by default: with two workers on two cores, more
threads per worker wait on each other).

    python bench/runner.py [--profile quick] [--rounds 1] [--workers 2] [--threads 1] [--repeats 2] [--json]
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
from flows.round_loop import round_loop, task_runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--rounds", type=int, default=1, help="only the first N rounds of the profile")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads while acting and training")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sets = [f"federation.rounds={args.rounds}", f"policy.threads={args.threads}", f"learner.threads={args.threads}"]
    cfg = load_config("params.yaml", profile=args.profile, overrides=sets)
    scratch = Path(tempfile.mkdtemp(prefix="fedse-bench-"))
    seconds: dict[str, list[float]] = {"thread": [], "process": []}
    try:
        with prefect_test_harness(server_startup_timeout=120):
            for i in range(args.repeats):
                for kind in ("thread", "process"):
                    flow = round_loop.with_options(task_runner=task_runner(kind, args.workers))
                    start = time.perf_counter()
                    state = flow(method=cfg.federation.method, profile=args.profile, seed=cfg.seed, sets=sets,
                                 out=str(scratch / f"{kind}-{i}"), return_state=True)
                    seconds[kind].append(time.perf_counter() - start)
                    if not state.is_completed():
                        raise SystemExit(f"{kind} flow run ended {state.type}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    thread, process = min(seconds["thread"]), min(seconds["process"])
    emit({"ratio_thread_vs_process": thread / process, "thread_seconds": thread, "process_seconds": process,
          "profile": args.profile, "rounds": cfg.federation.rounds, "workers": args.workers,
          "threads": args.threads, "clients": ",".join(cfg.federation.clients or cfg.envs.names)}, args.json)


if __name__ == "__main__":
    main()
