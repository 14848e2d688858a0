"""Local learning: supervised fine-tuning of the LoRA adapter on trajectories (maximum likelihood).

Only the agent's tokens carry loss (its `Action: …` replies and their end markers), exactly as the policy
produced them: the episode is tokenised by the same renderer the policy uses, and cut into the same windows
the policy acts in (`fedse.prompt.Window`: the head, then only as many recent turns as the policy keeps), so
every reply is learned in the context the agent will see when it acts. Examples are bucketed by length
so that padding stays small, AdamW with a cosine schedule, gradient accumulation, and bf16 autocast where the
hardware makes it faster (CUDA; CPUs with native bf16), fp32 otherwise.

Memory (fedse/memory.py estimates it before a run): a batch is `batch_size` sequences, or with `batch_tokens`
as many as keep its padded size (rows × longest row) within that budget, so a batch of long windows costs no
more activation memory than one of short ones; `gradient_checkpointing` keeps only each decoder layer's input
and recomputes the rest in the backward pass.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedse.model import Agent
from fedse.prompt import Encoded, Renderer, Window, dropped_turns
from fedse.threads import torch_threads
from fedse.trajectory import Trajectory

IGNORE = -100


class LearnerSpec(BaseModel):
    """`learner:` in params.yaml. The paper's lr is 5e-5 for 7B models; the tiny model needs a larger one."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-3, gt=0)
    epochs: float = Field(2, gt=0)
    steps: int | None = Field(None, ge=1, description="optimizer steps per training call, whatever the data's size "
                              "(epochs then ignored): equal compute for every method and client; null = epochs")
    batch_size: int = Field(1, ge=1, description="sequences per batch (when batch_tokens is null)")
    batch_tokens: int | None = Field(None, ge=32, description="padded tokens per batch (rows × its longest row): "
                                     "length-bucketed batches filled up to this budget, replacing batch_size; "
                                     "null = batch_size sequences")
    gradient_checkpointing: bool = Field(False, description="keep only each decoder layer's input and recompute "
                                         "its activations in the backward pass (≈ 1/3 more compute, activation "
                                         "memory down by the layer count)")
    grad_accum: int = Field(1, ge=1)
    max_len: int = Field(1024, ge=32)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    autocast: str = Field("auto", pattern="^(auto|bf16|off)$")
    threads: int | None = Field(None, ge=1, description="torch CPU threads while training; null = unchanged")

    @model_validator(mode="after")
    def _budget_holds_a_window(self) -> LearnerSpec:
        if self.batch_tokens is not None and self.batch_tokens < self.max_len:
            raise ValueError(f"batch_tokens {self.batch_tokens} is below max_len {self.max_len}: a full-length "
                             "window would not fit in a batch (raise batch_tokens or lower max_len)")
        return self


@dataclass
class Example:
    ids: list[int]
    labels: list[int]


@dataclass
class TrainStats:
    steps: int
    examples: int
    tokens: int  # non-padding tokens processed (all epochs)
    agent_tokens: int  # tokens that carried loss
    loss_first: float
    loss_last: float
    seconds: float
    privacy: dict[str, Any] | None = None  # record-level DP: this call's (noise, sample rate, steps), clip stats

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def encode(agent: Agent, traj: Trajectory, max_len: int, window: Window | None = None) -> list[Example]:
    """The episode's training examples in the acting window `window` (None: a policy that keeps every turn
    that fits in `max_len`), each at most `max_len` tokens (see `acting_examples`)."""
    return acting_examples(agent.renderer, traj, window or Window(max_len), max_len)


def _turns(r: Renderer, traj: Trajectory) -> tuple[Encoded, list[Encoded]]:
    """The head (system + first observation) and each turn (reply, then the observation it led to), encoded
    piece by piece exactly as the policy's prompts are (`fedse.policy.episode_window`)."""
    head = Encoded()
    head.add(r.system())
    head.add(r.user(traj.turns[0].observation if traj.turns else traj.final_observation))
    observations = [t.observation for t in traj.turns[1:]] + [traj.final_observation]
    turns = []
    for turn, next_obs in zip(traj.turns, observations, strict=True):
        enc = Encoded()
        enc.add(r.assistant_open())
        content, close = r.reply(turn.action, turn.thought)
        enc.add(content, agent=True)
        enc.add(close)
        enc.add(r.user(next_obs))
        turns.append(enc)
    return head, turns


