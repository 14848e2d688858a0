"""A larger simulated federation on Dask: 20 clients (5 environments × 4 organisations each, each with its own
share of its env's seeds and its own explored tasks), 5 of them drawn per round, one smoke-sized round of the
flow `fedse` in `orchestration.mode: dask` (a local cluster of `--workers` processes, one thread each, each
loading its own model). Reports the wall time, who took part, and the peak resident memory of every worker
process and of the driver (sampled every 0.2 s with psutil: the largest RSS each process reached).

    python bench/simulation.py [--orgs-per-env 4] [--clients-per-round 5] [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from report import emit

from fedse.config import load_config
from flows.round_loop import round_loop, task_runner

ROOT = Path(__file__).resolve().parents[1]


class PeakMemory:
    """Largest RSS of this process and of each of its descendants while the block runs."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.peaks, self.names = every, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for proc in [me, *me.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                    self.names.setdefault(proc.pid, " ".join(proc.cmdline())[:120])
                except psutil.Error:
                    continue
                self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), rss)
            self._stop.wait(self.every)


def seeds_for(folder: Path, envs: list[str], need: int, seed: int) -> None:
    """Each env's seed file of run seed `seed` with at least `need` records: the project's, or written by
    `fedse seed`."""
    from fedse.seed import seed_file

    for env in envs:
        source, target = seed_file(ROOT / "data" / "seed", seed, env), seed_file(folder, seed, env)
        if source.exists() and sum(1 for _ in source.open()) >= need:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        else:
            subprocess.run([sys.executable, "-m", "fedse.cli", "seed", "--out", str(folder), "--seed", str(seed),
                            "--env", env], cwd=ROOT, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orgs-per-env", type=int, default=4)
    parser.add_argument("--clients-per-round", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes of the local cluster")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    scratch = Path(tempfile.mkdtemp(prefix="fedse-sim-"))
    sets = ["federation.rounds=1", f"federation.orgs_per_env={args.orgs_per_env}",
            f"federation.clients_per_round={args.clients_per_round}", "orchestration.mode=dask",
            f"orchestration.workers={args.workers}", "policy.threads=1", "learner.threads=1",
            f"seed_data.dir={scratch / 'seeds'}"]
    cfg = load_config(ROOT / "params.yaml", profile="smoke", overrides=sets)
    seeds_for(scratch / "seeds", cfg.client_envs(), args.orgs_per_env * (cfg.federation.seeds_per_client or 0),
              cfg.seed)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            flow = round_loop.with_options(task_runner=task_runner("dask", args.workers))
            with PeakMemory() as memory:
                start = time.perf_counter()
                state = flow(method=cfg.federation.method, profile="smoke", seed=cfg.seed, sets=sets,
                             out=str(scratch / "run"), return_state=True)
                seconds = time.perf_counter() - start
            if not state.is_completed():
                raise SystemExit(f"flow run ended {state.type}: {state.message}")
            doc = json.loads((scratch / "run" / "metrics.json").read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    me = psutil.Process().pid
    workers = sorted((p for p in memory.peaks if p != me and "spawn" in memory.names.get(p, "")),
                     key=lambda p: -memory.peaks[p])
    mb = 1 / 2**20
    record = doc["rounds"][0]
    emit({"clients": len(cfg.client_names()), "participants": record["participants"],
          "seconds": seconds, "macro": record["macro"],
          "worker_peak_rss_mb": [round(memory.peaks[p] * mb) for p in workers[:args.workers]],
          "driver_peak_rss_mb": round(memory.peaks[me] * mb),
          "other_processes_peak_rss_mb": {memory.names[p][:60]: round(memory.peaks[p] * mb)
                                          for p in memory.peaks if p != me and p not in workers[:args.workers]},
          "workers": args.workers, "model": doc["model"]}, args.json)


if __name__ == "__main__":
    main()
