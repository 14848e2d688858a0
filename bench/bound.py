"""How close acting and training come to this CPU's arithmetic bound, for any model preset.

The bound is measured, not quoted: the GFLOP/s of large matrix products in fp32 and bf16 on the same threads,
in the same run. The work is counted, not estimated: one rollout (or one training epoch) runs under
torch's FLOP counter, then the identical one (same episode keys, same seed, a fresh adapter) runs timed
without it. Achieved GFLOP/s = counted FLOPs / timed seconds, and the report gives it as a fraction of the
fp32 bound. Counted FLOPs are those executed (padding and masked attention included), which is what the
hardware pays for; the useful share is below that.

    python bench/bound.py [--envs textcraft,maze,wordle] [--episodes 16] [--trajectories 32] [--json]
    python bench/bound.py --set model.preset=smollm2-135m --episodes 4 --trajectories 8
    python bench/bound.py --set model.preset=smollm2-135m --modes react,constrained   # both, side by side

`--modes a,b` plays the same episodes in each policy mode in the same run (keys `act.<mode>.*`) and prints
`act.ratio.b_over_a`, the decisions/s of b over a.

`--before` also plays the same episodes (timed, not counted) with the acting code as it was before issue 29
(`bench/act_before.py`: ReAct re-prefilling its whole prompt every turn, chunked scheduling), each env's
before run right before its after runs so that machine noise hits both, and prints `act.<mode>.before.*` and
`act.ratio.<mode>.after_over_before`. The two sample differently (ReAct: one stream per batch before, one per
episode after), so ReAct plays other episodes of the same tasks: compare decisions/s, not decision counts.
`--round PROFILE` times one round of that profile (its own model, in process, one thread) with the acting code
before and after, and says whether the global adapter (sha256) and the evaluation (per-task success, decision
count) came out identical.

    python bench/bound.py --set model.preset=smollm2-135m --modes react,constrained --before --round quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from act_before import rollout_before
from report import emit
from torch.utils import flop_counter

from fedse.config import load_config
from fedse.envs.registry import env_class
from fedse.learner import train
from fedse.model import adapter_state, load_agent, set_adapter_state
from fedse.rollout import rollout
from fedse.seed import expert_trajectories
from fedse.threads import torch_threads


def _count_cpu_attention() -> None:
    """torch counts the GPU attention kernels but not the CPU one our models run, which would undercount."""
    ops = torch.ops.aten
    if ops._scaled_dot_product_flash_attention_for_cpu in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(ops._scaled_dot_product_flash_attention_for_cpu)
    def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(ops._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _sync() -> None:
    """GPU kernels run asynchronously: a clock read without waiting for them times the launches only."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_gflops(dtype: torch.dtype, device: torch.device | str = "cpu", size: int | None = None,
                seconds: float = 2.0) -> float:
    """GFLOP/s of repeated size³ matrix products: what this device's kernels reach when nothing else limits them
    (a card needs larger products than a CPU to fill its units: 8192 there, 1024 here)."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 1024)
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm-up: thread pool and kernel selection
    _sync()
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        done += 1
        if device.type == "cuda" and done % 8 == 0:
            _sync()
    _sync()
    elapsed = time.perf_counter() - start
    return done * 2 * size**3 / elapsed / 1e9


def counted(fn) -> tuple[float, Any]:
    """(FLOPs executed by fn, its result)."""
    with flop_counter.FlopCounterMode(display=False) as mode:
        result = fn()
    return float(mode.get_total_flops()), result


def timed(fn) -> tuple[float, Any]:
    _sync()
    start = time.perf_counter()
    result = fn()
    _sync()
    return time.perf_counter() - start, result


@contextlib.contextmanager
def peak_memory(out: dict[str, float], key: str) -> Iterator[None]:
    """The phase's peak allocated GPU memory in GiB as out[key] (none on a CPU, where torch keeps no such count;
    bench/memory.py measures CPU training's live tensors)."""
    if not torch.cuda.is_initialized():
        yield
        return
    torch.cuda.reset_peak_memory_stats()
    yield
    out[key] = torch.cuda.max_memory_allocated() / 2**30


