"""Record-level differential privacy at an organisation: DP-SGD on the LoRA parameters, one trajectory the unit.

What a trajectory contributes to a step is the gradient of its own loss — the mean cross-entropy over its agent
tokens, summed over the windows it is cut into (`fedse.learner.acting_examples`: one trajectory is several
training rows). Opacus computes each row's gradient (its `GradSampleModule` hooks on the LoRA layers); the rows
of one trajectory are summed into that trajectory's gradient, and Opacus's `DPOptimizer` clips each trajectory's
gradient to C, sums, adds N(0, z²C²) and divides by the expected batch. Each step trains on a Poisson sample
of the trajectories at rate q (Opacus's `UniformWithReplacementSampler`), which is what the RDP accountant
(fedse/privacy.py) assumes; the buffer is reused every round, so a run's privacy is every round's steps composed.

Memory: the sample's rows go through in micro-batches of `learner.batch_size` rows or `learner.batch_tokens`
padded tokens; `learner.gradient_checkpointing` is refused by the config (fedse/config.py), since a recomputed
layer would fire Opacus's hooks a second time.

Nothing here is a hand-written per-sample gradient, clip, noise or accountant: summing rows into trajectories is
the one step Opacus does not take, since its unit is a row.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedse.learner import (
    IGNORE,
    Example,
    LearnerSpec,
    TrainStats,
    collate,
    cosine,
    encode,
    labelled_logits,
    spans,
    training,
    use_autocast,
)
from fedse.model import Agent
from fedse.prompt import Window
from fedse.threads import torch_threads
from fedse.trajectory import Trajectory

Row = tuple[int, Example]  # (index of its trajectory in the step's sample, the example)


def trajectory_rows(agent: Agent, trajectories: Sequence[Trajectory], max_len: int,
                    window: Window | None) -> list[list[Example]]:
    """Each trajectory's training rows (empty when none of its tokens carries loss)."""
    return [[e for e in encode(agent, t, max_len, window) if any(x != IGNORE for x in e.labels)]
            for t in trajectories]


def row_batches(rows: list[Row], size: int, tokens: int | None = None) -> list[list[Row]]:
    """Micro-batches of at most `size` rows, or of at most `tokens` padded tokens (`fedse.learner.spans`), by
    length so that padding stays small (memory, not privacy: every row of the sample is used whatever the
    batching, and a trajectory's gradient is the sum over its rows in whichever micro-batches they fall)."""
    ordered = sorted(rows, key=lambda r: len(r[1].ids))
    return [ordered[a:b] for a, b in spans([len(r[1].ids) for r in ordered], size, tokens)]


def trajectory_gradients(agent: Agent, params: list[torch.nn.Parameter], sample: list[list[Example]],
                         spec: LearnerSpec) -> tuple[list[torch.Tensor], float]:
    """The gradient of each sampled trajectory's loss, per parameter [n_trajectories, *shape], and the mean loss.

    Each trajectory's loss is its mean token cross-entropy, so a long trajectory counts no more than a short
    one before clipping. Requires the model wrapped by Opacus's GradSampleModule (`p.grad_sample` per row)."""
    total = [torch.zeros((max(1, len(sample)), *p.shape), dtype=p.dtype, device=p.device) for p in params]
    if not sample:  # an empty Poisson sample: a zero row, so the step is noise alone
        return total, float("nan")
    pad = agent.tokenizer.pad_token_id or 0
    amp = use_autocast(spec, agent.device)
    tokens = [sum(x != IGNORE for e in rows for x in e.labels) for rows in sample]
    rows = [(i, e) for i, examples in enumerate(sample) for e in examples]
    losses: list[float] = []
    for batch in row_batches(rows, spec.batch_size, spec.batch_tokens):
        ids, labels, mask = (t.to(agent.device) for t in collate([e for _, e in batch], pad))
        owner = torch.tensor([i for i, _ in batch], device=agent.device)
        weight = torch.tensor([1.0 / tokens[i] for i, _ in batch], device=agent.device)
        with torch.autocast(agent.device.type, dtype=torch.bfloat16, enabled=amp):
            logits, targets, row = labelled_logits(agent.model, ids, mask, labels)
        per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        with warnings.catch_warnings():  # Opacus's hooks on LoRA layers whose inputs need no gradient: expected
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            (per_token * weight[row]).sum().backward()
        losses.append(float(per_token.detach().mean()))
        for p, acc in zip(params, total, strict=True):
            acc.index_add_(0, owner, p.grad_sample.to(acc.dtype))
            p.grad_sample = None
            p.grad = None
    return total, sum(losses) / len(losses)


