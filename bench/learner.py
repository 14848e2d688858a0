"""Local SFT throughput: `fedse.learner.train` vs a minimal hand-written PyTorch loop, same model and batches.

Both start from the same fresh adapter and process the same length-bucketed batches of expert seed
examples (one epoch) with AdamW; the bare loop has no schedule, clipping, accumulation or bookkeeping. They
alternate (bare, ours, bare, ours) in one process so machine noise hits both; the ratio is tokens/s of
ours over tokens/s of the bare loop (1.0 = no overhead).

    python bench/learner.py [--env maze] [--trajectories 96] [--json]
"""

from __future__ import annotations

import argparse
import random
import resource
import time

import torch
from report import emit

from fedse.config import load_config
from fedse.learner import batches, collate, encode, train
from fedse.model import Agent, adapter_state, load_agent, set_adapter_state
from fedse.seed import expert_trajectories


def bare_loop(agent: Agent, groups, lr: float) -> tuple[int, float]:
    """The least a PyTorch user would write: forward, backward, step."""
    params = [p for p in agent.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    pad = agent.tokenizer.pad_token_id or 0
    agent.model.train()
    tokens = 0
    start = time.perf_counter()
    for group in groups:
        ids, labels, mask = collate(group, pad)
        loss = agent.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
    agent.model.eval()
    return tokens, time.perf_counter() - start


def run(env: str, count: int, params: str, repeats: int = 2) -> dict[str, float]:
    cfg = load_config(params)
    spec = cfg.learner.model_copy(update={"epochs": 1, "grad_accum": 1})
    agent = load_agent(cfg.model, seed=cfg.seed)
    fresh = adapter_state(agent)
    trajs, _ = expert_trajectories(env, count, seed=cfg.seed)
    examples = [e for t in trajs for e in encode(agent, t, spec.max_len)]
    ours_rate, bare_rate = [], []
    for _ in range(repeats):
        set_adapter_state(agent, fresh)
        tokens, seconds = bare_loop(agent, batches(examples, spec.batch_size, random.Random(cfg.seed)), spec.lr)
        bare_rate.append(tokens / seconds)
        set_adapter_state(agent, fresh)
        stats = train(agent, trajs, spec, seed=cfg.seed)  # draws the same batches from the same seed
        ours_rate.append(stats.tokens_per_sec)
    ours, bare = sum(ours_rate) / repeats, sum(bare_rate) / repeats
    return {"ratio_vs_bare_torch": ours / bare, "tokens_per_sec": ours, "bare_tokens_per_sec": bare,
            "examples": len(examples), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="maze")
    parser.add_argument("--trajectories", type=int, default=96)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    emit(run(args.env, args.trajectories, args.params), args.json)


if __name__ == "__main__":
    main()
