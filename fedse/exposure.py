"""Exposure of planted secrets (Carlini et al., "The Secret Sharer", 2019): can an adapter be made to say what
one organisation's trajectories held?

A canary is a reply the agent is trained to produce — `remember <d d d d d d>`, six random digits, so the space
of secrets R holds 10⁶ — planted as a one-turn trajectory, k times, in one organisation's buffer. After
training, the adapter scores the canary's reply (its log-perplexity, in bits, in the canary's own context)
against N random candidate secrets that were never planted. The canary's rank among them estimates its rank in
R, and exposure = log₂|R| − log₂ rank ≈ −log₂ P(a random secret is at least as likely as the canary). An
adapter that learned nothing about the canary gives it a uniformly random rank (exposure ≈ 1.4 bits on average:
the baseline, measured with secrets never planted); with N candidates the largest exposure measurable is
log₂(N + 1).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from fedse.learner import collate, encode, labelled_logits
from fedse.model import Agent
from fedse.trajectory import Trajectory, Turn

DIGITS = 6
Secret = tuple[int, ...]


def secrets(rng: random.Random, n: int, avoid: Sequence[Secret] = ()) -> list[Secret]:
    """`n` distinct random secrets, none of them in `avoid`."""
    taken, out = set(avoid), []
    while len(out) < n:
        s = tuple(rng.randrange(10) for _ in range(DIGITS))
        if s not in taken:
            taken.add(s)
            out.append(s)
    return out


def reply(secret: Secret) -> str:
    return "remember " + " ".join(map(str, secret))


def canary(context: Trajectory, secret: Secret, copy: int = 0) -> Trajectory:
    """A one-turn trajectory whose only reply is the secret, acted on `context`'s first observation. Copies differ
    only in their task id, which no token shows, so the buffer keeps each (its content hash covers the id)."""
    first = context.turns[0].observation if context.turns else context.final_observation
    return Trajectory(env=context.env, task_id=900_000_000 + copy, instruction=context.instruction,
                      turns=[Turn(observation=first, action=reply(secret))], final_observation="Noted.",
                      reward=1.0, success=True, policy="expert")


def planted(context: Trajectory, plan: dict[Secret, int]) -> list[Trajectory]:
    """Every canary of `plan` (secret → repetitions), each copy its own record."""
    out: list[Trajectory] = []
    for secret, times in plan.items():
        out += [canary(context, secret, len(out) + i) for i in range(times)]
    return out


@torch.no_grad()
def log_perplexity(agent: Agent, context: Trajectory, candidates: Sequence[Secret], batch: int = 64) -> list[float]:
    """−log₂ P(reply | the canary's context) under the agent's current adapter, for each candidate secret."""
    agent.model.eval()
    pad = agent.tokenizer.pad_token_id or 0
    out: list[float] = []
    for start in range(0, len(candidates), batch):
        rows = [encode(agent, canary(context, s), 4096)[0] for s in candidates[start:start + batch]]
        ids, labels, mask = (t.to(agent.device) for t in collate(rows, pad))
        logits, targets, row = labelled_logits(agent.model, ids, mask, labels)
        nats = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        per_row = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, row.cpu(), nats.double().cpu())
        out += (per_row / math.log(2)).tolist()
    return out


def exposure(secret_bits: float, candidate_bits: Sequence[float]) -> float:
    """−log₂ of the estimated share of the secret space at least as likely as the secret: (1 + candidates
    with no more bits) / (N + 1), so an unseen secret averages ≈ 1.4 bits and the cap is log₂(N + 1)."""
    at_least = sum(b <= secret_bits for b in candidate_bits)
    return -math.log2((1 + at_least) / (len(candidate_bits) + 1))