def acting_examples(r: Renderer, traj: Trajectory, window: Window, max_len: int) -> list[Example]:
    """One example per run of decisions that the policy took in the same window.

    Decision t (the t-th reply) was chosen from the head plus turns[d_t:t], where d_t is how many turns the
    window had dropped (`fedse.prompt.dropped_turns`, the policy's own rule). Between drops the window only
    grows, so decisions a … b−1 with the same d share one example, head + turns[d:b], whose loss covers
    exactly their replies: each reply is trained on once, in the context it was acted in. Turns before a (kept
    for context, learned in an earlier example) carry no loss.
    """
    head, turns = _turns(r, traj)
    dropped = dropped_turns([len(t.ids) for t in turns], len(head.ids), window)
    examples: list[Example] = []
    a = 0
    while a < len(turns):
        b = a + 1
        while b < len(turns) and dropped[b] == dropped[a]:
            b += 1
        enc = _copy(head)
        for j in range(dropped[a], b):
            enc.add(turns[j].ids)
            if j >= a:
                enc.agent[-len(turns[j].ids):] = turns[j].agent
        examples.append(_example(enc, max_len))
        a = b
    return examples


def pieces(r: Renderer, traj: Trajectory, max_len: int) -> list[Example]:
    """The tiny base's pretraining windows: the head, then consecutive turns packed up to `max_len` tokens; each
    reply trained on once.

    Kept as it was when base v3 was built (`fedse base build` must reproduce it); unlike `acting_examples` it
    does not limit the turns to a policy's `history_turns`.
    """
    head, turns = _turns(r, traj)
    examples: list[Example] = []
    current = _copy(head)
    has_turn = False
    for enc in turns:
        if has_turn and len(current.ids) + len(enc.ids) > max_len:
            examples.append(_example(current, max_len))
            current, has_turn = _copy(head), False
        current.add(enc.ids)
        current.agent[-len(enc.ids):] = enc.agent
        has_turn = True
    if has_turn:
        examples.append(_example(current, max_len))
    return examples


def _copy(enc: Encoded) -> Encoded:
    return Encoded(list(enc.ids), list(enc.agent))


def _example(enc: Encoded, max_len: int) -> Example:
    ids, agent = enc.ids[:max_len], enc.agent[:max_len]
    return Example(ids, [i if a else IGNORE for i, a in zip(ids, agent, strict=True)])


def batches(examples: list[Example], size: int, rng: random.Random, tokens: int | None = None,
            ) -> list[list[Example]]:
    """Length-bucketed batches in random order: sort by length (with random tie-breaks), cut, shuffle.

    Cut into `size` rows each, or with a token budget `tokens` into as many rows as keep rows × longest ≤ it
    (`spans`)."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].ids), rng.random()))
    cuts = spans([len(examples[i].ids) for i in order], size, tokens)
    groups = [[examples[i] for i in order[a:b]] for a, b in cuts]
    rng.shuffle(groups)
    return groups


def spans(widths: Sequence[int], size: int, tokens: int | None) -> list[tuple[int, int]]:
    """[start, stop) of each batch over rows sorted by length (ascending): `size` rows each, or with a budget,
    a batch grows while (rows + 1) × the next row's length (its longest, by the order) stays ≤ `tokens`.

    Padded tokens, not real ones, are what a batch costs in activations: collate pads every row to the longest.
    A row longer than the budget alone is a batch of its own (the learner's validator keeps max_len ≤ budget)."""
    if tokens is None:
        return [(s, min(s + size, len(widths))) for s in range(0, len(widths), size)]
    cuts, start = [], 0
    for i, width in enumerate(widths):
        if i > start and (i - start + 1) * width > tokens:
            cuts.append((start, i))
            start = i
    if widths:
        cuts.append((start, len(widths)))
    return cuts


def collate(batch: list[Example], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
        mask[i, :len(e.ids)] = 1
    return ids, labels, mask


def lm_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens, with the output head applied to those positions only.

    Why not `model(labels=…)`: that projects every position onto the whole vocabulary in fp32 and then
    ignores most of them; only the agent's tokens (≈ 10 % of an episode) carry loss, so the head and the
    softmax run on 10× fewer rows. Measured on the tiny model (16 × 400 tokens): 2.1× faster per step, same
    loss to the last digit. Models without a separate decoder fall back to the plain call.
    """
    decoder = getattr(model, "get_decoder", lambda: None)()
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if decoder is None or head is None:
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    logits, targets, _ = labelled_logits(model, ids, mask, labels)
    return torch.nn.functional.cross_entropy(logits, targets)


def labelled_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The next-token logits at the labelled positions only (fp32), their targets, and the row each sits in:
    `lm_loss` averages them; DP-SGD (fedse/dpsgd.py) weighs each row by its trajectory."""
    chosen = labels[:, 1:] != IGNORE
    decoder = getattr(model, "get_decoder", lambda: None)()
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if decoder is None or head is None:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][chosen].float()
    else:
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][chosen]).float()
    return logits, labels[:, 1:][chosen], chosen.nonzero()[:, 0]


def use_autocast(spec: LearnerSpec, device: torch.device) -> bool:
    """bf16 autocast only where it is faster: CUDA with bf16, or a CPU with native bf16 (AVX512-BF16/AMX)."""
    if spec.autocast != "auto":
        return spec.autocast == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(flag in torch.backends.cpu.get_cpu_capability() for flag in ("AMX", "BF16"))


