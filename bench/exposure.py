"""The secret-sharer exposure of one organisation's trajectories in what leaves it, with and without each kind of
differential privacy (fedse/exposure.py says how exposure is measured).

Three organisations (textcraft, maze, wordle) on the embedded tiny model, Fed-SE, 2 rounds of the quick profile's
loop made small (8 explorations per client per round, 32 optimizer steps of 8 rows per round, every client the
same steps so the three modes differ only in their privacy). Maze's buffer holds its 16 expert seeds and nine
planted canaries, three each repeated 1, 4 and 16 times; sixteen more secrets are never planted (the random
baseline).
Evaluation plays one validation task per environment: no test task is used.

    python bench/exposure.py [--candidates 2000] [--epsilon 8] [--out reports/privacy] [--json]

Per mode (none, record-level DP-SGD at ε, client-level DP-FedAvg at ε), the exposure in bits of each canary
in the final global adapter and in maze's own last upload, the base model's as the reference, the ε spent, and
the seconds and bytes of a round. Writes <out>/exposure.json and exposure.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedse import exposure  # noqa: E402
from fedse.config import load_config  # noqa: E402
from fedse.federation import Federation  # noqa: E402
from fedse.model import Agent, load_agent, read_adapter, set_adapter_state  # noqa: E402
from fedse.seed import seed_file, write_seed_file  # noqa: E402
from fedse.trajectory import Trajectory, read_jsonl, write_jsonl  # noqa: E402

ENVS = ["textcraft", "maze", "wordle"]
REPEATS = (1, 4, 16)
PER_REPEAT = 3  # secrets planted at each repetition count: one secret's exposure is one draw of a noisy rank
UNPLANTED = 16
SEEDS = 16


def settings(seeds: Path, epsilon: float) -> dict[str, list[str]]:
    """The run's overrides of the quick profile, and each mode's own."""
    common = ["federation.method=fedse", "federation.rounds=2", "federation.explore_episodes=8",
              "federation.seeds_per_client=null", "federation.eval_episodes=1", "federation.final_eval_episodes=1",
              "federation.eval_split=val", "eval.passes=1", "learner.steps=32", "learner.batch_size=8",
              "orchestration.task_runner=thread", f"seed_data.dir={seeds}", f"federation.clients=[{', '.join(ENVS)}]"]
    return {"none": common,
            "record": [*common, "privacy.record.enabled=true", f"privacy.record.epsilon={epsilon}",
                       "privacy.record.sample_rate=0.25"],
            "client": [*common, "privacy.client.enabled=true", f"privacy.client.epsilon={epsilon}"]}


def plant(seeds: Path, rng: random.Random, candidates: int) -> tuple[Trajectory, dict, list, list]:
    """Expert seeds for each organisation, maze's with the canaries appended; returns the canaries' context, the
    plan (secret → repetitions), the never-planted secrets and the candidates."""
    for env in ENVS:
        write_seed_file(env, SEEDS, seeds, seed=0)
    path = seed_file(seeds, 0, "maze")
    records = list(read_jsonl(path))
    context = records[0]
    repeats = [k for k in REPEATS for _ in range(PER_REPEAT)]
    chosen = exposure.secrets(rng, len(repeats) + UNPLANTED)
    plan = dict(zip(chosen[:len(repeats)], repeats, strict=True))
    write_jsonl(path, records + exposure.planted(context, plan))
    return context, plan, chosen[len(repeats):], exposure.secrets(rng, candidates, avoid=chosen)


def measure(agent: Agent, context: Trajectory, plan: dict, unplanted: list, candidates: list) -> dict[str, Any]:
    """Exposure of each planted canary and of the unplanted secrets under the agent's current adapter."""
    pool = exposure.log_perplexity(agent, context, candidates)
    bits = exposure.log_perplexity(agent, context, list(plan) + unplanted)
    planted: dict[str, list[float]] = {}
    for k, b in zip(plan.values(), bits, strict=False):
        planted.setdefault(str(k), []).append(exposure.exposure(b, pool))
    baseline = [exposure.exposure(b, pool) for b in bits[len(plan):]]
    return {"planted": planted, "unplanted_mean": statistics.fmean(baseline), "unplanted_max": max(baseline)}


