"""The whole results table on both cores, recorded by DVC: `python -m flows.results [-j 2]` (`make results`).

`dvc repro` runs one stage at a time, and DVC allows one command per repository at a time, so two experiments
never overlap under it. This driver gets the same record with the cores kept busy: it asks DVC which stages
are out of date, runs their commands itself, `jobs` at a time (each on one CPU thread, longest first), and
after each success records it with `dvc commit -f <stage>` (serialised: one DVC command at a time), so
`dvc.lock` ends exactly as `dvc repro` would leave it; then `dvc repro` finishes the reports. Stages already
up to date are not run again, so an interrupted table resumes. The end-to-end wall time is printed and kept
in reports/results-timing.json, summed over the invocations that built the table (one per resumption).

`--only` runs the matching stages in the order of its patterns (the most wanted rows first). Each report is
written (`dvc repro -s`) only once every run it reports on is recorded, so a partial table never writes a report
that mixes runs.
The SmolLM2 table (stages `smollm2@*`, over an hour a run) is run only when `--only` names it.

    python -m flows.results [-j 2] [--only PATTERN ...] [--dry-run]
"""

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / ".cache" / "fedse" / "results-logs"
# stages that hold many rounds go first, so the short ones fill in around them
WEIGHT = {"collapse": 3.0, "experiment": 1.0, "variant": 1.0, "personal": 1.0}
FIRST = ("seed",)  # run (through dvc repro) before anything else
# each report stage and the run stages it reports on; a report is written (dvc repro -s) once all of them are done
REPORTS = {"report": ("experiment", "variant", "personal"), "report_collapse": ("collapse",),
           "report_smollm2": ("smollm2",)}
LAST = tuple(REPORTS)
ON_DEMAND = ("smollm2",)  # run only when --only names them (SmolLM2 runs take over an hour each)


def dvc(*args: str) -> subprocess.CompletedProcess:
    """A DVC command in the repository, with the venv's tools first on PATH (stage commands call `fedse`)."""
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=ROOT, env=env, text=True,
                          capture_output=True)


def stale() -> list[str]:
    """Names of the stages `dvc status` reports as changed (never run, or run against other code/params)."""
    out = dvc("status", "--json")
    if out.returncode != 0:
        raise SystemExit(f"error: dvc status failed: {out.stderr.strip().splitlines()[-1] if out.stderr else ''}")
    return [name for name in json.loads(out.stdout or "{}") if not name.endswith(".dvc")]