def acting(agent, cfg, envs: list[str], episodes: int, before: bool = False) -> dict[str, float]:
    """Exploration rollouts (the policy's temperature, batch and window as configured); with `before`, each
    env's episodes are first played by the acting code before issue 29, timed."""
    out: dict[str, float] = {}
    flops = seconds = decisions = generated = old_flops = old_seconds = old_decisions = 0.0
    with peak_memory(out, "act.peak_gib"):
        for name in envs:
            ids = env_class(name).explore_ids()[:episodes]
            if before:
                def old(name=name, ids=ids):
                    return rollout_before(agent, name, ids, cfg.policy, False, cfg.seed, round=0)

                f, _ = counted(old)
                s, played = timed(old)
                old_flops, old_seconds = old_flops + f, old_seconds + s
                old_decisions += played.pace.decisions
                out[f"act.{name}.before.decisions_per_sec"] = played.pace.decisions / s

            def play(name=name, ids=ids):
                return rollout(agent, name, ids, cfg.policy, False, cfg.seed, round=0)

            f, _ = counted(play)
            s, played = timed(play)
            flops, seconds, decisions = flops + f, seconds + s, decisions + played.pace.decisions
            generated += played.pace.generated
            out[f"act.{name}.decisions_per_sec"] = played.pace.decisions / s
            out[f"act.{name}.gflops"] = f / s / 1e9
    out |= {"act.decisions_per_sec": decisions / seconds, "act.gflop_per_decision": flops / decisions / 1e9,
            "act.gflops": flops / seconds / 1e9}
    if generated:
        out["act.generated_tokens_per_sec"] = generated / seconds
    if before:
        out |= {"act.before.decisions_per_sec": old_decisions / old_seconds,
                "act.before.gflops": old_flops / old_seconds / 1e9,
                "act.ratio.after_over_before": (decisions / seconds) / (old_decisions / old_seconds)}
    return out


@contextlib.contextmanager
def acting_before() -> Iterator[None]:
    """The round loop's rollouts played by the acting code before issue 29 (everything else as it is)."""
    import fedse.federation as federation

    current = federation.rollout
    federation.rollout = rollout_before
    try:
        yield
    finally:
        federation.rollout = current


def round_time(params: str, profile: str) -> dict[str, Any]:
    """One round of `profile` in process (one torch thread), acting before and after issue 29, from the same
    fresh adapter: seconds, and whether the global adapter and the evaluation came out identical."""
    from fedse.federation import Federation

    scratch = Path(tempfile.mkdtemp(prefix="fedse-bound-"))
    cfg = load_config(params, profile=profile, overrides=[
        "federation.rounds=1", "policy.threads=1", "learner.threads=1", f"transport.dir={scratch / 'exchange'}"])
    agent = load_agent(cfg.model, seed=cfg.seed)
    fresh = adapter_state(agent)
    seconds, rounds = {}, {}
    try:
        for which in ("before", "after"):
            set_adapter_state(agent, fresh)
            with acting_before() if which == "before" else contextlib.nullcontext(), torch_threads(1):
                start = time.perf_counter()
                Federation(agent, cfg, scratch / which).run()
                seconds[which] = time.perf_counter() - start
            rounds[which] = json.loads((scratch / which / "metrics.json").read_text())["rounds"][-1]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def results(record: dict[str, Any]) -> dict[str, Any]:
        return {"envs": {k: (v["task_success"], v["episodes"]) for k, v in record["envs"].items()},
                "eval_decisions": record["eval_decisions"]}

    return {f"round.{profile}.before_seconds": seconds["before"], f"round.{profile}.after_seconds": seconds["after"],
            f"round.{profile}.before_over_after": seconds["before"] / seconds["after"],
            f"round.{profile}.same_global_adapter": rounds["before"]["global"]["sha256"]
            == rounds["after"]["global"]["sha256"],
            f"round.{profile}.same_evaluation": results(rounds["before"]) == results(rounds["after"]),
            f"round.{profile}.macro": rounds["after"]["macro"]}


def training(agent, cfg, env: str, trajectories: int) -> dict[str, float]:
    """One epoch of local SFT on expert episodes, from the same fresh adapter both times."""
    spec = cfg.learner.model_copy(update={"epochs": 1})
    trajs, _ = expert_trajectories(env, trajectories, seed=cfg.seed)
    fresh = adapter_state(agent)
    flops, _ = counted(lambda: train(agent, trajs, spec, seed=cfg.seed))
    set_adapter_state(agent, fresh)
    out: dict[str, float] = {}
    with peak_memory(out, "train.peak_gib"):
        seconds, stats = timed(lambda: train(agent, trajs, spec, seed=cfg.seed))
    set_adapter_state(agent, fresh)
    return out | {"train.tokens_per_sec": stats.tokens / seconds, "train.gflop_per_token": flops / stats.tokens / 1e9,
                  "train.gflops": flops / seconds / 1e9}


