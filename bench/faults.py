"""Fault injection into real smoke runs: does a run survive what federations meet, and lose nothing?

Each row injects one fault into a real run of the smoke profile (the tiny model, three clients, two rounds;
`--set` adds overrides, `--params` another params file) and compares it with the same run undisturbed:

* kill -9 of the driver (`fedse run` in its own process) at random moments, then `fedse run --resume`; the
  same for the Prefect flow (`python -m flows.experiment`, its whole process group), then its `resume`;
* a client whose training raises; a client that hangs (through the Prefect flow and its round deadline);
* a NaN, wrong-shape, 100x-scaled or sign-flipped upload (screened out), and the 100x one unscreened;
* the object store (SeaweedFS) stopped mid-round, then started again and the run resumed;
* a corrupt buffer file found on resume; a bad params value.

Columns: survived (the run completed, or stopped with one clear line and nothing overwritten where no run
can go on), records_lost (buffer records the undisturbed run has and this one lacks), identical_to_clean
(the final global adapter's sha256 equals the undisturbed run's; null where the fault changes the result by
design), macro (final macro success) and what the run did.

    python bench/faults.py [--kills 10] [--flow-kills 3] [--json] [--only kill,kill-flow,upload-nan,...]
                           [--set federation.rounds=2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fedse.federation as federation  # noqa: E402
from fedse.config import Config, run_config  # noqa: E402
from fedse.federation import Federation  # noqa: E402
from fedse.model import load_agent  # noqa: E402

CLIENTS = ["maze", "wordle", "textcraft"]
VICTIM = "textcraft"  # the client every in-process fault hits
BASE_SETS = [f"federation.clients=[{','.join(CLIENTS)}]", "federation.rounds=2"]


# ------------------------------------------------------------------ what a run left behind
def outcome(run: Path) -> dict[str, Any]:
    """Final global sha256, final macro, each buffer's record hashes, the hashes its manifests say were added
    (up to the last committed round), and whether metrics.json says complete."""
    metrics = run / "metrics.json"
    doc = json.loads(metrics.read_text()) if metrics.exists() else {"rounds": [], "complete": False}
    last = doc["rounds"][-1] if doc["rounds"] else {}
    held, committed = {}, {}
    for folder in sorted((run / "buffers").glob("*")):
        lines = (folder / "buffer.jsonl").read_text().splitlines() if (folder / "buffer.jsonl").exists() else []
        held[folder.name] = {h for h in map(record_hash, lines) if h}
        committed[folder.name] = {h for m in folder.glob("manifest_*.json")
                                  if int(m.stem.split("_", 1)[1]) < len(doc["rounds"])
                                  for h in json.loads(m.read_text())["added_hashes"]}
    return {"sha": last.get("global", {}).get("sha256"), "macro": last.get("macro"), "held": held,
            "committed": committed, "complete": bool(doc.get("complete")), "rounds": doc["rounds"]}


def record_hash(line: str) -> str | None:
    """A buffer line's content hash; None for a blank or damaged line (its record counts as lost)."""
    try:
        return json.loads(line)["content_hash"] if line.strip() else None
    except (ValueError, KeyError, TypeError):
        return None


def lost(clean: dict[str, Any], got: dict[str, Any], identical: bool | None) -> int:
    """Buffer records lost. Where the run should end as the undisturbed one (identical is not None): records
    the undisturbed run holds and this one does not. Where the fault changes what is explored by design: records
    this run committed (its manifests list them) that its buffers no longer hold."""
    if identical is not None:
        return sum(len(hashes - got["held"].get(c, set())) for c, hashes in clean["held"].items())
    return sum(len(hashes - got["held"].get(c, set())) for c, hashes in got["committed"].items())


def row(fault: str, survived: bool, clean: dict[str, Any], got: dict[str, Any] | None, identical: bool | None,
        did: str) -> dict[str, Any]:
    return {"fault": fault, "survived": survived, "records_lost": lost(clean, got, identical) if got else 0,
            "identical_to_clean": identical, "macro": got.get("macro") if got else None, "what_the_run_did": did}