def commands() -> dict[str, tuple[str, list[Path]]]:
    """Every stage's resolved command (matrix and foreach items expanded) and its outputs, by stage name."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {stage.addressing: (stage.cmd, [Path(out.fs_path) for out in stage.outs])
                for stage in repo.index.stages if stage.cmd}


def clear(outs: list[Path]) -> None:
    """Remove a stage's outputs before running it, as `dvc repro` does: a run killed midway (a session's
    end, a power cut) leaves a half-written run folder, and the flow refuses to write into a used one."""
    for out in outs:
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()


def kind(stage: str) -> str:
    return stage.split("@")[0]


def in_scope(stage: str, patterns: list[str] | None) -> bool:
    """Whether this invocation is about the stage: every stage, except the on-demand ones unless named."""
    return kind(stage) not in ON_DEMAND or any(fnmatch.fnmatch(stage, p) for p in patterns or [])


def weight(stage: str) -> float:
    return WEIGHT.get(stage.split("@")[0], 1.0)


def order(stages: list[str], patterns: list[str] | None) -> list[str]:
    """Stages to run, in run order: by the first `--only` pattern each matches (unmatched dropped), then the
    heaviest first so the short ones fill in around them."""
    if not patterns:
        return sorted(stages, key=lambda s: (-weight(s), s))
    rank = {s: next((i for i, p in enumerate(patterns) if fnmatch.fnmatch(s, p)), None) for s in stages}
    return sorted((s for s in stages if rank[s] is not None), key=lambda s: (rank[s], -weight(s), s))


def ready(left: list[str], patterns: list[str] | None) -> list[str]:
    """The out-of-date reports whose runs are all recorded (and in this invocation's scope)."""
    return [report for report, runs in REPORTS.items() if report in left
            and not any(kind(s) in runs for s in left) and any(in_scope(f"{r}@", patterns) for r in runs)]


def record_timing(path: Path, wall: float, jobs: int, timing: dict[str, float], failed: list[str],
                  began: str) -> float:
    """Write this invocation (started at `began`) into the timing file and return the table's wall time so
    far: an interrupted or partial table is built over several invocations, and its cost is their sum, not the
    last one's. Called after every stage, so an invocation killed midway still counts up to its last stage."""
    previous = json.loads(path.read_text()) if path.exists() else {}
    this = {"began": began, "wall_seconds": round(wall, 1), "jobs": jobs, "stages": sorted(timing)}
    sessions = [*(s for s in previous.get("sessions", []) if s.get("began") != began), this]
    total = sum(s["wall_seconds"] for s in sessions)
    summary = {"wall_seconds": total, "sessions": sessions, "stages": previous.get("stages", {}) | timing,
               "failed": failed}
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return total


def resumable(cmd: str, outs: list[Path]) -> bool:
    """Whether a run stage's output folder holds an unfinished run it can continue (`--resume`): a multi-hour
    run (the SmolLM2 profile) then spans several sittings, round by round, instead of starting over."""
    if "flows.experiment" not in cmd:
        return False
    for out in outs:
        metrics = out / "metrics.json"
        if out.is_dir() and metrics.exists():
            try:
                doc = json.loads(metrics.read_text())
            except ValueError:
                return False
            return not doc.get("complete") and bool(doc.get("rounds"))
    return False


def run_stage(stage: str, cmd: str, outs: list[Path], record: threading.Lock) -> tuple[str, float, int]:
    """Run one stage's command on one thread, then record it in dvc.lock; (stage, seconds, exit status). An
    unfinished run in its output folder is continued (`--resume`); anything else there is cleared first, as is
    a run that cannot be continued (other code or parameters: the resume refuses)."""
    LOGS.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = time.perf_counter()
    log_path = LOGS / f"{stage.replace('@', '-')}.log"
    code = None
    if resumable(cmd, outs):
        with open(log_path, "a") as log:
            log.write(f"\n--- resuming the unfinished run: {cmd} --resume\n")
            log.flush()
            code = subprocess.run(f"{cmd} --resume", shell=True, cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT).returncode
    if code != 0:
        clear(outs)
        with open(log_path, "a" if code is not None else "w") as log:
            code = subprocess.run(cmd, shell=True, cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    if code == 0:
        with record:
            done = dvc("commit", "-f", stage)
        if done.returncode != 0:
            print(f"  {stage}: ran, but dvc commit failed: {done.stderr.strip()[-300:]}", flush=True)
            code = done.returncode
    return stage, seconds, code


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-j", "--jobs", type=int, default=2, help="stages at once (one CPU thread each)")
    parser.add_argument("--only", nargs="*", default=None, help="stage name patterns, e.g. 'experiment@fedse-*'")
    parser.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    args = parser.parse_args(argv)
    started, began = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    timings = ROOT / "reports" / "results-timing.json"
    for stage in FIRST:
        if stage in stale() and not args.dry_run:
            print(f"dvc repro {stage}", flush=True)
            if dvc("repro", stage).returncode != 0:
                print(f"error: dvc repro {stage} failed", file=sys.stderr)
                return 1
    cmds = commands()
    todo = order([s for s in stale() if s in cmds and s not in FIRST and kind(s) not in LAST
                  and in_scope(s, args.only)], args.only)
    print(f"{len(todo)} stage(s) to run, {args.jobs} at a time: {', '.join(todo) or 'none'}", flush=True)
    if args.dry_run:
        return 0
    failed: list[str] = []
    timing: dict[str, float] = {}
    record = threading.Lock()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_stage, s, *cmds[s], record) for s in todo]
        for done, future in enumerate(as_completed(futures), 1):
            stage, seconds, code = future.result()
            timing[stage] = seconds
            status = "ok" if code == 0 else f"FAILED (exit {code}; log {LOGS / stage.replace('@', '-')}.log)"
            print(f"[{done}/{len(todo)}] {stage}: {seconds / 60:.1f} min {status}", flush=True)
            if code != 0:
                failed.append(stage)
            record_timing(timings, time.perf_counter() - started, args.jobs, timing, failed, began)
    left = stale()
    remaining = [s for s in left if kind(s) not in LAST and in_scope(s, args.only)]
    if not failed and remaining:
        more = " ..." if len(remaining) > 6 else ""
        print(f"{len(remaining)} stage(s) still to run ({', '.join(remaining[:6])}{more});"
              " each report is written once its own runs are all recorded: `make results` resumes", flush=True)
    if not failed:
        for report in ready(left, args.only):
            print(f"dvc repro -s {report}", flush=True)
            finish = dvc("repro", "-s", report)
            if finish.returncode != 0:
                print(f"error: dvc repro -s {report} failed: {finish.stderr.strip()[-500:]}", file=sys.stderr)
                failed.append(report)
    wall = time.perf_counter() - started
    total = record_timing(timings, wall, args.jobs, timing, failed, began) if todo else wall
    print(f"results table: {wall / 60:.1f} min wall for {len(todo)} stage(s) on {args.jobs} job(s)"
          f" ({total / 60:.1f} min over every invocation so far)"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
