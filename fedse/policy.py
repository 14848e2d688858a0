"""How the agent acts: two ways, both batched across the running episodes of a pool.

* ``constrained`` — the action is drawn from the environment's admissible actions by the model's own
  probabilities: p(a) ∝ exp(log p(a | prompt) / T). All running episodes are scored in **one** forward pass
  per turn: each row holds only the tokens new since the last turn, followed by every candidate action laid
  side by side, with a 4-D attention mask that lets each candidate see the cached prompt and itself only. The
  KV cache of the prompt is computed once and reused across turns; the candidate block is cropped off after
  scoring. This is the default for the tiny model.
* ``react`` — the paper's format for real LLMs: the model writes `Thought: … Action: …` (generation with the
  KV cache), and the action is parsed from the text. Unparseable text goes to the environment as is; it
  answers with feedback.

Temperature 1.0 explores; temperature 0 is greedy (evaluation). When an episode outgrows the context window,
the prompt keeps the system message and first observation (which states the task) and drops the oldest turns;
in constrained mode it drops them down to half the window, so the rebuilt cache then lasts several turns.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedse.envs.base import TextEnv
from fedse.envs.pool import Slot
from fedse.model import Agent
from fedse.prompt import ACTION_PREFIX, IM_END, fit_window

_ACTION_RE = re.compile(r"Action:\s*(.*)", re.IGNORECASE)
_THOUGHT_RE = re.compile(r"Thought:\s*(.*?)\s*(?:Action:|$)", re.IGNORECASE | re.DOTALL)


class PolicySpec(BaseModel):
    """`policy:` in params.yaml."""

    model_config = ConfigDict(extra="forbid")

    mode: str = Field("auto", pattern="^(auto|constrained|react)$")
    temperature: float = Field(1.0, ge=0, description="exploration temperature")
    eval_temperature: float = Field(1.0, ge=0, description="evaluation temperature; 0 = greedy (seeded otherwise, "
                                    "the same seed every round so rounds are compared on the same draws)")
    max_new_tokens: int = Field(64, ge=1)
    context: int = Field(1536, ge=128, description="prompt token budget (capped by the model's window)")
    batch_size: int = Field(4, ge=1, description="episodes per forward pass")
    score: str = Field("mean", pattern="^(sum|mean)$",
                       description="constrained: a candidate's log-prob summed over its tokens, or their mean")
    history_turns: int | None = Field(6, ge=1, description="keep at most this many recent turns; null = all "
                                      "that fit in the context")

    def temperature_for(self, evaluation: bool) -> float:
        return self.eval_temperature if evaluation else self.temperature

    def resolved_mode(self, agent: Agent) -> str:
        if self.mode != "auto":
            return self.mode
        return "constrained" if agent.name.startswith("tiny") else "react"


@dataclass
class Rendered:
    """Token ids of an episode's head and of each finished turn, extended as the episode goes on."""

    head: list[int] | None = None
    turns: list[list[int]] = field(default_factory=list)


def episode_tokens(agent: Agent, slot: Slot, budget: int, constrained: bool, keep_turns: int | None = None,
                   ) -> list[int]:
    """The prompt for the slot's next action, rebuilt from its history and fitted to `budget` tokens."""
    return episode_window(agent, slot, budget, constrained, keep_turns)[0]


def episode_window(agent: Agent, slot: Slot, budget: int, constrained: bool, keep_turns: int | None = None,
                   rendered: Rendered | None = None) -> tuple[list[int], int]:
    """The prompt and how many of the oldest turns it leaves out (see `fit_window`).

    `rendered` carries the slot's already tokenised head and turns between calls (histories only grow), so
    acting does not re-tokenise a whole episode at every step.
    """
    r = agent.renderer
    memo = rendered if rendered is not None else Rendered()
    if memo.head is None:
        memo.head = r.system() + r.user(slot.first_observation)
    for i in range(len(memo.turns), len(slot.history)):
        action, observation = slot.history[i]
        thought = slot.thoughts[i] if i < len(slot.thoughts) else ""
        content, close = r.reply(action, thought)
        memo.turns.append(r.assistant_open() + content + close + r.user(observation))
    head, turns = memo.head, memo.turns
    tail = r.assistant_open() + (r.const(ACTION_PREFIX) if constrained else [])
    ids, dropped = fit_window(turns, head, budget - len(tail), keep_turns=keep_turns)
    return ids + tail, dropped


