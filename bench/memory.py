"""Memory table: fedse/memory.py's estimate against measured peaks (SmolLM2-135M on this CPU), and the estimate
for Qwen2.5-7B-Instruct under the `paper` profile on an 80 GiB GPU.

Measured, each case in a fresh process (so no case inherits memory another freed), one torch thread, fp32:

- peak RSS growth of one training step: `fedse.learner.fit` on one batch that fills the case's token budget
  with real windows (SmolLM2's encoding of WebShop expert episodes, cut into 1024-token rows; with several
  rows the last is one token short, so the batch is padded like a real one). Peak = the
  kernel's resident high-water mark (VmHWM, reset through /proc/self/clear_refs right before the step), minus
  the resident set at that moment, taken after malloc_trim so that memory the model's load freed is given
  back rather than silently reused. Why RSS rather than torch's memory profiler: on a CPU torch allocates
  through malloc, and the high-water mark is exact (no sampling) and counts everything the step holds:
  activations, logits, gradients, AdamW's moments, and whatever the estimate forgot. A warm-up step on one
  short row first loads the code paths, so the step measured allocates data only;
- what autograd keeps for the backward pass of that batch (torch's saved-tensor hooks, each storage once,
  weights left out): the activation term alone, exactly (with checkpointing, the forward pass's part only: the
  layer inputs, not the one layer recomputed in the backward pass);
- the frozen weights: resident growth of loading the model (after malloc_trim), against P × 4 bytes.

The estimate for the same batch takes the batch's real share of labelled tokens (the pre-run check assumes 0.4).

    python bench/memory.py [--budgets 1024,3072] [--json] [--no-measure]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = 1024  # tokens per training row (learner.max_len of the cases)
GiB = 1024 ** 3
# Qwen2.5-7B-Instruct's config.json (the `paper` profile's model; no hub here): the numbers the estimate reads
QWEN_7B = {"model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584, "intermediate_size": 18944,
           "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
           "max_position_embeddings": 32768}


def status(key: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM, RssAnon)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def settle() -> int:
    """Free what can be freed, give it back to the kernel, reset the high-water mark; the resident set now."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return status("VmRSS")


def rows(agent, count: int) -> list:
    """`count` rows of ROW tokens (the last one, of several, ROW - 1): WebShop expert episodes encoded as the
    learner does, concatenated."""
    from fedse.learner import Example, encode
    from fedse.seed import expert_trajectories

    trajs, _ = expert_trajectories("webshop", 4 * count + 4, seed=0)
    ids, labels = [], []
    for t in trajs:
        for e in encode(agent, t, ROW):
            ids += e.ids
            labels += e.labels
    if len(ids) < count * ROW:
        raise SystemExit(f"only {len(ids)} tokens of WebShop episodes; need {count * ROW}")
    out = [Example(ids[k * ROW:(k + 1) * ROW], labels[k * ROW:(k + 1) * ROW]) for k in range(count)]
    if count > 1:  # the last row one token short: padded, as real batches are (transformers then passes the
        out[-1] = Example(out[-1].ids[:-1], out[-1].labels[:-1])  # padding mask and repeats k and v)
    return out


def saved_bytes(agent, batch: list, checkpoint: bool) -> int:
    """Bytes autograd keeps for this batch's backward pass (fedse.memory.saved_by_autograd)."""
    from fedse.learner import collate
    from fedse.memory import saved_by_autograd

    ids, labels, mask = collate(batch, agent.tokenizer.pad_token_id or 0)
    return saved_by_autograd(agent.model, ids, mask, labels, checkpoint)


def measure(case: dict) -> dict:
    """One case, in this (fresh) process: weights' resident growth, the step's peak growth, autograd's bytes."""
    import torch

    from fedse import kernels

    kernels.choose("portable")
    torch.set_num_threads(1)
    import peft  # noqa: F401  (the libraries' own memory is not the weights')
    import transformers  # noqa: F401

    from fedse.learner import IGNORE, LearnerSpec, fit
    from fedse.memory import Shape, Training, lora_params, training
    from fedse.model import ModelSpec, load_agent

    before = settle()
    agent = load_agent(ModelSpec(preset="smollm2-135m", attn_implementation=case["attention"]))
    weights = settle() - before
    batch = rows(agent, case["budget"] // ROW)
    spec = LearnerSpec(lr=1e-3, epochs=1, batch_tokens=case["budget"], max_len=ROW, threads=1,
                       gradient_checkpointing=case["checkpointing"])
    fit(agent, [dataclasses.replace(batch[0], ids=batch[0].ids[:64], labels=batch[0].labels[:64])], spec)  # warm-up
    base = settle()
    start = time.perf_counter()
    stats = fit(agent, batch, spec)
    growth, seconds = status("VmHWM") - base, time.perf_counter() - start
    assert stats.steps == 1 and stats.examples == len(batch)
    kept = saved_bytes(agent, batch, case["checkpointing"])
    labelled = sum(x != IGNORE for e in batch for x in e.labels[1:]) / case["budget"]
    shape = Shape.from_config(agent.model.config)
    setting = Training(tokens=case["budget"], width=ROW, mask_bytes=4, checkpointing=case["checkpointing"],
                       attention=case["attention"], labelled=labelled)
    estimate = training(shape, setting)
    lora, _ = lora_params(shape, setting)
    step_estimate = estimate.total - estimate.parts["weights"] - 4 * lora  # what the step adds to the process
    return case | {"weights_measured": weights, "weights_estimate": estimate.parts["weights"],
                   "step_measured": growth, "step_estimate": step_estimate, "saved_by_autograd": kept,
                   "activations_estimate": estimate.parts["activations"], "labelled_share": labelled,
                   "step_seconds": seconds}


def smollm2_cases(budgets: list[int]) -> list[dict]:
    """Checkpointing off and on at each budget, and eager attention at the first budget."""
    cases = [{"budget": b, "checkpointing": c, "attention": "sdpa"} for b in budgets for c in (False, True)]
    return [*cases, {"budget": budgets[0], "checkpointing": False, "attention": "eager"}]


def run_case(case: dict) -> dict:
    """`measure(case)` in a fresh interpreter running this repository's fedse, twice: with glibc's malloc as
    it comes (what a run's process takes from the kernel, freed heap memory that malloc keeps included), and
    with every allocation of 64 KiB or more mapped on its own (MALLOC_MMAP_THRESHOLD_), so that a freed tensor
    goes back to the kernel at once and the high-water mark is the live tensors' (what the estimate models)."""
    out = {}
    for malloc, extra in (("default", {}), ("mmap", {"MALLOC_MMAP_THRESHOLD_": "65536"})):
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)} | extra
        done = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=1800)
        if done.returncode:
            raise SystemExit(f"case {case} failed:\n{done.stderr[-2000:]}")
        found = json.loads(done.stdout.strip().splitlines()[-1])
        out |= found if malloc == "mmap" else {}
        out[f"step_measured_{malloc}"] = found["step_measured"]
        out[f"step_seconds_{malloc}"] = found["step_seconds"]
    del out["step_measured"], out["step_seconds"]
    return out