def cosine(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


@contextlib.contextmanager
def checkpointing(model: Any, on: bool) -> Iterator[None]:
    """Gradient checkpointing of every decoder layer for the block when `on`, and off again after it.

    Non-reentrant (`use_reentrant=False`): it recomputes a layer from its saved input even when that input needs
    no gradient, which is the case under LoRA (the embeddings are frozen). transformers also hooks the input
    embeddings so that their output requires grad, as the reentrant variant and PEFT need; both are undone on
    exit, so acting and the next training call see the model as it was."""
    if not on:
        yield
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"learner.gradient_checkpointing: {type(base).__name__} does not support it; set it to "
                         "false")
    base.activation_checkpointing_enable({"use_reentrant": False})
    try:
        yield
    finally:
        base.activation_checkpointing_disable()
        base.disable_input_require_grads()


@contextlib.contextmanager
def training(model: Any) -> Iterator[None]:
    """The model in training mode (dropout on) for the block, and back in eval mode after it, even when a step
    raises: acting with a model left in training mode would sample through dropout."""
    model.train()
    try:
        yield
    finally:
        model.eval()


def schedule(examples: list[Example], spec: LearnerSpec, rng: random.Random) -> list[list[Example]]:
    """The batches of one training call, in order: `epochs` passes over shuffled length-bucketed batches (a
    fractional last epoch is a prefix of its batches), or with `steps`, as many passes as it takes to fill
    exactly steps × grad_accum batches, so methods with more data do not also get more compute. Batches are
    `batch_size` rows, or fill `batch_tokens` padded tokens."""
    if spec.steps is not None:
        flat: list[list[Example]] = []
        while len(flat) < spec.steps * spec.grad_accum:
            flat.extend(batches(examples, spec.batch_size, rng, spec.batch_tokens))
        return flat[:spec.steps * spec.grad_accum]
    whole = int(spec.epochs)
    plan = [batches(examples, spec.batch_size, rng, spec.batch_tokens) for _ in range(math.ceil(spec.epochs))]
    if spec.epochs != whole:  # a fractional last epoch: a prefix of its shuffled batches
        plan[-1] = plan[-1][: max(1, round((spec.epochs - whole) * len(plan[-1])))]
    return [b for epoch in plan for b in epoch]


def train(agent: Agent, trajectories: Sequence[Trajectory], spec: LearnerSpec, seed: int = 0,
          advance: Callable[[int, int, float], None] | None = None, prox_mu: float = 0.0,
          window: Window | None = None) -> TrainStats:
    """Fine-tune the agent's adapter in place; `advance(step, total, loss)` reports progress.

    `window` is the one the agent acts in (`fedse.policy.acting_window`); the examples are cut by it.

    `prox_mu` > 0 adds FedProx's μ/2·‖φ − φ_start‖² to the loss: it keeps a client near the broadcast adapter,
    which bounds how far heterogeneous clients drift apart before they are averaged.
    """
    examples = [e for t in trajectories for e in encode(agent, t, spec.max_len, window)]
    return fit(agent, examples, spec, seed, advance, prox_mu)


def fit(agent: Agent, examples: list[Example], spec: LearnerSpec, seed: int = 0,
        advance: Callable[[int, int, float], None] | None = None, prox_mu: float = 0.0) -> TrainStats:
    """`train` on examples already cut (bench/memory.py trains on windows of chosen lengths this way)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    if not examples:
        return TrainStats(0, 0, 0, 0, float("nan"), float("nan"), 0.0)
    flat = schedule(examples, spec, rng)
    total_steps = math.ceil(len(flat) / spec.grad_accum)
    params = [p for p in agent.model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if prox_mu > 0 else []
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(total_steps, int(spec.warmup_ratio * total_steps)))
    pad = agent.tokenizer.pad_token_id or 0
    amp = use_autocast(spec, agent.device)
    tokens = agent_tokens = 0
    losses: list[float] = []
    start = time.perf_counter()
    step = 0
    with torch_threads(spec.threads), training(agent.model), checkpointing(agent.model, spec.gradient_checkpointing):
        for index, batch in enumerate(flat):
            ids, labels, mask = (t.to(agent.device) for t in collate(batch, pad))
            with torch.autocast(agent.device.type, dtype=torch.bfloat16, enabled=amp):
                loss = lm_loss(agent.model, ids, mask, labels)
            total = loss + prox_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)) \
                if anchor else loss
            (total / spec.grad_accum).backward()
            tokens += int(mask.sum())
            agent_tokens += int((labels != IGNORE).sum())
            losses.append(loss.item())
            if (index + 1) % spec.grad_accum == 0 or index + 1 == len(flat):
                torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if advance:
                    advance(step, total_steps, losses[-1])
    head = max(1, len(losses) // 10)
    return TrainStats(step, len(examples), tokens, agent_tokens, sum(losses[:head]) / head,
                      sum(losses[-head:]) / head, time.perf_counter() - start)