class ConstrainedPolicy:
    """Scores the admissible actions with a per-episode KV cache shared by all candidates."""

    def __init__(self, agent: Agent, temperature: float = 1.0, seed: int = 0, context: int = 1536,
                 score: str = "sum", keep_turns: int | None = None) -> None:
        self.agent = agent
        self.score = score
        self.keep_turns = keep_turns
        self.temperature = temperature
        self.gen = torch.Generator().manual_seed(seed)
        self.budget = min(context, agent.context)
        self.last_scores: list[torch.Tensor] = []
        self.slots: list[Slot] = []
        self.rendered: list[Rendered] = []
        self._reset_cache([])

    # ------------------------------------------------------------------ cache bookkeeping
    def _reset_cache(self, slots: list[Slot]) -> None:
        # tokenised histories outlive the KV cache: a slot still running keeps its memo
        memos = {id(s): m for s, m in zip(self.slots, self.rendered, strict=True)}
        self.rendered = [memos.get(id(s), Rendered()) for s in slots]
        self.slots = list(slots)
        self.cache: Any = None
        self.valid = torch.zeros(len(slots), 0, dtype=torch.bool)  # which cached positions are real tokens
        self.length = [0] * len(slots)  # real tokens cached per row = next position id
        self.absorbed = [0] * len(slots)  # history entries already in the cache (or pending)
        self.pending: list[list[int]] = [[] for _ in slots]
        self.dropped = [0] * len(slots)  # turns each cached row's window leaves out
        self.restart = [True] * len(slots)  # rows whose next delta is their whole (re)fitted window

    def _align(self, slots: list[Slot]) -> None:
        """Keep the cache rows of the slots still running; a different set of episodes starts afresh."""
        index = {id(s): i for i, s in enumerate(self.slots)}
        if not all(id(s) in index for s in slots):
            self._reset_cache(slots)
            return
        keep = [index[id(s)] for s in slots]
        if keep == list(range(len(self.slots))):
            return
        rows = torch.tensor(keep, dtype=torch.long)
        if self.cache is not None:
            self.cache.batch_select_indices(rows)
        self.valid = self.valid[rows]
        self.length = [self.length[i] for i in keep]
        self.absorbed = [self.absorbed[i] for i in keep]
        self.pending = [self.pending[i] for i in keep]
        self.dropped = [self.dropped[i] for i in keep]
        self.restart = [self.restart[i] for i in keep]
        self.rendered = [self.rendered[i] for i in keep]
        self.slots = list(slots)

    def _restart_row(self, i: int) -> None:
        """Forget row i's cached tokens (masked out from now on) and feed its new window from position 0."""
        self.valid[i] = False
        self.length[i] = 0
        self.pending[i] = []
        self.restart[i] = True

    def _deltas(self, windows: list[tuple[list[int], int]]) -> list[list[int]]:
        """Tokens each row needs appended before its next decision (everything since the last one)."""
        r = self.agent.renderer
        deltas = []
        for i, slot in enumerate(self.slots):
            if self.cache is None or self.restart[i]:
                deltas.append(windows[i][0])
                self.dropped[i] = windows[i][1]
                self.restart[i] = False
                continue
            new = slot.history[self.absorbed[i]:]
            ids = list(self.pending[i])
            for j, (action, observation) in enumerate(new):
                if j > 0:  # an action this policy did not choose (a resumed slot): render it in full
                    content, close = r.reply(action)
                    ids += r.assistant_open() + content + close
                ids += r.user(observation)
            deltas.append(ids + r.assistant_open() + r.const(ACTION_PREFIX))
        return deltas

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def __call__(self, envs: Sequence[TextEnv], slots: list[Slot]) -> list[str]:
        self._align(slots)
        candidates = [list(s.info["admissible_actions"]) for s in slots]
        cand_ids = [[self.agent.renderer.candidate(a) for a in cands] for cands in candidates]
        windows = [episode_window(self.agent, s, self.budget, True, self.keep_turns, memo)
                   for s, memo in zip(slots, self.rendered, strict=True)]
        moved = [i for i, (_, dropped) in enumerate(windows) if dropped != self.dropped[i]]
        if self.cache is not None and len(moved) == len(slots):
            self._reset_cache(slots)  # every window dropped turns (episodes in lockstep): start afresh
        for i in moved if self.cache is not None else []:
            self._restart_row(i)  # its window dropped old turns (rare, by hysteresis): re-encode that row
        deltas = self._deltas(windows)
        longest = max(len(c) for cs in cand_ids for c in cs)
        if self.cache is not None and (self.valid.shape[1] > 4 * self.budget or any(
                self.length[i] + len(d) + longest > self.agent.context for i, d in enumerate(deltas))):
            self._reset_cache(slots)  # too many padding holes accumulated, or positions run out: compact
            deltas = self._deltas(windows)
        scores = self._score(deltas, cand_ids)
        self.last_scores = scores
        chosen = []
        for i, (slot, cands, s) in enumerate(zip(slots, candidates, scores, strict=True)):
            if self.score == "mean":
                s = s / torch.tensor([len(c) for c in cand_ids[i]], dtype=s.dtype)
            k = self._pick(s)
            chosen.append(cands[k])
            self.pending[i] = cand_ids[i][k] + self.agent.renderer.const("\n")
            self.absorbed[i] = len(slot.history)
            slot.thoughts.append("")
        return chosen

    def _pick(self, scores: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(torch.argmax(scores))
        probs = torch.softmax(scores.double() / self.temperature, dim=0)
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def _score(self, deltas: list[list[int]], cand_ids: list[list[list[int]]]) -> list[torch.Tensor]:
        """Sum of log-probs of every candidate of every row, from one forward pass over all rows."""
        model, device = self.agent.model, self.agent.device
        rows = len(deltas)
        width_d = max(len(d) for d in deltas)
        width_c = max(sum(len(c) for c in cs) for cs in cand_ids)
        width = width_d + width_c
        old = self.valid.shape[1]
        pad = self.agent.tokenizer.pad_token_id or 0
        ids = [[pad] * width for _ in range(rows)]
        pos = [[0] * width for _ in range(rows)]
        seg = [[-1] * width for _ in range(rows)]  # -1 padding, 0 the delta, k + 1 candidate k
        targets: list[tuple[int, int, int, int]] = []  # (row, position predicting, token, candidate)
        for i, (delta, cands) in enumerate(zip(deltas, cand_ids, strict=True)):
            n, base = len(delta), self.length[i]
            ids[i][:n], pos[i][:n], seg[i][:n] = delta, range(base, base + n), [0] * n
            offset = width_d
            for k, cand in enumerate(cands):
                m = len(cand)
                ids[i][offset:offset + m] = cand
                pos[i][offset:offset + m] = range(base + n, base + n + m)
                seg[i][offset:offset + m] = [k + 1] * m
                targets.append((i, n - 1, cand[0], k))
                targets.extend((i, offset + t - 1, cand[t], k) for t in range(1, m))
                offset += m
        ids_t, pos_t, seg_t = torch.tensor(ids), torch.tensor(pos), torch.tensor(seg)
        # a new token sees earlier tokens of the delta and of its own candidate; padding sees only itself
        # (a query with no key at all would give NaN, which would leak into the cache through V)
        sq, sk = seg_t[:, :, None], seg_t[:, None, :]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        new = causal & ((sk == 0) | (sk == sq)) & (sq >= 0) & (sk >= 0)
        new |= torch.eye(width, dtype=torch.bool)
        allow = torch.cat([self.valid[:, None, :].expand(rows, width, old) & (sq >= 0), new], dim=2)
        dtype = next(p.dtype for p in model.parameters())
        mask = torch.zeros(allow.shape, dtype=dtype).masked_fill_(~allow, torch.finfo(dtype).min)
        if self.cache is None:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=model.config)
        out = model(input_ids=ids_t.to(device), position_ids=pos_t.to(device), attention_mask=mask[:, None].to(device),
                    cache=self.cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        t = torch.tensor(targets, dtype=torch.long)
        logprobs = self._token_logprobs(hidden, t)
        self.cache.crop(-width_c)
        self.valid = torch.cat([self.valid, torch.arange(width_d)[None, :] < torch.tensor(
            [len(d) for d in deltas])[:, None]], dim=1)
        self.length = [length + len(d) for length, d in zip(self.length, deltas, strict=True)]
        scores = []
        for i, cands in enumerate(cand_ids):
            row = t[:, 0] == i
            scores.append(torch.zeros(len(cands), dtype=torch.float64).index_add_(
                0, t[row, 3], logprobs[row].double()))
        return scores

    def _token_logprobs(self, hidden: torch.Tensor, t: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """log p(token | position) for the target list only: logits for just those positions, in chunks."""
        head = self.agent.model.get_output_embeddings()
        out = []
        for start in range(0, len(t), chunk):
            part = t[start:start + chunk].to(hidden.device)
            logits = head(hidden[part[:, 0], part[:, 1]]).float()
            out.append(torch.log_softmax(logits, dim=-1).gather(1, part[:, 2:3]).squeeze(1).cpu())
        return torch.cat(out)


@torch.no_grad()
def score_naive(agent: Agent, prompts: list[list[int]], cand_ids: list[list[list[int]]], batch: int = 64,
                ) -> list[torch.Tensor]:
    """Reference scorer: one padded row per (prompt + candidate), no cache. Same numbers, many times the work."""
    rows = [(i, k, p + c, len(p)) for i, (p, cs) in enumerate(zip(prompts, cand_ids, strict=True))
            for k, c in enumerate(cs)]
    scores = [torch.zeros(len(cs), dtype=torch.float64) for cs in cand_ids]
    pad = agent.tokenizer.pad_token_id or 0
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        width = max(len(r[2]) for r in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for j, (_, _, seq, _) in enumerate(part):
            ids[j, :len(seq)] = torch.tensor(seq)
            mask[j, :len(seq)] = 1
        logp = torch.log_softmax(agent.model(input_ids=ids.to(agent.device),
                                             attention_mask=mask.to(agent.device)).logits.float(), -1).cpu()
        for j, (i, k, seq, n) in enumerate(part):
            positions = torch.arange(n - 1, len(seq) - 1)
            scores[i][k] = logp[j, positions, torch.tensor(seq[n:])].double().sum()
    return scores


class ReactPolicy:
    """Free generation of `Thought: … Action: …` with the KV cache; the action is parsed from the text."""

    def __init__(self, agent: Agent, temperature: float = 1.0, seed: int = 0, context: int = 1536,
                 max_new_tokens: int = 64, keep_turns: int | None = None) -> None:
        self.agent = agent
        self.keep_turns = keep_turns
        self.temperature = temperature
        self.seed = seed
        self.budget = min(context, agent.context) - max_new_tokens
        self.max_new_tokens = max_new_tokens
        self.end_id = agent.tokenizer.convert_tokens_to_ids(IM_END)

    @torch.no_grad()
    def __call__(self, envs: Sequence[TextEnv], slots: list[Slot]) -> list[str]:
        tok = self.agent.tokenizer
        prompts = [episode_tokens(self.agent, s, self.budget, False, self.keep_turns) for s in slots]
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's continuation starts at the same column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        torch.manual_seed(self.seed)
        self.seed += 1
        sample = self.temperature > 0
        out = self.agent.model.generate(
            input_ids=ids.to(self.agent.device), attention_mask=mask.to(self.agent.device),
            max_new_tokens=self.max_new_tokens, do_sample=sample, temperature=self.temperature if sample else None,
            top_k=0 if sample else None, top_p=1.0 if sample else None, eos_token_id=self.end_id, pad_token_id=pad)
        actions = []
        for slot, row in zip(slots, out[:, width:].cpu(), strict=True):
            text = tok.decode(row, skip_special_tokens=True)
            thought, action = parse_reply(text)
            slot.thoughts.append(thought)
            actions.append(action)
        return actions


def parse_reply(text: str) -> tuple[str, str]:
    """(thought, action) of a generated reply; without an `Action:` line the whole text is the action."""
    text = text.split(IM_END)[0].strip()
    thought_match = _THOUGHT_RE.search(text)
    thought = thought_match.group(1).strip() if thought_match else ""
    action_match = _ACTION_RE.search(text)
    action = action_match.group(1).strip().splitlines()[0].strip() if action_match and action_match.group(
        1).strip() else text
    return thought, action


def make_policy(agent: Agent, spec: PolicySpec, evaluation: bool, seed: int = 0) -> Any:
    """The policy `spec` asks for, at its evaluation or its exploration temperature."""
    temperature = spec.temperature_for(evaluation)
    if spec.resolved_mode(agent) == "constrained":
        return ConstrainedPolicy(agent, temperature, seed, spec.context, spec.score, spec.history_turns)
    return ReactPolicy(agent, temperature, seed, spec.context, spec.max_new_tokens, spec.history_turns)