def optimizer(inner: torch.optim.Optimizer, plan: Mapping[str, float], expected_batch: float,
              seed: int) -> Any:
    """Opacus's DPOptimizer around `inner`: clip each trajectory to C, add N(0, z²C²) from a seeded generator
    (a resumed round draws the same noise), divide by the expected batch q·N."""
    from opacus.optimizers import DPOptimizer

    return DPOptimizer(inner, noise_multiplier=plan["noise"], max_grad_norm=plan["clip"],
                       expected_batch_size=expected_batch, loss_reduction="mean",
                       generator=torch.Generator().manual_seed(seed * 2 + 1))


def privatise(opt: Any, params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None:
    """Hand the trajectories' gradients to Opacus as its per-sample gradients and let it clip, sum, noise and
    scale them into each parameter's `.grad` (no optimizer step yet)."""
    for p, g in zip(params, grads, strict=True):
        p.grad_sample = g
    opt.pre_step()


def train(agent: Agent, trajectories: Sequence[Trajectory], spec: LearnerSpec, plan: Mapping[str, float],
          seed: int = 0, advance: Callable[[int, int, float], None] | None = None,
          window: Window | None = None) -> TrainStats:
    """`fedse.learner.train` under DP-SGD: `spec.steps` steps, each on a Poisson sample of the trajectories at
    rate plan["sample_rate"], every trajectory's gradient clipped to plan["clip"] and Gaussian noise of
    plan["noise"] × clip added. Returns the stats, with the (noise, rate, steps) the accountant needs."""
    from opacus import GradSampleModule
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    steps, rate, clip, noise = int(plan["steps"]), plan["sample_rate"], plan["clip"], plan["noise"]
    torch.manual_seed(seed)
    data = trajectory_rows(agent, trajectories, spec.max_len, window)
    record = {"noise": noise, "sample_rate": rate, "steps": steps, "clip": clip, "delta": plan["delta"],
              "trajectories": len(data)}
    if not data:
        return TrainStats(0, 0, 0, 0, float("nan"), float("nan"), 0.0, record | {"steps": 0})
    params = [p for p in agent.model.parameters() if p.requires_grad]
    wrapped = GradSampleModule(agent.model, batch_first=True, loss_reduction="sum")
    opt = optimizer(torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay), plan, rate * len(data),
                    seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt.original_optimizer, cosine(steps, int(spec.warmup_ratio * steps)))
    sampler = UniformWithReplacementSampler(num_samples=len(data), sample_rate=rate, steps=steps,
                                            generator=torch.Generator().manual_seed(seed * 2))
    width = [sum(len(e.ids) for e in rows) for rows in data]  # per trajectory, once: every step adds its sample's
    labelled = [sum(x != IGNORE for e in rows for x in e.labels) for rows in data]
    losses, sizes, clipped, tokens, agent_tokens = [], [], 0, 0, 0
    start = time.perf_counter()
    try:
        with torch_threads(spec.threads), training(agent.model):
            for step, chosen in enumerate(sampler, start=1):
                sample = [data[i] for i in chosen]
                grads, loss = trajectory_gradients(agent, params, sample, spec)
                norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in grads], dim=1).norm(dim=1)
                clipped += int((norms > clip).sum()) if sample else 0
                privatise(opt, params, grads)
                opt.original_optimizer.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                sizes.append(len(sample))
                tokens += sum(width[i] for i in chosen)
                agent_tokens += sum(labelled[i] for i in chosen)
                if loss == loss:
                    losses.append(loss)
                if advance:
                    advance(step, steps, loss)
    finally:
        wrapped.cleanup()  # hooks off before the agent acts again
    head = max(1, len(losses) // 10)
    first = sum(losses[:head]) / head if losses else float("nan")
    last = sum(losses[-head:]) / head if losses else float("nan")
    record |= {"mean_batch": sum(sizes) / len(sizes), "clipped_share": clipped / max(1, sum(sizes))}
    return TrainStats(steps, sum(len(r) for r in data), tokens, agent_tokens, first, last,
                      time.perf_counter() - start, record)