# ------------------------------------------------------------------ runs
class Bench:
    def __init__(self, params: str, sets: list[str], work: Path, seed: int) -> None:
        self.params, self.sets, self.work, self.seed = params, [*BASE_SETS, *sets], work, seed
        self.cfg = self.config()
        self.clean: dict[str, Any] = {}
        self.clean_seconds = 0.0
        self.flow_done: tuple[dict[str, Any], float] | None = None

    def config(self, *extra: str) -> Config:
        return run_config(self.params, "smoke", "fedse", self.seed, [*self.sets, *extra])

    def cli(self, *args: str) -> list[str]:
        sets = [item for s in self.sets for item in ("--set", s)]
        return [sys.executable, "-m", "fedse.cli", "--params", self.params, "run", "--profile", "smoke",
                "--method", "fedse", "--seed", str(self.seed), *sets, *args]

    def flow(self, *args: str) -> list[str]:
        """The Prefect flow on a temporary local API (`python -m flows.experiment`), tracking into the bench's
        own MLflow store."""
        sets = [item for s in self.sets for item in ("--set", s)]
        return [sys.executable, "-m", "flows.experiment", "--params", self.params, "--profile", "smoke",
                "--method", "fedse", "--seed", str(self.seed), "--tracking-uri", f"sqlite:///{self.work / 'mlflow.db'}",
                *sets, *args]

    def flow_clean(self) -> tuple[dict[str, Any], float]:
        """The undisturbed flow run (once), and its wall time."""
        if not self.flow_done:
            out = self.work / "flow-clean"
            started = time.perf_counter()
            done = subprocess.run(self.flow("--out", str(out)), cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"error: the undisturbed flow run failed: {one_line(done.stderr)}")
            self.flow_done = (outcome(out), time.perf_counter() - started)
        return self.flow_done

    def in_process(self, out: Path, *extra: str, resume: bool = False) -> dict[str, Any]:
        cfg = self.config(*extra)
        Federation(load_agent(cfg.agent_spec(), seed=cfg.seed), cfg, out, resume=resume).run()
        return outcome(out)

    def run_clean(self) -> None:
        out = self.work / "clean"
        started = time.perf_counter()
        done = subprocess.run(self.cli("--out", str(out)), cwd=ROOT, capture_output=True, text=True)
        self.clean_seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"error: the undisturbed run failed: {done.stderr.strip().splitlines()[-1:]}")
        self.clean = outcome(out)


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def kill(bench: Bench, at: float, index: int, flow: bool = False) -> dict[str, Any]:
    """kill -9 the driver (`fedse run`, or with `flow` the Prefect flow's process group: its temporary API and
    task workers die with it, as in a power cut) at `at` of the undisturbed run's wall time, then resume until
    it completes; compared with the undisturbed run of the same driver."""
    out = bench.work / f"{'flow-' if flow else ''}kill-{index}"
    clean, seconds = bench.flow_clean() if flow else (bench.clean, bench.clean_seconds)
    start = bench.flow("--out", str(out)) if flow else bench.cli("--out", str(out))
    proc = subprocess.Popen(start, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        proc.wait(timeout=at * seconds)
        when = "finished before the kill"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        when = f"killed at {at * seconds:.1f} s, round {len(outcome(out)['rounds'])} in progress"
    again = bench.flow("--out", str(out), "--resume") if flow else bench.cli("--resume", str(out))
    resumed = subprocess.run(again, cwd=ROOT, capture_output=True, text=True)
    got = outcome(out)
    survived = resumed.returncode == 0 and got["complete"]
    how = "resume" if flow else "--resume"
    did = f"{when}; {how} {'completed' if survived else 'failed: ' + one_line(resumed.stderr)}"
    name = f"kill -9 flow #{index + 1}" if flow else f"kill -9 driver #{index + 1}"
    return row(name, survived, clean, got, got["sha"] == clean["sha"], did)


@contextmanager
def patched(name: str, wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    real = getattr(federation, name)
    with mock.patch.object(federation, name, wrapper(real)):
        yield


def victim_of(args: tuple[Any, ...]) -> str:
    """The client of a send_update call (transport, cfg, folder, round, client, state, weight)."""
    return args[4]


def bad_upload(kind: str) -> Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """How the victim corrupts its adapter before it uploads: from (its state, the broadcast one)."""
    def nan(s, g):
        return {k: torch.full_like(v, float("nan")) if i == 0 else v for i, (k, v) in enumerate(s.items())}

    def shape(s, g):
        return {k: v[:-1] if i == 0 else v for i, (k, v) in enumerate(s.items())}

    def scale(s, g):
        return {k: g[k] + 100 * (v - g[k]) for k, v in s.items()}

    def flip(s, g):
        return {k: -v for k, v in s.items()}

    return {"nan": nan, "shape": shape, "scale": scale, "flip": flip}[kind]


def upload_fault(bench: Bench, kind: str, screening: bool = True) -> dict[str, Any]:
    out = bench.work / f"upload-{kind}{'' if screening else '-unscreened'}"
    corrupt = bad_upload(kind)
    broadcast: dict[int, dict[str, torch.Tensor]] = {}

    def wrap_start(real):
        def start(transport, how, round, client, global_state, own, initial):
            state = real(transport, how, round, client, global_state, own, initial)
            broadcast[round] = state
            return state
        return start

    def wrap_send(real):
        def send(*args, **kw):
            args = list(args)
            if victim_of(tuple(args)) == VICTIM:
                args[5] = corrupt(args[5], broadcast[args[3]])
            return real(*args, **kw)
        return send

    extra = () if screening else ("aggregation.max_norm_ratio=null",)
    try:
        with patched("round_start", wrap_start), patched("send_update", wrap_send):
            got = bench.in_process(out, *extra)
    except Exception as exc:
        return row(f"{kind} upload" + ("" if screening else ", screening off"), False, bench.clean, outcome(out),
                   None, f"failed: {type(exc).__name__}: {one_line(str(exc))}")
    rejected = [r["client"] for rd in got["rounds"] for r in rd.get("aggregation", {}).get("rejected", [])]
    did = (f"{VICTIM} rejected in {len(rejected)} of {len(got['rounds'])} rounds, aggregated without it"
           if rejected else "accepted every upload")
    return row(f"{kind} upload" + ("" if screening else ", screening off"), got["complete"], bench.clean, got,
               None, did)


def client_raises(bench: Bench) -> dict[str, Any]:
    out = bench.work / "client-raises"

    def wrap(real):
        def train(agent, cfg, start, data, seed, advance=None):
            if data and data[0].env == VICTIM:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return real(agent, cfg, start, data, seed, advance)
        return train

    with patched("local_train", wrap):
        got = bench.in_process(out)
    missing = [c for rd in got["rounds"] for c in rd.get("aggregation", {}).get("missing", {})]
    return row("client raises", got["complete"], bench.clean, got, None,
               f"{VICTIM} missing in {len(missing)} of {len(got['rounds'])} rounds (quorum 2 of 3 met)")


def client_hangs(bench: Bench) -> dict[str, Any]:
    """Through the Prefect flow: a deadline is the flow's (the plain loop runs clients one after another)."""
    from prefect import task

    import flows.round_loop as loop
    from tasks.train import train as real_train

    # the deadline scales with this machine's pace now: the undisturbed run (two rounds, model load and
    # evaluation included) is more than one round's honest work, and the victim hangs a minute past it
    deadline = max(60.0, round(bench.clean_seconds))

    @task(name="train")
    def hanging(cfg, start, data, round, name):
        if name == VICTIM:
            time.sleep(deadline + 60)
        return real_train.fn(cfg, start, data, round, name)

    out = bench.work / "client-hangs"
    with mock.patch.object(loop, "train", hanging):
        state = loop.round_loop(method="fedse", profile="smoke", seed=bench.seed, params=bench.params,
                                sets=[*bench.sets, f"federation.client_timeout={deadline:g}",
                                      "orchestration.task_runner=thread"],
                                out=str(out), return_state=True)
    got = outcome(out)
    missing = [c for rd in got["rounds"] for c in rd.get("aggregation", {}).get("missing", {})]
    return row("client hangs", state.is_completed() and got["complete"], bench.clean, got, None,
               f"{VICTIM} missing in {len(missing)} of {len(got['rounds'])} rounds after the {deadline:g} s deadline")


def store_down(bench: Bench) -> dict[str, Any]:
    """SeaweedFS stopped while the victim uploads in round 1; started again; the run resumed."""
    from flows.seaweed import on_free_ports, serving

    root = bench.work / "seaweedfs"
    store = on_free_ports(root / "data", root / "state", CLIENTS)
    out = bench.work / "store-down"
    s3 = ["transport.backend=s3", f"transport.s3.endpoint={store.endpoint}", "transport.s3.bucket=fedse",
          f"transport.s3.credentials={store.credentials}", "transport.experiment=store-down"]
    with ExitStack() as running:
        running.enter_context(serving(store))

        def wrap(real):
            def send(*args, **kw):
                if victim_of(args) == VICTIM and args[3] == 1:
                    running.close()  # the store goes away mid-round
                return real(*args, **kw)
            return send

        try:
            with patched("send_update", wrap):
                bench.in_process(out, *s3)
            failure = "did not fail"
        except Exception as exc:
            failure = f"{type(exc).__name__}: {one_line(str(exc))}"
    with serving(store):
        try:
            got = bench.in_process(out, *s3, resume=True)
        except Exception as exc:
            return row("object store down mid-round", False, bench.clean, outcome(out), None,
                       f"stopped ({failure}); resume failed: {one_line(str(exc))}")
    return row("object store down mid-round", got["complete"], bench.clean, got, got["sha"] == bench.clean["sha"],
               f"stopped with one line ({failure[:400]}); store restarted, --resume completed")


def corrupt_buffer(bench: Bench) -> dict[str, Any]:
    """A buffer file damaged between a crash and the resume: refused in one line, the file left as it was."""
    out = bench.work / "corrupt-buffer"

    def wrap(real):
        calls = []

        def train(*args, **kwargs):
            calls.append(1)
            if len(calls) == len(CLIENTS) + 1:  # round 1's first client: round 0 is complete
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        return train

    try:
        with patched("local_train", wrap):
            bench.in_process(out)
    except KeyboardInterrupt:
        pass
    path = out / "buffers" / "maze" / "buffer.jsonl"
    damaged = path.read_bytes()[:-40]
    path.write_bytes(damaged)
    try:
        bench.in_process(out, resume=True)
        return row("corrupt buffer file", False, bench.clean, outcome(out), None, "resumed on a damaged buffer")
    except Exception as exc:
        message = str(exc)
    kept = path.read_bytes() == damaged
    return row("corrupt buffer file", "\n" not in message and kept, bench.clean, None, None,
               f"refused in one line ({one_line(message)[:120]}); the file was {'left as is' if kept else 'changed'}")


def bad_params(bench: Bench) -> dict[str, Any]:
    out = bench.work / "bad-params"
    done = subprocess.run(bench.cli("--out", str(out), "--set", "learner.lr=-1"), cwd=ROOT, capture_output=True,
                          text=True)
    message = [line for line in done.stderr.strip().splitlines() if line.strip()]
    clean = done.returncode == 2 and len(message) == 1 and not out.exists()
    return row("bad params value", clean, bench.clean, None, None,
               f"exit {done.returncode}: {message[-1][:120] if message else ''}; nothing written")


FAULTS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "client-raises": client_raises,
    "client-hangs": client_hangs,
    **{f"upload-{k}": (lambda b, k=k: upload_fault(b, k)) for k in ("nan", "shape", "scale", "flip")},
    "upload-scale-unscreened": lambda b: upload_fault(b, "scale", screening=False),
    "store-down": store_down,
    "corrupt-buffer": corrupt_buffer,
    "bad-params": bad_params,
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="kill -9 points (random, seeded)")
    parser.add_argument("--flow-kills", type=int, default=3, help="kill -9 points of the Prefect flow")
    parser.add_argument("--only", default=None, help=f"comma-separated: kill,kill-flow,{','.join(FAULTS)}")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override a parameter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    chosen = args.only.split(",") if args.only else ["kill", "kill-flow", *FAULTS]
    unknown = sorted(set(chosen) - {"kill", "kill-flow", *FAULTS})
    if unknown:
        print(f"error: unknown fault(s) {', '.join(unknown)}; known: kill, kill-flow, {', '.join(FAULTS)}",
              file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedse-faults-") as tmp:
        bench = Bench(args.params, args.sets, Path(tmp), args.seed)
        bench.run_clean()
        rng = random.Random(args.seed)
        kills = [(i, False) for i in range(args.kills)] if "kill" in chosen else []
        kills += [(i, True) for i in range(args.flow_kills)] if "kill-flow" in chosen else []
        for i, flow in kills:
            rows.append(kill(bench, rng.uniform(0.05, 0.95), i, flow))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        for name in chosen:
            if name not in ("kill", "kill-flow"):
                rows.append(FAULTS[name](bench))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        summary = {"clean": {"macro": bench.clean["macro"], "seconds": bench.clean_seconds, "sha": bench.clean["sha"]},
                   "faults": rows}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"undisturbed run: macro {summary['clean']['macro']:.3f}, {bench.clean_seconds:.0f} s")
        print(f"{'fault':<30} {'survived':<9} {'lost':<5} {'identical':<10} {'macro':<6} what the run did")
        for r in rows:
            ident = "-" if r["identical_to_clean"] is None else ("yes" if r["identical_to_clean"] else "NO")
            macro = "-" if r["macro"] is None else f"{r['macro']:.3f}"
            print(f"{r['fault']:<30} {'yes' if r['survived'] else 'NO':<9} {r['records_lost']:<5} {ident:<10} "
                  f"{macro:<6} {r['what_the_run_did']}")
    return 0 if all(r["survived"] and r["records_lost"] == 0 and r["identical_to_clean"] is not False
                    for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