def cell(values: list[float]) -> str:
    return f"{statistics.fmean(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def run_mode(name: str, overrides: list[str], work: Path, found: tuple) -> dict[str, Any]:
    cfg = load_config(ROOT / "params.yaml", profile="quick", overrides=overrides)
    out = work / name
    started = time.perf_counter()
    doc = Federation(load_agent(cfg.agent_spec(), seed=0), cfg, out).run()
    seconds = time.perf_counter() - started
    agent = load_agent(cfg.agent_spec(), seed=0)
    last = doc["rounds"][-1]
    set_adapter_state(agent, read_adapter(out / "adapters" / f"round_{last['round']}"), origin="global adapter")
    result = {"global": measure(agent, *found)}
    (upload,) = sorted(out.glob(f"exchange/client_maze/*/round_{last['round']}/adapter.safetensors"))
    set_adapter_state(agent, read_adapter(upload), origin="maze's upload")
    result["maze_upload"] = measure(agent, *found)
    clients = [c for r in doc["rounds"] for c in r["clients"].values()]
    result |= {"privacy": last.get("privacy", {}), "seconds": seconds,
               "round_seconds": statistics.fmean(r["seconds"] for r in doc["rounds"]),
               "train_seconds": statistics.fmean(c["train_seconds"] for c in clients),
               "bytes_sent": statistics.fmean(c["bytes_sent"] for c in clients),
               "macro_val": last["macro"]}
    return result


def table(doc: dict[str, Any]) -> str:
    modes = doc["modes"]
    base = doc["base"]
    lines = ["| canary repetitions | base model | " + " | ".join(f"{m}: global / maze's upload" for m in modes)
             + " |", "|---|---|" + "---|" * len(modes)]
    for k in [str(k) for k in REPEATS]:
        lines.append(f"| {k} | {cell(base['planted'][k])} | " + " | ".join(
            f"{cell(r['global']['planted'][k])} / {cell(r['maze_upload']['planted'][k])}" for r in modes.values())
            + " |")
    lines.append(f"| never planted (mean of {UNPLANTED}) | {base['unplanted_mean']:.1f} | " + " | ".join(
        f"{r['global']['unplanted_mean']:.1f} / {r['maze_upload']['unplanted_mean']:.1f}" for r in modes.values())
        + " |")
    eps = [f"{m}: " + (", ".join(f"{kind} ε {v['epsilon']:.2f}" for kind, v in r["privacy"].items()) or "ε ∞")
           for m, r in modes.items()]
    cost = [f"{m}: {r['train_seconds']:.1f} s training per client-round, {r['round_seconds']:.0f} s per round, "
            f"{r['bytes_sent']:,.0f} bytes per upload" for m, r in modes.items()]
    return "\n".join([
        f"Exposure in bits (cap log₂({doc['candidates']} + 1) = {doc['cap']:.1f}; a secret the model knows nothing "
        "of averages ≈ 1.4; 'base model': the same secrets before any training, their chance values). Each cell: "
        f"the mean over the {PER_REPEAT} secrets planted that many times (smallest–largest).", "", *lines, "",
        "Privacy spent: " + "; ".join(eps) + ".",
        "", "Cost: " + "; ".join(cost) + "."])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=2000, help="random secrets never planted, to rank against")
    parser.add_argument("--epsilon", type=float, default=8.0, help="ε of both DP modes after the run")
    parser.add_argument("--modes", default="none,record,client")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "privacy")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)


    with tempfile.TemporaryDirectory(prefix="fedse-exposure-") as tmp:
        work = Path(tmp)
        found = plant(work / "seeds", random.Random(2026), args.candidates)
        modes = settings(work / "seeds", args.epsilon)
        base_cfg = load_config(ROOT / "params.yaml", profile="quick", overrides=modes["none"])
        doc: dict[str, Any] = {"candidates": args.candidates, "cap": math.log2(args.candidates + 1),
                               "repeats": list(REPEATS), "epsilon": args.epsilon,
                               "base": measure(load_agent(base_cfg.agent_spec(), seed=0), *found), "modes": {}}
        for name in args.modes.split(","):
            print(f"exposure: running mode {name}", file=sys.stderr, flush=True)
            doc["modes"][name] = run_mode(name, modes[name], work / "runs", found)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "exposure.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "exposure.md").write_text("# Exposure of planted canaries (bench/exposure.py)\n\n" + table(doc) + "\n")
    print(json.dumps(doc, indent=1) if args.json else table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