def phase_table(result: dict[str, Any]) -> str:
    """The per-phase table (markdown) of one bound.py result: decisions/s, generated tokens/s, training
    tokens/s, peak GPU memory, and the achieved rate as a share of the matrix rate measured at the model's own
    dtype (bf16 on a card, fp32 on a CPU), acting before and after issue 29 side by side."""
    dtype = {"bfloat16": "bf16", "float32": "fp32"}.get(result.get("dtype", "float32"), "fp32")
    bound = result[f"bound.{dtype}_gflops"]
    modes = sorted({k.split(".")[1] for k in result if k.startswith("act.") and k.endswith(".share_of_fp32_bound")
                    and k.count(".") == 2} or {""})

    def cell(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value else "—"

    def act(mode: str, when: str) -> str | None:
        prefix = f"act.{mode}." if mode else "act."
        stem = f"{prefix}before." if when == "before" else prefix
        if f"{stem}decisions_per_sec" not in result:
            return None
        rate = result.get(f"{stem}gflops")
        memory = result.get(f"{prefix}peak_gib") if when == "after" else None
        return (f"| act {mode or result.get('policy_mode', '')} ({when}) | {result[f'{stem}decisions_per_sec']:,.1f} | "
                f"{cell(result.get(f'{stem}generated_tokens_per_sec'), ',.0f')} | — | {cell(memory, '.2f')} | "
                f"{cell(rate and rate / bound, '.2%')} |")

    rows = [row for mode in modes for when in ("before", "after") if (row := act(mode, when))]
    memory = cell(result.get("train.peak_gib"), ".2f")
    rows.append(f"| train | — | — | {result['train.tokens_per_sec']:,.0f} | {memory} | "
                f"{result['train.gflops'] / bound:.2%} |")
    head = ["| phase | decisions/s | generated tokens/s | training tokens/s | peak GiB | share of bound |",
            "|---|---|---|---|---|---|"]
    note = (f"{result['model']} ({result.get('dtype', 'float32')}) on {result.get('device', 'cpu')}, "
            f"{result['threads']} threads; bound = {bound:,.0f} GFLOP/s, {dtype} matrix products measured in the "
            "same run; generated tokens: ReAct's replies (the constrained policy scores, it writes none); peak GiB: "
            "allocated GPU memory (none on a CPU)")
    return "\n".join([note, "", *head, *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="textcraft,maze,wordle")
    parser.add_argument("--episodes", type=int, default=16, help="explored train tasks per env")
    parser.add_argument("--train-env", default="textcraft")
    parser.add_argument("--trajectories", type=int, default=32, help="expert episodes trained on (one epoch)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads [policy.threads, else torch's]")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None, help="a params.yaml profile [the file's own]")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override a parameter")
    parser.add_argument("--modes", default=None, help="policy modes side by side, e.g. react,constrained")
    parser.add_argument("--before", action="store_true", help="also play the episodes with the acting code before "
                        "issue 29 (bench/act_before.py) and print the ratios")
    parser.add_argument("--round", default=None, help="a profile whose first round is timed with the acting code "
                        "before and after issue 29")
    parser.add_argument("--table", type=Path, default=None, help="also write the per-phase table (markdown) here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cfg = load_config(args.params, profile=args.profile, overrides=args.sets)
    _count_cpu_attention()
    agent = load_agent(cfg.model, seed=cfg.seed)
    params = sum(p.numel() for p in agent.model.parameters())
    threads = args.threads or cfg.policy.threads or torch.get_num_threads()
    device = agent.device
    with torch_threads(threads):
        result: dict[str, Any] = {"model": agent.name, "parameters_m": params / 1e6, "threads": threads,
                                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                  "dtype": str(next(agent.model.parameters()).dtype).removeprefix("torch."),
                                  "policy_mode": cfg.policy.mode,
                                  "bound.fp32_gflops": peak_gflops(torch.float32, device),
                                  "bound.bf16_gflops": peak_gflops(torch.bfloat16, device)}
        modes = args.modes.split(",") if args.modes else [None]
        for mode in modes:
            policy = cfg.policy.model_copy(update={"threads": threads, **({"mode": mode} if mode else {})})
            got = acting(agent, cfg.model_copy(update={"policy": policy}), args.envs.split(","), args.episodes,
                         args.before)
            result |= {k.replace("act.", f"act.{mode}.", 1): v for k, v in got.items()} if len(modes) > 1 else got
        result |= training(agent, cfg, args.train_env, args.trajectories)
    if args.round:
        result |= round_time(args.params, args.round)
    for dtype in ("fp32", "bf16"):
        bound = result[f"bound.{dtype}_gflops"]
        for prefix in [f"act.{m}." for m in modes] if len(modes) > 1 else ["act."]:
            result[f"{prefix}share_of_{dtype}_bound"] = result[f"{prefix}gflops"] / bound
        result[f"train.share_of_{dtype}_bound"] = result["train.gflops"] / bound
    if len(modes) > 1:
        result[f"act.ratio.{modes[-1]}_over_{modes[0]}"] = (result[f"act.{modes[-1]}.decisions_per_sec"]
                                                           / result[f"act.{modes[0]}.decisions_per_sec"])
    emit(result, args.json)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(phase_table(result) + "\n")


if __name__ == "__main__":
    main()