def paper_rows() -> list[dict]:
    """The 7B estimate under the paper profile, as shipped before this issue and with the settings that fit."""
    import torch

    from fedse import memory
    from fedse.config import load_config

    shape = memory.Shape.from_config(QWEN_7B)
    out = []
    for label, sets in [("paper before (no checkpointing)", ["learner.gradient_checkpointing=false"]),
                        ("paper before, eager attention", ["learner.gradient_checkpointing=false",
                                                    "model.attn_implementation=eager"]),
                        ("paper before, learner.batch_tokens=6144", ["learner.gradient_checkpointing=false",
                                                              "learner.batch_tokens=6144"]),
                        ("paper as shipped (gradient_checkpointing)", []),
                        ("paper + checkpointing, batch_tokens=32768", ["learner.batch_tokens=32768"])]:
        cfg = load_config(ROOT / "params.yaml", profile="paper", overrides=sets)
        plan = memory.plan(cfg, shape, torch.device("cuda"), torch.bfloat16)
        found = memory.verdict(plan, 80 * GiB, "free on an 80 GiB GPU")
        out.append({"setting": label, "train": found.train.parts, "act": found.act.parts,
                    "train_total": found.train.total, "act_total": found.act.total, "fits": found.fits,
                    "line": found.line})
    return out


def gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def table(measured: list[dict], paper: list[dict]) -> str:
    lines = []
    if measured:
        lines += ["SmolLM2-135M on this CPU (fp32, LoRA r=8 all-linear, 1024-token rows, one step; GiB):", "",
                  "| budget | checkpointing | attention | step: estimated | peak RSS growth, live tensors "
                  "(mmap) | ratio | peak RSS growth, glibc default | ratio | activations: estimated | kept by "
                  "autograd | ratio | step s (default / mmap) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in measured:
            live, default = m["step_measured_mmap"], m["step_measured_default"]
            lines.append(f"| {m['budget']} | {'on' if m['checkpointing'] else 'off'} | {m['attention']} | "
                         f"{gib(m['step_estimate'])} | {gib(live)} | {m['step_estimate'] / live:.2f} | "
                         f"{gib(default)} | {m['step_estimate'] / default:.2f} | {gib(m['activations_estimate'])} | "
                         f"{gib(m['saved_by_autograd'])} | {m['activations_estimate'] / m['saved_by_autograd']:.2f} "
                         f"| {m['step_seconds_default']:.0f} / {m['step_seconds_mmap']:.0f} |")
        m = measured[0]
        lines += ["", f"weights: estimated {gib(m['weights_estimate'])}, measured {gib(m['weights_measured'])} "
                  "(resident growth of loading the model and tokenizer, libraries already imported); labelled "
                  f"share of the rows {m['labelled_share']:.3f}", ""]
    lines += ["Qwen2.5-7B-Instruct, paper profile (4 × 4096-token rows, LoRA r=8, bf16) on an 80 GiB GPU "
              "(estimates; GiB):", "",
              "| setting | weights | adapter | activations | logits | training | acting | fits 80 GiB |",
              "|---|---|---|---|---|---|---|---|"]
    for r in paper:
        t = r["train"]
        lines.append(f"| {r['setting']} | {gib(t['weights'])} | {gib(t['adapter'])} | {gib(t['activations'])} | "
                     f"{gib(t['logits'])} | {gib(r['train_total'])} | {gib(r['act_total'])} | "
                     f"{'yes' if r['fits'] else 'no'} |")
    lines += ["", "the check's line for the first row:", paper[0]["line"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="1024,3072", help="token budgets (multiples of 1024) to measure")
    parser.add_argument("--no-measure", action="store_true", help="the 7B estimates only")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # this checkout's fedse, whichever one the environment installed
    if args.case:
        print(json.dumps(measure(json.loads(args.case))))
        return
    budgets = [int(b) for b in args.budgets.split(",")]
    if any(b % ROW for b in budgets):
        raise SystemExit(f"--budgets {args.budgets}: each must be a multiple of {ROW}")
    measured = [] if args.no_measure else [run_case(c) for c in smollm2_cases(budgets)]
    paper = paper_rows()
    if args.json:
        print(json.dumps({"smollm2_cpu": measured, "qwen2.5_7b_paper": paper}))
    else:
        print(table(measured, paper))


if __name__ == "__main__":
    main()
